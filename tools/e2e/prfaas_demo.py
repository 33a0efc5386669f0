#!/usr/bin/env python3
"""``make prfaas-demo``: Prefill-as-a-Service for real, on this machine.

Two kvshipd ("remote" prefill cluster, "local" decode cluster) with a capped link between
them, one remote prefill vLLM (``kv_producer``), one local vLLM (``kv_both``) and
``kvship proxy`` in front. A seeded mix of short and long prompts (long ones share a few
documents' prefixes) goes through the proxy in two phases: with a roomy link cap, then with
the cap lowered so far that a long prompt's KV would wait on the link past the router's
bound. Every output is checked against a plain single-server run; then the proxy's overhead
is measured against calling the local server directly, and the bad inputs (malformed,
larger than the context, the local kvshipd down, the remote server down, the local server
down). The last stdout line is one JSON object (docs/prfaas.md lists its fields); exit
status 1 when a target is missed.

    python tools/e2e/prfaas_demo.py --model build/e2e/smollm2-135m-fp32 --workdir build/e2e/prfaas
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from run_e2e import Engine, finish, free_port, post

from kvship.bench.spawn import DaemonProcess, metric_sum
from kvship.integrations.paged import PagedGeometry

THRESHOLD = 512  # tokens: the scaled-down case-study threshold
MAX_LINK_WAIT_S = 3.0
CAP_BEFORE, CAP_AFTER, BURST = "400MB/s", "8MB/s", "2MiB"
SETTLE_S = 1.0  # after a cap change, windows are not judged for this long
MAX_TOKENS = 8
RESTORE_LONG = 3  # long prompts sent after the cap is raised again
SMOLLM2 = PagedGeometry("smollm2", 30, 128, 3, 64, "float32", (3, 128, 128))


# ----------------------------------------------------------------------------- workload
@dataclass
class Ask:
    index: int
    kind: str  # "short", "long", "chat"
    path: str
    body: dict[str, Any]
    prompt_tokens: int
    phase: int = 0
    route: str = ""
    reason: str = ""
    status: int = 0
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    ttft_s: float | None = None
    seconds: float = 0.0
    error: str | None = None
    identical: bool | None = None  # equal to a plain single-server run


def workload(tokenizer: Any, n: int, seed: int) -> list[Ask]:
    """Seeded: ~60 % short text prompts (some as chats), ~40 % long ones: a document of
    900-1,300 tokens and a question. The first half (before the cap drops) draws its
    documents from 0-3, the second from 2-7: some long prompts share a prefix already
    shipped, others are new."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    names = sorted(topics)
    docs: list[list[int]] = []
    cursor = 0
    for length in (900, 1000, 1100, 1200, 1300, 950, 1050, 1150):
        ids: list[int] = []
        while len(ids) < length:  # whole topics, in order, until the length is reached
            ids += tokenizer(topics[names[cursor % len(names)]].strip() + "\n\n")["input_ids"]
            cursor += 1
        docs.append(ids[:length])
    questions = [
        "What is this about?",
        "Summarise the first rule.",
        "Give one example.",
        "Which keyword matters most?",
        "Explain it to a beginner.",
    ]
    asks: list[Ask] = []
    for i in range(n):
        draw = rng.random()
        if draw < 0.4:
            pool = docs[:4] if i < n // 2 else docs[2:]
            question = tokenizer("\n\nQ: " + rng.choice(questions) + "\nA:")["input_ids"]
            ids = rng.choice(pool) + question
            asks.append(Ask(i, "long", "/v1/completions", {"prompt": ids}, len(ids)))
        elif draw < 0.5:
            topic = topics[rng.choice(names)].strip()[: rng.randint(80, 400)]
            messages = [{"role": "user", "content": "Explain briefly: " + topic}]
            asks.append(Ask(i, "chat", "/v1/chat/completions", {"messages": messages}, 0))
        else:
            text = topics[rng.choice(names)].strip()[: rng.randint(60, 900)]
            asks.append(Ask(i, "short", "/v1/completions", {"prompt": text}, 0))
    # Phase 3, once the cap is back: long prompts whose KV the local side never received.
    restore = tokenizer("\n\nQ: In one sentence, what is new here?\nA:")["input_ids"]
    for k, doc in enumerate(docs[-RESTORE_LONG:]):
        if k == RESTORE_LONG - 1:  # the last as a chat: the remote path of /v1/chat/completions
            text = tokenizer.decode(doc) + "\n\nIn one sentence, what is new here?"
            messages = [{"role": "user", "content": text}]
            asks.append(Ask(n + k, "long", "/v1/chat/completions", {"messages": messages}, 0))
        else:
            body = {"prompt": doc + restore}
            asks.append(Ask(n + k, "long", "/v1/completions", body, len(doc) + len(restore)))
    for ask in asks:
        ask.body.update(
            model="smollm2", max_tokens=MAX_TOKENS, temperature=0.0, return_token_ids=True
        )
    return asks


