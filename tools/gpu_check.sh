#!/usr/bin/env bash
# kvship's GPU checks, in one go, in under 5 minutes on a CUDA machine:
#   1. a venv (.venv-gpu) that sees the machine's own packages, with kvship installed
#      and CuPy added if missing (cupy-cuda13x or cupy-cuda12x, by the driver's CUDA);
#   2. the gpu-marked tests, and the CPU twins of their code paths;
#   3. tools/bench_gpu.py on the GPU.
# The last line printed is one JSON object: {"ok": ..., "gpu": ..., "tests": ..., "bench": ...}.
#
# Offline machines (no package index): put wheels in a folder and name it in
# KVSHIP_WHEELS (default .whl); pip then installs from there only.
# Without a CUDA device it stops at once, exit code 2, saying so.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${KVSHIP_WHEELS:-.whl}
LOG=${KVSHIP_GPU_LOG:-/tmp/kvship-gpu-check.log}
: >"$LOG"

fail() {  # fail <exit code> <message>: one JSON line, nothing else to guess from
    "$PYTHON" -c 'import json,sys; print(json.dumps({"ok": False, "error": sys.argv[1], "log": sys.argv[2]}))' "$2" "$LOG"
    echo "gpu_check: $2" >&2
    exit "$1"
}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >>"$LOG" 2>&1; then
    fail 2 "no CUDA device here (nvidia-smi finds none): run this on a GPU machine"
fi
GPU=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)
CUDA_MAJOR=$(nvidia-smi | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p' | head -1)

pip_install() {  # from the index, or from $WHEELS only where that folder exists
    if [ -d "$WHEELS" ]; then
        .venv-gpu/bin/pip install -q --no-index --find-links "$WHEELS" "$@" >>"$LOG" 2>&1
    else
        .venv-gpu/bin/pip install -q "$@" >>"$LOG" 2>&1
    fi
}

if [ ! -x .venv-gpu/bin/python ]; then
    "$PYTHON" -m venv --system-site-packages .venv-gpu >>"$LOG" 2>&1 || fail 1 "cannot make .venv-gpu"
fi
pip_install -e '.[test]' || pip_install --no-deps -e . || fail 1 "cannot install kvship"
.venv-gpu/bin/python -c 'import pytest, pytest_asyncio, hypothesis, zstandard, uvloop, aiohttp' \
    >>"$LOG" 2>&1 || fail 1 "missing test or runtime dependencies (see the log; offline: put wheels in $WHEELS)"
if ! .venv-gpu/bin/python -c 'import cupy; assert cupy.cuda.runtime.getDeviceCount() > 0' >>"$LOG" 2>&1; then
    pip_install "cupy-cuda${CUDA_MAJOR:-12}x" || fail 1 "no usable CuPy and none installable for CUDA ${CUDA_MAJOR:-?}"
    .venv-gpu/bin/python -c 'import cupy; assert cupy.cuda.runtime.getDeviceCount() > 0' >>"$LOG" 2>&1 \
        || fail 1 "cupy-cuda${CUDA_MAJOR:-12}x installed but it sees no CUDA device (see the log)"
fi

# The gpu tests must run, not skip: -rs lists skips, and a skipped gpu test fails the check.
timeout 180 .venv-gpu/bin/python -m pytest -q -rs -p no:cacheprovider \
    tests/test_gpu_staging.py tests/test_staged_puts.py tests/test_staging_copies.py \
    >"$LOG.pytest" 2>&1
TESTS_RC=$?
cat "$LOG.pytest" >>"$LOG"
SUMMARY=$(tail -1 "$LOG.pytest")
SKIPPED_GPU=$(grep -c "SKIPPED.*test_gpu_staging" "$LOG.pytest" || true)

BENCH=$(timeout 120 .venv-gpu/bin/python tools/bench_gpu.py --json 2>>"$LOG" | tail -1)
BENCH_RC=$?
[ -n "$BENCH" ] || BENCH=null

"$PYTHON" - "$GPU" "$TESTS_RC" "$SUMMARY" "$SKIPPED_GPU" "$BENCH_RC" "$BENCH" "$LOG" <<'EOF'
import json, sys
gpu, tests_rc, summary, skipped, bench_rc, bench, log = sys.argv[1:]
bench = json.loads(bench) if bench.startswith("{") else None
ok = tests_rc == "0" and skipped == "0" and bench_rc == "0" and bench is not None
print(json.dumps({
    "ok": ok,
    "gpu": gpu,
    "tests": {"exit_code": int(tests_rc), "summary": summary, "gpu_tests_skipped": int(skipped)},
    "bench": bench,
    "log": log,
}))
sys.exit(0 if ok else 1)
EOF
