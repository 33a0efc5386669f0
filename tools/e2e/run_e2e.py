#!/usr/bin/env python3
"""``make e2e``: disaggregated prefill -> decode of a real model through kvship, in vLLM.

Two kvshipd (prefill, decode) and two vLLM CPU engines (producer, consumer; one core each)
run at once. Each prompt (a short one, a long one, a second long one sharing most of its
prefix) is prefilled by the producer (``max_tokens=1``), its KV shipped layer by layer
through the daemons, and decoded by the consumer, which loads the pages and computes only
the last prompt token. The same prompts run on the consumer alone (its prefix cache kept
apart with a ``cache_salt``): the greedy tokens must be identical. Then the bad inputs: a
transfer that never arrives, a layout from a producer with another block size, a transfer
cut off half way, and a dead decode daemon; each request must come back within a bound,
recomputed (``kv_load_failure_policy=recompute``) with the same tokens, a log line naming
the cause, while the engine keeps serving.

The last stdout line is one JSON object (docs/engines.md lists its fields); exit status 1
when a target is missed. A CPU engine shows the shape of the TTFT figures, not production
numbers.

    python tools/e2e/run_e2e.py --model build/e2e/smollm2-135m-fp32 --workdir build/e2e/run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvship import Client
from kvship.bench.spawn import DaemonProcess
from kvship.errors import KvshipError
from kvship.layout import uniform_layout

MAX_TOKENS = 24
LAYER_TIMEOUT_S = 4.0
LOAD_TIMEOUT_S = 20.0
FAILURE_BOUND_S = 45.0  # a failed load, recomputed, answers within this


# ----------------------------------------------------------------------------- prompts
def prompts(tokenizer: Any) -> dict[str, list[int]]:
    """A short chat turn; a ~1.5K-token document + question; the same document + another
    question (shares all but its last few dozen tokens with the first)."""
    from pydoc_data.topics import topics

    doc = "\n\n".join(topics[t].strip() for t in ("with", "try", "exceptions", "import", "for"))
    doc_ids = tokenizer(doc)["input_ids"][:1400]
    head = tokenizer("Reference:\n")["input_ids"]

    def ask(question: str) -> list[int]:
        return head + doc_ids + tokenizer("\n\nQuestion: " + question + "\nAnswer:")["input_ids"]

    return {
        "short": tokenizer("The three primary colours are")["input_ids"],
        "long": ask("how does the with statement interact with exceptions?"),
        "long_shared": ask("what does the import statement do first?"),
    }


# ----------------------------------------------------------------------------- engines
@dataclass
class Engine:
    name: str
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(
        self, model: Path, role: str, core: int, workdir: Path, extra_args: list[str]
    ) -> None:
        transfer = {
            "kv_connector": "KvshipConnector",
            "kv_connector_module_path": "kvship.integrations.vllm",
            "kv_role": role,
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": self.extra,
        }
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": str(core),
            "VLLM_CACHE_ROOT": str(workdir / "vllm-cache"),
            "TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor-cache"),
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_LOGGING_LEVEL": "INFO",
        }
        args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--served-model-name", "smollm2",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
            "--seed", "0", "--max-num-seqs", "4",
            "--kv-transfer-config", json.dumps(transfer), *extra_args,
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM {self.name} exited: {self.log_tail()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.base + "/health", timeout=2) as resp,
            ):
                if resp.status == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"vLLM {self.name} not ready in time: {self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def complete(
        self,
        prompt: list[int],
        max_tokens: int,
        timeout: float = 120.0,
        stream: bool = True,
        **extra: Any,
    ) -> tuple[dict[str, Any], float | None, float]:
        """One greedy completion: (tokens, text, kv_transfer_params; TTFT s; total s).
        Streamed to time the first token; vLLM returns kv_transfer_params unstreamed only."""
        body = {
            "model": "smollm2",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": stream,
            "return_token_ids": True,
            **extra,
        }
        out = post(self.base + "/v1/completions", body, timeout, stream)
        if out["status"] != 200:
            raise RuntimeError(f"vLLM {self.name}: HTTP {out['status']}: {out.get('answer')}")
        return out, out["ttft_s"], out["seconds"]


def post(url: str, body: Any, timeout: float = 180.0, stream: bool = False) -> dict[str, Any]:
    """One OpenAI-style request: tokens, text, kv_transfer_params, status, headers; streamed
    ones timed to their first token (``ttft_s``). Never raises for HTTP."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    out: dict[str, Any] = {"tokens": [], "text": "", "ttft_s": None, "headers": {}, "params": None}
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            out["status"], out["headers"] = resp.status, dict(resp.headers)
            if not stream:
                answer = json.loads(resp.read())
                out["answer"] = answer
                out["params"] = answer.get("kv_transfer_params")
                for choice in answer.get("choices", []):
                    out["tokens"] += choice.get("token_ids") or []
                    out["text"] += (
                        choice.get("text") or (choice.get("message") or {}).get("content") or ""
                    )
            else:
                for raw in resp:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    for choice in json.loads(line[6:]).get("choices", []):
                        piece = choice.get("text") or (choice.get("delta") or {}).get("content")
                        if (piece or choice.get("token_ids")) and out["ttft_s"] is None:
                            out["ttft_s"] = time.perf_counter() - started
                        out["tokens"] += choice.get("token_ids") or []
                        out["text"] += piece or ""
    except urllib.error.HTTPError as exc:
        out["status"], out["headers"] = exc.code, dict(exc.headers)
        out["answer"] = exc.read().decode(errors="replace")
    except OSError as exc:
        out["status"], out["answer"] = 0, f"{type(exc).__name__}: {exc}"
    out["seconds"] = time.perf_counter() - started
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- checks
def stats(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def event(path: Path, kind: str, key: str, timeout: float = 30.0) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in stats(path):
            if e["event"] == kind and e.get("key") == key:
                return e
        time.sleep(0.1)
    return None


async def send_foreign(
    daemon: DaemonProcess, peer: str, key: str, tokens: list[int], block: int, cut: bool
) -> None:
    """A transfer as another producer would send it: pages of ``block`` tokens (a layout
    mismatch when that is not the consumer's), or cut off after a third of its layers."""
    n_pages = -(-len(tokens) // block)
    layout = uniform_layout(30, "float32", (n_pages, 3, block, 128))
    rng = np.random.default_rng(0)
    async with Client(daemon.socket_path) as client:
        sender = await client.send(key, layout, peer=peer, token_ids=tokens)
        try:
            for i in range(30):
                await sender.put(i, rng.standard_normal(layout[i].shape, np.float32))
                if cut and i == 9:
                    await asyncio.sleep(1.0)  # the consumer holds ten layers now
                    await sender.abort()
                    return
            await sender.finish(timeout=30)
        finally:
            await sender.__aexit__(None, None, None)


@contextlib.contextmanager
def background(fn: Any, *args: Any) -> Iterator[dict[str, Any]]:
    """Run ``fn(*args)`` in a thread; the dict gets its result or error at exit."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn(*args)
        except Exception as exc:  # reported by the caller
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        thread.join(FAILURE_BOUND_S + 30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--port", type=int, default=0, help="producer's (consumer: +1); 0: free ports")
    args = ap.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    stats_path = work / "kvship-stats.jsonl"
    stats_path.unlink(missing_ok=True)
    started = time.monotonic()
    pressure_at_start = pressure()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    asks = prompts(tokenizer)

    prefill = DaemonProcess("prefill", work).start()
    try:
        decode = DaemonProcess("decode", work, ["--staging-bytes", str(256 << 20)]).start()
    except BaseException:
        prefill.stop()
        raise
    common = {
        "stats_path": str(stats_path),
        "layer_timeout_s": LAYER_TIMEOUT_S,
        "load_timeout_s": LOAD_TIMEOUT_S,
    }
    producer = Engine(
        "producer",
        args.port or free_port(),
        work / "vllm-producer.log",
        extra={**common, "engine_socket": prefill.socket_path, "peer": decode.peer},
    )
    consumer = Engine(
        "consumer",
        args.port + 1 if args.port else free_port(),
        work / "vllm-consumer.log",
        extra={**common, "engine_socket": decode.socket_path},
    )
    report: dict[str, Any] = {"prompt_tokens": {k: len(v) for k, v in asks.items()}}
    failures: list[str] = []
    try:
        # The producer prefills long prompts in chunks of 512 tokens (chunked prefill: the
        # layers go out in the step that completes the prompt).
        producer.start(args.model, "kv_producer", 0, work, ["--max-num-batched-tokens", "512"])
        consumer.start(args.model, "kv_consumer", 1, work, [])
        deadline = time.monotonic() + 300
        producer.wait_ready(deadline)
        consumer.wait_ready(deadline)
        report["engines_ready_s"] = round(time.monotonic() - started, 1)
        for engine in (producer, consumer):  # first requests warm the engines up
            engine.complete(asks["short"], 2, cache_salt="warmup")
        # ... and one disaggregated request warms kvship's pooled connections and arenas.
        warm, _, _ = producer.complete(
            asks["short"][:-1], 1, stream=False, kv_transfer_params={"do_remote_decode": True}
        )
        consumer.complete(asks["short"][:-1], 2, kv_transfer_params=warm["params"])

        single: dict[str, list[int]] = {}
        ttft_single: dict[str, float | None] = {}
        for name, ids in asks.items():
            out, ttft, _ = consumer.complete(ids, MAX_TOKENS, cache_salt=f"single-{name}")
            single[name], ttft_single[name] = out["tokens"], ttft

        identical: dict[str, bool] = {}
        ttft_disagg: dict[str, float] = {}
        wire: dict[str, int] = {}
        layers_before_end: dict[str, int] = {}
        timelines: dict[str, Any] = {}
        ttft_parts: dict[str, Any] = {}
        computed_on_decode: dict[str, int] = {}
        errors: dict[str, dict[str, str | None]] = {}
        for name, ids in asks.items():
            key = f"e2e-{name}"
            before = prefill.metric("kvship_wire_sent_bytes")
            t0 = time.perf_counter()
            pre, _, _ = producer.complete(
                ids,
                1,
                stream=False,
                kv_transfer_params={"do_remote_decode": True, "kvship_request": key},
            )
            params = pre["params"]
            if not params or params.get("kvship_request") != key:
                failures.append(f"{name}: the producer returned no kvship params: {params}")
                continue
            t1 = time.perf_counter()
            out, ttft, _ = consumer.complete(ids, MAX_TOKENS, kv_transfer_params=params)
            # From the producer request's start to the consumer's first token: prefill,
            # transfer, load and the one token the consumer computes.
            ttft_disagg[name] = round(t1 - t0 + (ttft or float("nan")), 4)
            ttft_parts[name] = {
                "producer_s": round(t1 - t0, 4),
                "consumer_first_token_s": None if ttft is None else round(ttft, 4),
            }
            identical[name] = out["tokens"] == single[name]
            save = event(stats_path, "save", key)
            consume = event(stats_path, "consume", key)
            load = event(stats_path, "load", key, timeout=1)
            errors[name] = {
                "save": "no save event" if save is None else save["error"],
                "load": "no load event" if load is None else load["error"],
            }
            wire[name] = int(prefill.metric("kvship_wire_sent_bytes") - before)
            layers_before_end[name] = -1 if save is None else save["layers_put_before_prefill_end"]
            timelines[name] = None if save is None else save["timeline_ms"]
            computed_on_decode[name] = -1 if consume is None else consume["computed_prompt_tokens"]
            if not identical[name]:
                failures.append(f"{name}: tokens differ: {out['tokens']} vs {single[name]}")
        report.update(
            tokens_identical=bool(identical) and all(identical.values()) and len(identical) == 3,
            tokens_identical_by_prompt=identical,
            ttft_disaggregated_s=ttft_disagg,
            ttft_disaggregated_parts=ttft_parts,
            ttft_single_s={k: None if v is None else round(v, 4) for k, v in ttft_single.items()},
            wire_bytes=wire,
            second_prompt_wire_bytes=wire.get("long_shared"),
            second_prompt_wire_ratio=(
                round(wire["long_shared"] / wire["long"], 4)
                if wire.get("long") and "long_shared" in wire
                else None
            ),
            layers_sent_before_prefill_end=layers_before_end,
            save_timeline_ms=timelines,
            transfer_errors=errors,
            computed_prompt_tokens_on_decode=computed_on_decode,
            prefill_skipped_on_decode=bool(computed_on_decode)
            and all(0 <= v <= 1 for v in computed_on_decode.values()),
        )
        report["bad_input"] = bad_inputs(
            asks, single, producer, consumer, prefill, decode, stats_path
        )
    except Exception as exc:
        failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        for engine in (producer, consumer):
            engine.stop()
        for daemon in (prefill, decode):
            daemon.stop()

    def explain(report: dict[str, Any]) -> None:  # a failed CI run explained from its log
        report["daemon_warnings"] = {
            d.name: warnings(d.log_path, last=80) for d in (prefill, decode)
        }
        report["pressure_stalled_s"] = pressure_since(pressure_at_start)
        report["engine_warnings"] = {
            e.name: warnings(e.log_path, only="kvship") for e in (producer, consumer)
        }

    return finish(report, failures, started, check, explain)


def warnings(log_path: Path | None, last: int = 40, only: str = "") -> list[str]:
    """A log's last WARNING / ERROR lines (with any traceback lines), those naming
    ``only`` when given."""
    if log_path is None or not log_path.exists():
        return []
    lines = log_path.read_text(errors="replace").splitlines()
    quiet = re.compile(r"\b(INFO|DEBUG)\b")
    keep = [line[:400] for line in lines if only in line and not quiet.search(line[:60])]
    return keep[-last:]


def pressure() -> dict[str, float]:
    """The kernel's pressure-stall totals (PSI, seconds): how long tasks waited for CPU,
    memory or I/O, machine-wide; {} where /proc/pressure is absent."""
    totals: dict[str, float] = {}
    for resource in ("cpu", "memory", "io"):
        try:
            text = Path(f"/proc/pressure/{resource}").read_text()
        except OSError:
            continue
        for line in text.splitlines():  # "some avg10=0.00 avg60=0.00 avg300=0.00 total=123"
            kind, *fields = line.split()
            total = dict(f.split("=") for f in fields)["total"]
            totals[f"{resource}_{kind}"] = int(total) / 1e6
    return totals


def pressure_since(start: dict[str, float]) -> dict[str, float]:
    """What each PSI total grew by since ``start``: seconds some (or all) tasks stalled."""
    return {k: round(v - start.get(k, 0.0), 2) for k, v in pressure().items()}


def finish(
    report: dict[str, Any],
    failures: list[str],
    started: float,
    check: Callable[[dict[str, Any], list[str]], None],
    explain: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Check the targets (``explain`` adds what tells why, when one is missed), print the
    report as the last line; the exit status."""
    report["seconds"] = round(time.monotonic() - started, 1)
    check(report, failures)
    if failures and explain is not None:
        explain(report)
    report["failures"] = failures
    report["ok"] = not failures
    print(json.dumps(report))
    return 0 if not failures else 1


def bad_inputs(
    asks: dict[str, list[int]],
    single: dict[str, list[int]],
    producer: Engine,
    consumer: Engine,
    prefill: DaemonProcess,
    decode: DaemonProcess,
    stats_path: Path,
) -> dict[str, Any]:
    """Each failure: the request comes back recomputed (same tokens) within the bound,
    the consumer's log names the cause, and a plain request served meanwhile."""
    ids = asks["short"]
    results: dict[str, Any] = {}

    def remote(key: str) -> dict[str, Any]:
        params = {"do_remote_prefill": True, "kvship_request": key}
        t0 = time.perf_counter()
        out, _, _ = consumer.complete(
            ids, MAX_TOKENS, timeout=FAILURE_BOUND_S + 30, kv_transfer_params=params
        )
        out["seconds"] = time.perf_counter() - t0
        return out

    def case(name: str, key: str, cause: str, during: Any = None) -> None:
        log_before = len(consumer.log_text())
        with background(remote, key) as box:
            if during is not None:
                during()
            plain, _, _ = consumer.complete(asks["short"], 4, cache_salt=f"plain-{name}")
        log = consumer.log_text()[log_before:]
        out = box.get("result")
        load = event(stats_path, "load", key, timeout=5)
        results[name] = {
            "error": None if load is None else load["error"],
            "seconds": None if out is None else round(out["seconds"], 2),
            "recomputed_tokens_identical": out is not None and out["tokens"] == single["short"],
            "cause_logged": cause in log and "did not load" in log,
            "other_request_served": len(plain["tokens"]) == 4,
            "exception": repr(box["error"]) if "error" in box else None,
        }

    case("never_arrives", "e2e-missing", "RequestNotFound")

    def mismatch() -> None:
        # The consumer refuses it and leaves: this sender's transfer ends CANCELLED.
        with contextlib.suppress(KvshipError):
            asyncio.run(send_foreign(prefill, decode.peer, "e2e-mismatch", ids, 64, cut=False))

    case("layout_mismatch", "e2e-mismatch", "LayoutMismatch", mismatch)

    def truncate() -> None:
        time.sleep(0.5)  # the consumer subscribes first, then gets a third of the layers
        asyncio.run(send_foreign(prefill, decode.peer, "e2e-cut", ids, 128, cut=True))

    case("truncated", "e2e-cut", "TransferError", truncate)
    decode.stop()  # the decode daemon dies (SIGTERM, then SIGKILL)
    case("dead_daemon", "e2e-dead", "DaemonUnavailable")
    return results


def check(report: dict[str, Any], failures: list[str]) -> None:
    if report.get("tokens_identical") is not True:
        failures.append("tokens_identical is not true")
    if report.get("prefill_skipped_on_decode") is not True:
        failures.append(f"prefill not skipped: {report.get('computed_prompt_tokens_on_decode')}")
    ratio = report.get("second_prompt_wire_ratio")
    if ratio is None or ratio > 0.25:
        failures.append(f"second prompt shipped {ratio} of the first's bytes (target <= 0.25)")
    layers = report.get("layers_sent_before_prefill_end") or {}
    if not layers or min(layers.values()) < 1:
        failures.append(f"no layer-wise pipelining seen: {layers}")
    for name, r in (report.get("bad_input") or {}).items():
        bad = [
            k
            for k in ("recomputed_tokens_identical", "cause_logged", "other_request_served")
            if not r.get(k)
        ]
        if r.get("seconds") is None or r["seconds"] > FAILURE_BOUND_S:
            bad.append(f"seconds={r.get('seconds')}")
        if bad:
            failures.append(f"bad input {name}: {bad} ({r})")


if __name__ == "__main__":
    sys.exit(main())