# ----------------------------------------------------------------------------- http
def put_cap(daemon: DaemonProcess, peer: str, rate: str) -> None:
    req = urllib.request.Request(
        daemon.url(f"/v1/links/{peer}"),
        data=json.dumps({"rate": rate, "burst": BURST}).encode(),
        method="PUT",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200, resp.status


class EgressWatch:
    """Samples the remote daemon's peer-link bytes (and the bytes queued for the link) every
    100 ms, with the cap in force."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.samples: list[tuple[float, float, float]] = []  # (t, bytes, cap bytes/s)
        self.queue_s: list[float] = []  # the link's queued bytes / the cap in force
        self.cap = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, cap: float) -> None:
        self.cap = cap
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            cap, before = self.cap, time.monotonic()
            try:
                text = self.daemon.metrics_text()
            except OSError:
                continue
            sent = metric_sum(text, "kvship_wire_sent_bytes")
            queued = metric_sum(text, "kvship_link_queued_bytes")
            # The counter was read somewhere within the scrape (slow on a loaded machine):
            # its midpoint, and the cap in force for the whole scrape, or none.
            if self.cap == cap:
                self.samples.append(((before + time.monotonic()) / 2, sent, cap))
                self.queue_s.append(queued / cap)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def peak_vs_cap(self, burst: float) -> float:
        """The busiest 1 s window's bytes against (cap x 1 s + burst), over windows in
        which one cap was in force throughout, from SETTLE_S after a change on (a window
        across a change has no single bound: the old cap's chunks may still be leaving)."""
        changes = [
            t
            for (t, _, c), (_, _, prev) in zip(self.samples[1:], self.samples[:-1], strict=True)
            if c != prev
        ]
        worst = 0.0
        for i, (t0, b0, cap) in enumerate(self.samples):
            if any(t0 - SETTLE_S < t <= t0 for t in changes):
                continue  # chunks let through at the old rate may still be leaving
            for t1, b1, cap1 in self.samples[i + 1 :]:
                if cap1 != cap:
                    break
                if t1 - t0 >= 1.0:
                    worst = max(worst, (b1 - b0) / (cap * (t1 - t0) + burst))
                    break
        return round(worst, 4)


def parse_rate(text: str) -> float:
    from kvship.ratelimit.rates import parse_rate as parse

    return parse(text)


# ----------------------------------------------------------------------------- the run
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=24, help="in two phases (+3 after)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--concurrency", type=int, default=2)
    args = ap.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    stats_path = work / "kvship-stats.jsonl"
    stats_path.unlink(missing_ok=True)
    started = time.monotonic()

    from transformers import AutoTokenizer

    asks = workload(AutoTokenizer.from_pretrained(args.model), args.requests, args.seed)
    layout_path = work / "smollm2-layout.json"
    layout_path.write_text(SMOLLM2.model.to_json())

    # The local (decode) daemon first: the remote one keeps a warm link to it (``peers``).
    local_d = DaemonProcess("local", work, ["--staging-bytes", str(256 << 20)]).start()
    remote_d = DaemonProcess("remote", work, ["--peers", local_d.peer])
    proxy: subprocess.Popen[bytes] | None = None
    failures: list[str] = []
    report: dict[str, Any] = {"requests": len(asks)}
    engines: list[Engine] = []
    watch = EgressWatch(remote_d)
    try:
        remote_d.start()
        put_cap(remote_d, local_d.peer, CAP_BEFORE)
        common = {"stats_path": str(stats_path), "layer_timeout_s": 5.0}
        remote = Engine(
            "remote",
            free_port(),
            work / "vllm-remote.log",
            extra={**common, "engine_socket": remote_d.socket_path, "peer": local_d.peer},
        )
        local = Engine(
            "local",
            free_port(),
            work / "vllm-local.log",
            extra={**common, "engine_socket": local_d.socket_path},
        )
        engines = [remote, local]
        remote.start(args.model, "kv_producer", 0, work, [])
        local.start(args.model, "kv_both", 1, work, [])
        ready_file = work / "proxy.ready"
        ready_file.unlink(missing_ok=True)
        proxy_log = open(work / "proxy.log", "wb")  # noqa: SIM115 - the child keeps it
        proxy = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvship.cli.main",
                "proxy",
                "--listen",
                "127.0.0.1:0",
                "--local",
                local.base,
                "--remote",
                remote.base,
                "--link-control",
                remote_d.addresses["control"],
                "--link-peer",
                local_d.peer,
                "--local-control",
                local_d.addresses["control"],
                "--layout",
                str(layout_path),
                "--threshold-tokens",
                str(THRESHOLD),
                "--max-link-wait-s",
                str(MAX_LINK_WAIT_S),
                "--ready-file",
                str(ready_file),
            ],
            stdout=proxy_log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        remote.wait_ready(deadline)
        local.wait_ready(deadline)
        while not ready_file.exists():
            if proxy.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"proxy did not start: {(work / 'proxy.log').read_text()}")
            time.sleep(0.1)
        base = "http://" + json.loads(ready_file.read_text())["listen"]
        wait_healthy(base, deadline)
        report["engines_ready_s"] = round(time.monotonic() - started, 1)
        for engine in engines:  # warm-up, kept out of every prefix cache
            body = {"model": "smollm2", "prompt": "Hello", "max_tokens": 2, "cache_salt": "w"}
            post(engine.base + "/v1/completions", body)
        # One disaggregated request warms both engines' kvship paths (the peer link itself
        # is up already: the remote daemon keeps it warm).
        warm = {"model": "smollm2", "prompt": "Hi there", "max_tokens": 1, "cache_salt": "w2"}
        params = post(
            remote.base + "/v1/completions",
            {**warm, "kv_transfer_params": {"do_remote_decode": True}},
        )["params"]
        post(local.base + "/v1/completions", {**warm, "kv_transfer_params": params})
        time.sleep(0.5)  # the proxy reads the link's figures (every 0.25 s)

        watch.start(parse_rate(CAP_BEFORE))
        half = args.requests // 2
        run_phase(base, asks[:half], 1, args.concurrency)
        put_cap(remote_d, local_d.peer, CAP_AFTER)  # the link gets 50x narrower
        watch.cap = parse_rate(CAP_AFTER)
        time.sleep(1.0)  # the proxy reads the new figures (every 0.25 s)
        run_phase(base, asks[half : args.requests], 2, args.concurrency)
        put_cap(remote_d, local_d.peer, CAP_BEFORE)  # and back
        watch.cap = parse_rate(CAP_BEFORE)
        time.sleep(1.0)
        run_phase(base, asks[args.requests :], 3, args.concurrency)
        watch.stop()

        baseline(local, asks)
        report.update(summarise(asks, stats_path))
        report["egress_peak_vs_cap"] = watch.peak_vs_cap(parse_rate(BURST))
        report["link_queue_max_s"] = round(max(watch.queue_s, default=0.0), 3)
        report["proxy_overhead"] = overhead(base, local.base)
        report["proxy_route_metrics"] = route_metrics(base)
        report["bad_input"] = bad_inputs(base, asks, local, remote, local_d, engines)
    except Exception as exc:
        failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        watch.stop()
        if proxy is not None and proxy.poll() is None:
            proxy.terminate()
            try:
                proxy.wait(10)
            except subprocess.TimeoutExpired:
                proxy.kill()
        for engine in engines:
            engine.stop()
        for daemon in (remote_d, local_d):
            daemon.stop()
    return finish(report, failures, started, check)


def wait_healthy(base: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=2) as resp:
                body = json.loads(resp.read())
            if body["ok"] and all(m["healthy"] for m in body["remote"]):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError("the proxy never saw both servers healthy")


def run_phase(base: str, asks: list[Ask], phase: int, concurrency: int) -> None:
    def one(ask: Ask) -> None:
        ask.phase = phase
        out = post(base + ask.path, {**ask.body, "stream": True}, stream=True)
        ask.status, ask.tokens, ask.text = out["status"], out["tokens"], out["text"]
        ask.ttft_s, ask.seconds = out["ttft_s"], out["seconds"]
        ask.route = out["headers"].get("X-Kvship-Route", "")
        ask.reason = out["headers"].get("X-Kvship-Route-Reason", "")
        if out["status"] != 200:
            ask.error = str(out.get("answer"))[:300]

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, asks))


def baseline(local: Engine, asks: list[Ask]) -> None:
    """Each request alone on the local server, its prefix cache kept apart."""
    for ask in asks:
        body = {**ask.body, "cache_salt": f"baseline-{ask.index}", "stream": False}
        out = post(local.base + ask.path, body)
        same_tokens = out["tokens"] == ask.tokens if ask.tokens else True
        ask.identical = out["status"] == 200 and same_tokens and out["text"] == ask.text


def summarise(asks: list[Ask], stats_path: Path) -> dict[str, Any]:
    def share(phase: int) -> float | None:
        long = [a for a in asks if a.phase == phase and a.kind == "long"]
        return round(sum(a.route == "remote" for a in long) / len(long), 3) if long else None

    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        values = sorted(values)
        return round(values[min(len(values) - 1, int(q * len(values)))], 4)

    ttft: dict[str, Any] = {}
    for path in ("local", "remote"):
        values = [a.ttft_s for a in asks if a.route == path and a.ttft_s is not None]
        ttft[path] = {"n": len(values), "p50_s": pct(values, 0.5), "p90_s": pct(values, 0.9)}
        longs = [a.ttft_s for a in asks if a.route == path and a.kind == "long" and a.ttft_s]
        ttft["long_" + path] = {"n": len(longs), "p50_s": pct(longs, 0.5), "p90_s": pct(longs, 0.9)}
    lines = stats_path.read_text().splitlines() if stats_path.exists() else []
    saves = [json.loads(line) for line in lines if '"event": "save"' in line]
    acked = [
        s for s in saves if s["error"] is None and s["timeline_ms"]["acknowledged"] is not None
    ]

    def link_wait(save: dict[str, Any]) -> float:
        return (save["timeline_ms"]["acknowledged"] - save["timeline_ms"]["last_layer_put"]) / 1000

    slowest = max(acked, key=link_wait, default=None)
    return {
        "routed_remote": sum(a.route == "remote" for a in asks),
        "routed_local": sum(a.route == "local" for a in asks),
        "failed": [
            {"index": a.index, "status": a.status, "error": a.error}
            for a in asks
            if a.status != 200
        ],
        "outputs_identical": all(a.identical for a in asks),
        "not_identical": [a.index for a in asks if not a.identical],
        "ttft_p50_s": {k: v["p50_s"] for k, v in ttft.items()},
        "ttft_p90_s": {k: v["p90_s"] for k, v in ttft.items()},
        "ttft_n": {k: v["n"] for k, v in ttft.items()},
        "remote_share_before_drop": share(1),
        "remote_share_after_drop": share(2),
        "remote_share_after_restore": share(3),
        "link_wait_max_s": None if slowest is None else round(link_wait(slowest), 3),
        "link_wait_bound_s": MAX_LINK_WAIT_S,
        "link_wait_slowest": None
        if slowest is None
        else {k: slowest.get(k) for k in ("key", "payload_bytes", "seconds", "timeline_ms")},
        "routes": [
            {
                "i": a.index,
                "kind": a.kind,
                "tokens": a.prompt_tokens or None,
                "phase": a.phase,
                "route": a.route,
                "reason": a.reason[:160],
            }
            for a in asks
        ],
    }


def overhead(base: str, local: str, pairs: int = 20) -> dict[str, Any]:
    """A short local request via the proxy and straight to the server, alternating."""
    direct, proxied = [], []
    body = {"model": "smollm2", "prompt": "Name a colour:", "max_tokens": 1, "temperature": 0}
    for i in range(pairs + 2):
        a = post(local + "/v1/completions", body)["seconds"]
        b = post(base + "/v1/completions", body)["seconds"]
        if i >= 2:  # two warm-up pairs
            direct.append(a)
            proxied.append(b)
    diffs = [p - d for p, d in zip(proxied, direct, strict=True)]
    return {
        "pairs": pairs,
        "direct_ms_median": round(1000 * statistics.median(direct), 2),
        "proxy_ms_median": round(1000 * statistics.median(proxied), 2),
        "added_ms_median": round(1000 * statistics.median(diffs), 2),
    }


def route_metrics(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("kvship_route_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.removeprefix("kvship_route_total")] = float(value)
    return out


def bad_inputs(
    base: str,
    asks: list[Ask],
    local: Engine,
    remote: Engine,
    local_d: DaemonProcess,
    engines: list[Engine],
) -> dict[str, Any]:
    long = next(a for a in asks if a.kind == "long")
    results: dict[str, Any] = {}
    out = post(base + "/v1/completions", b"{not json")
    results["malformed"] = {"status": out["status"], "answer": str(out.get("answer"))[:200]}
    too_long = {"model": "smollm2", "prompt": [1] * 2100, "max_tokens": 4}
    out = post(base + "/v1/completions", too_long)
    results["beyond_context"] = {"status": out["status"], "answer": str(out.get("answer"))[:200]}

    def served(label: str, ask: Ask, salt: str) -> None:
        # A fresh salt keeps the local prefix cache out: the long prompt is routed as new.
        body = {**ask.body, "cache_salt": salt}
        out = post(base + ask.path, body)
        results[label] = {
            "status": out["status"],
            "route": out["headers"].get("X-Kvship-Route"),
            "reason": out["headers"].get("X-Kvship-Route-Reason", "")[:200],
            "tokens_identical": out["tokens"] == ask.tokens,
        }

    local_d.stop()  # the local kvshipd dies: the KV cannot arrive; the consumer recomputes
    time.sleep(0.5)
    served("local_kvshipd_down", long, "bad-1")
    remote.stop()  # the remote prefill server dies
    time.sleep(1.5)  # the proxy's health check notices (every 0.5 s)
    served("remote_server_down", long, "bad-2")
    local.stop()  # the local server dies: nothing can serve
    time.sleep(1.5)
    out = post(base + "/v1/completions", {"model": "smollm2", "prompt": "Hi", "max_tokens": 2})
    results["local_server_down"] = {"status": out["status"], "answer": str(out.get("answer"))[:200]}
    out = post(base + "/healthz", b"", timeout=5)  # a POST: 405 from a live proxy
    results["proxy_alive"] = out["status"] == 405
    return results


def check(report: dict[str, Any], failures: list[str]) -> None:
    if report.get("outputs_identical") is not True:
        failures.append(f"outputs differ for requests {report.get('not_identical')}")
    if report.get("failed"):
        failures.append(f"requests failed: {report['failed']}")
    peak = report.get("egress_peak_vs_cap")
    if peak is None or peak > 1.05:
        failures.append(f"egress_peak_vs_cap {peak} > 1.05")
    before, after = report.get("remote_share_before_drop"), report.get("remote_share_after_drop")
    if before is None or after is None or not after < before:
        failures.append(f"remote share did not fall: before {before}, after {after}")
    restored = report.get("remote_share_after_restore")
    if restored is None or after is None or not restored > after:
        failures.append(f"remote share did not come back: {after} -> {restored}")
    # The router's link budget bounds what the link queues (queued bytes / cap), checked
    # here. link_wait_max_s (last layer put -> ack) also holds the decode side's time to
    # claim the transfer (its engine's scheduling), which no link budget bounds: reported.
    queue = report.get("link_queue_max_s")
    if queue is None or queue > MAX_LINK_WAIT_S:
        failures.append(f"the link queued {queue} s of KV at its cap (bound {MAX_LINK_WAIT_S} s)")
    added = (report.get("proxy_overhead") or {}).get("added_ms_median")
    if added is None or added >= 5.0:
        failures.append(f"the proxy adds {added} ms median to a local request (target < 5)")
    bad = report.get("bad_input") or {}
    expect = {"malformed": 400, "beyond_context": 400, "local_server_down": 503}
    for name, status in expect.items():
        if (bad.get(name) or {}).get("status") != status:
            failures.append(f"bad input {name}: {bad.get(name)} (want HTTP {status})")
    for name in ("local_kvshipd_down", "remote_server_down"):
        r = bad.get(name) or {}
        if r.get("status") != 200 or not r.get("tokens_identical"):
            failures.append(f"bad input {name} was not served correctly: {r}")
    if bad and not bad.get("proxy_alive"):
        failures.append("the proxy stopped serving after the bad inputs")


if __name__ == "__main__":
    sys.exit(main())
