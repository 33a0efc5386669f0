"""``kvship bench``: ship N bytes of KV client -> kvshipd -> kvshipd -> client on loopback,
and measure the plain-uvloop baseline in the same run.

Every process is real: two daemons, a sending engine and a receiving engine (four
processes), and for the baseline two plain uvloop processes. Figures are medians over
``--repeat`` runs, baseline and kvship interleaved so both see the same machine noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..daemon.config import Config
from ..ratelimit import parse_burst, parse_rate
from ..units import parse_size
from .pki import Pki, make_pki
from .spawn import DaemonProcess

DEFAULT_BURST = Config().peer_burst

GIB = 1 << 30


def _run_json(args: list[str], timeout: float) -> Any:
    out = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} failed: {out.stderr.decode()[-2000:]}")
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def measure_baseline(total: int, chunk: int, workdir: Path) -> float:
    """Seconds for ``total`` bytes through one plain uvloop TCP hop."""
    port_file = workdir / f"baseline-{uuid.uuid4().hex}.port"
    cmd = [sys.executable, "-m", "kvship.bench.baseline"]
    recv = subprocess.Popen(
        [*cmd, "recv", "--bytes", str(total), "--port-file", str(port_file)],
        stdout=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text()):
            if time.monotonic() > deadline or recv.poll() is not None:
                raise RuntimeError("baseline receiver did not start")
            time.sleep(0.01)
        sent = _run_json(
            [
                *cmd,
                "send",
                "--bytes",
                str(total),
                "--port",
                port_file.read_text(),
                "--chunk-bytes",
                str(chunk),
            ],
            timeout=600,
        )
        out, _ = recv.communicate(timeout=600)
    finally:
        if recv.poll() is None:
            recv.kill()
    return float(json.loads(out.decode().strip())["t_end"]) - float(sent["t_start"])


def measure_kvship(
    opts: argparse.Namespace, workdir: Path, tls: Pki | None = None
) -> dict[str, Any]:
    daemon_args = [
        *(tls.flags() if tls else []),
        "--peer-rate",
        opts.rate,
        "--compression",
        opts.compress,
        "--connections-per-peer",
        str(opts.connections),
        "--log-level",
        "warning",
    ]
    a = DaemonProcess("prefill", workdir, daemon_args)
    b = DaemonProcess("decode", workdir, daemon_args)
    a.start()
    try:
        b.start()
        before = {"prefill": a.counters(), "decode": b.counters()}
        request_id = f"bench-{uuid.uuid4().hex[:12]}"
        common = [
            "--request-id",
            request_id,
            "--bytes",
            str(opts.bytes),
            "--layers",
            str(opts.layers),
            "--chunk-bytes",
            str(opts.chunk_bytes),
            "--arena-bytes",
            str(opts.arena_bytes),
            "--local-path",
            opts.local_path,
        ]
        worker = [sys.executable, "-m", "kvship.bench.workers"]
        recv = subprocess.Popen(
            [*worker, "recv", "--address", b.socket_path, *common], stdout=subprocess.PIPE
        )
        send_args = [*worker, "send", "--address", a.socket_path, "--peer", b.peer, *common]
        if opts.data:
            send_args += ["--data", opts.data]
        if opts.layer_interval_ms:
            send_args += ["--layer-interval-ms", str(opts.layer_interval_ms)]
        sampler = WireSampler(a) if parse_rate(opts.rate) != float("inf") else None
        try:
            sent = _run_json(send_args, timeout=900)
        finally:
            if sampler is not None:
                sampler.stop()
        out, _ = recv.communicate(timeout=120)
        if recv.returncode != 0:
            raise RuntimeError("receiving engine failed")
        got = json.loads(out.decode().strip().splitlines()[-1])
        daemons = {"prefill": a.counters() - before["prefill"]}
        daemons["decode"] = b.counters() - before["decode"]
        wire_bytes = a.metric("kvship_wire_sent_bytes")
        staged = b.metric("kvship_chunks_staged")
        rss = {"sender": a.peak_rss_mib(), "receiver": b.peak_rss_mib()}
    finally:
        a.stop()
        b.stop()
    seconds = got["t_last_layer"] - sent["t_first_put"]
    return {
        "seconds": seconds,
        "tail_lag_s": got["t_last_layer"] - sent["t_last_put"],
        "wire_bytes": int(wire_bytes),
        "payload_bytes": int(sent["payload_bytes"]),
        "digest_match": bool(
            got["complete"]
            and got["digests"] == sent["digests"]
            and got["transfer_digest"] == sent["transfer_digest"]
        ),
        "rss": rss,
        "staged_chunks": int(staged),
        "max_1s_window_bytes": None if sampler is None else sampler.max_window(1.0),
        "daemons": daemons,
        "engine_cpu_s": {"send_engine": sent["cpu_s"], "recv_engine": got["cpu_s"]},
    }


MOONCAKE_WORKER = Path(__file__).with_name("mooncake_worker.py")


def mooncake_unavailable(python: str) -> str | None:
    """Why ``python`` cannot run Mooncake's TransferEngine (None: it can)."""
    probe = subprocess.run(
        [python, "-c", "import mooncake.engine"], capture_output=True, text=True, timeout=60
    )
    if probe.returncode == 0:
        return None
    last = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
    return f"{python} cannot import mooncake.engine ({last}); make bench-mooncake installs it"


def measure_mooncake(opts: argparse.Namespace, python: str) -> dict[str, Any]:
    """The same bytes through Mooncake's TransferEngine over TCP (P2P handshake, no
    metadata server), layer by layer in chunks of the same size, memory to memory."""
    common = ["--bytes", str(opts.bytes)]
    recv = subprocess.Popen(
        [python, str(MOONCAKE_WORKER), "recv", *common],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert recv.stdin is not None and recv.stdout is not None
        target = recv.stdout.readline()
        if not target:
            raise RuntimeError("the Mooncake receiver did not start")
        sent = _run_json(
            [python, str(MOONCAKE_WORKER), "send", *common, "--layers", str(opts.layers),
             "--chunk-bytes", str(opts.chunk_bytes), "--target", target],
            timeout=900,
        )  # fmt: skip
        recv.stdin.write("done\n")
        recv.stdin.flush()
        got = json.loads(recv.stdout.readline())
    finally:
        if recv.poll() is None:
            recv.kill()
        recv.wait()
    return {"seconds": float(sent["seconds"]), "bitexact": got["sha1"] == sent["sha1"]}


class WireSampler:
    """Polls the sending daemon's wire-byte counter every 50 ms (a thread, so the bench
    can block on the engines): the busiest 1 s window shows whether the cap ever leaked."""

    def __init__(self, daemon: DaemonProcess, every_s: float = 0.05) -> None:
        self.daemon, self.every_s = daemon, every_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value = self.daemon.metric("kvship_wire_sent_bytes")
            except OSError:
                value = None
            if value is not None:
                self.samples.append((time.monotonic(), value))
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def max_window(self, seconds: float) -> int:
        best, j = 0.0, 0
        for i, (t_i, v_i) in enumerate(self.samples):
            j = max(j, i)
            while j + 1 < len(self.samples) and self.samples[j + 1][0] - t_i <= seconds:
                j += 1
            best = max(best, self.samples[j][1] - v_i)
        return int(best)


def run_bench(opts: argparse.Namespace) -> dict[str, Any]:
    if opts.bytes < opts.layers or opts.bytes % (2 * opts.layers):
        raise ValueError("--bytes must be a multiple of 2 x --layers (fp16 layers)")
    runs, baselines, mooncake, tls_runs = [], [], [], []
    python = opts.mooncake_python or sys.executable
    why_not = mooncake_unavailable(python) if opts.vs == "mooncake" else None
    with tempfile.TemporaryDirectory(prefix="kvship-bench-") as tmp:
        workdir = Path(tmp)
        pki = make_pki(workdir / "pki") if opts.tls else None
        for i in range(opts.repeat):  # interleaved: every side sees the same machine noise
            if not opts.no_baseline:
                baselines.append(measure_baseline(opts.bytes, opts.chunk_bytes, workdir))
            if opts.vs == "mooncake" and why_not is None:
                mooncake.append(measure_mooncake(opts, python))
            runs.append(measure_kvship(opts, workdir))
            if pki is not None:
                tls_runs.append(measure_kvship(opts, workdir, pki))
            if not opts.json:
                print(
                    f"run {i + 1}/{opts.repeat}: {opts.bytes / runs[-1]['seconds'] / 1e9:.2f} GB/s",
                    file=sys.stderr,
                )
    seconds = statistics.median(r["seconds"] for r in runs)
    goodput = opts.bytes / seconds / 1e9
    baseline = opts.bytes / statistics.median(baselines) / 1e9 if baselines else None
    layer_bytes = opts.bytes // opts.layers
    layer_wire_ms = layer_bytes / (goodput * 1e9) * 1000
    return {
        "payload_bytes": runs[0]["payload_bytes"],
        "wire_bytes": runs[0]["wire_bytes"],
        "layers": opts.layers,
        "chunk_bytes": opts.chunk_bytes,
        "connections": opts.connections,
        "local_path": opts.local_path,
        "repeat": opts.repeat,
        "seconds": round(seconds, 4),
        "goodput_GBps": round(goodput, 3),
        "baseline_GBps": None if baseline is None else round(baseline, 3),
        "ratio_vs_baseline": None if baseline is None else round(goodput / baseline, 3),
        "digest_match": all(r["digest_match"] for r in runs),
        "sender_peak_rss_MiB": round(max(r["rss"]["sender"] for r in runs), 1),
        "receiver_peak_rss_MiB": round(max(r["rss"]["receiver"] for r in runs), 1),
        "receiver_staged_chunks": max(r["staged_chunks"] for r in runs),
        "tail_lag_ms": round(statistics.median(r["tail_lag_s"] for r in runs) * 1000, 2),
        "layer_wire_ms": round(layer_wire_ms, 2),
        **_cap_figures(opts.rate, opts.bytes / seconds, runs),
        "compress": opts.compress,
        "compression_ratio": round(
            statistics.median(r["payload_bytes"] / r["wire_bytes"] for r in runs), 4
        ),
        "wire_GBps": round(
            statistics.median(r["wire_bytes"] / r["seconds"] for r in runs) / 1e9, 3
        ),
        "syscalls_per_chunk": _syscalls_per_chunk(runs, -(-opts.bytes // opts.chunk_bytes)),
        "cpu_s_per_GiB": _cpu_per_gib(runs, opts.bytes),
        **_mooncake_figures(opts, goodput, mooncake, why_not),
        **_tls_figures(opts.bytes, goodput, tls_runs),
        "runs_GBps": [round(opts.bytes / r["seconds"] / 1e9, 3) for r in runs],
        "baseline_runs_GBps": [round(opts.bytes / s / 1e9, 3) for s in baselines],
    }


def _tls_figures(payload: int, goodput: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The same transfer over mutual TLS 1.3 peer links, run after each plain one."""
    if not runs:
        return {}
    tls = payload / statistics.median(r["seconds"] for r in runs) / 1e9
    return {
        "tls_goodput_GBps": round(tls, 3),
        "tls_ratio_vs_plain": round(tls / goodput, 3),
        "tls_digest_match": all(r["digest_match"] for r in runs),
        "tls_runs_GBps": [round(payload / r["seconds"] / 1e9, 3) for r in runs],
        "tls_cpu_s_per_GiB": _cpu_per_gib(runs, payload),
    }


def _mooncake_figures(
    opts: argparse.Namespace, goodput: float, runs: list[dict[str, Any]], why_not: str | None
) -> dict[str, Any]:
    if opts.vs != "mooncake":
        return {}
    if why_not is not None:
        return {"mooncake_GBps": None, "ratio_vs_mooncake": None, "mooncake_unavailable": why_not}
    mooncake = opts.bytes / statistics.median(r["seconds"] for r in runs) / 1e9
    return {
        "mooncake_GBps": round(mooncake, 3),
        "ratio_vs_mooncake": round(goodput / mooncake, 3),
        "mooncake_bitexact": all(r["bitexact"] for r in runs),
        "mooncake_runs_GBps": [round(opts.bytes / r["seconds"] / 1e9, 3) for r in runs],
    }


def _syscalls_per_chunk(runs: list[dict[str, Any]], chunks: int) -> dict[str, Any]:
    """Each daemon's read and write system calls per chunk of payload (medians)."""
    out: dict[str, Any] = {}
    for name in ("prefill", "decode"):
        reads = statistics.median(r["daemons"][name].read_calls for r in runs) / chunks
        writes = statistics.median(r["daemons"][name].write_calls for r in runs) / chunks
        out[f"{name}_daemon"] = {
            "read": round(reads, 2),
            "write": round(writes, 2),
            "total": round(reads + writes, 2),
        }
    return out


def _cpu_per_gib(runs: list[dict[str, Any]], payload: int) -> dict[str, float]:
    """CPU seconds per GiB of payload for each of the four processes (medians), both
    daemons together and all four: efficiency the wall clock's noise does not hide."""
    gib = payload / GIB
    per = {
        "send_engine": statistics.median(r["engine_cpu_s"]["send_engine"] for r in runs),
        "prefill_daemon": statistics.median(r["daemons"]["prefill"].cpu_s for r in runs),
        "decode_daemon": statistics.median(r["daemons"]["decode"].cpu_s for r in runs),
        "recv_engine": statistics.median(r["engine_cpu_s"]["recv_engine"] for r in runs),
    }
    out = {name: round(value / gib, 3) for name, value in per.items()}
    out["daemons"] = round((per["prefill_daemon"] + per["decode_daemon"]) / gib, 3)
    out["total"] = round(sum(per.values()) / gib, 3)
    return out


def _cap_figures(rate: str, goodput_Bps: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """How the transfer used a capped link: payload vs cap, and wire rate error in %."""
    cap = parse_rate(rate)
    if cap == float("inf"):
        return {"link_cap_GBps": None, "effective_vs_cap": None, "rate_error_pct": None}
    wire_Bps = statistics.median(r["wire_bytes"] / r["seconds"] for r in runs)
    return {
        "link_cap_GBps": round(cap / 1e9, 4),
        "effective_vs_cap": round(goodput_Bps / cap, 3),
        "rate_error_pct": round((wire_Bps - cap) / cap * 100, 2),
        "max_1s_window_bytes": max(r["max_1s_window_bytes"] for r in runs),
        "rate_plus_burst_bytes": int(cap + parse_burst(DEFAULT_BURST)),
    }


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure client->daemon->daemon->client vs plain uvloop")
    p.add_argument("--bytes", type=parse_size, default=GIB, help="payload (default 1GiB)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--chunk-bytes", type=parse_size, default=4 << 20)
    p.add_argument(
        "--arena-bytes",
        type=parse_size,
        default=32 << 20,
        help="engine staging arena (shared memory)",
    )
    p.add_argument("--connections", type=int, default=4, help="TCP connections per peer link")
    p.add_argument(
        "--local-path",
        choices=["shm", "socket"],
        default="shm",
        help="engine<->daemon hop: the shared arena (default) or bytes over the Unix socket",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs; figures are medians")
    p.add_argument(
        "--layer-interval-ms",
        type=float,
        default=0.0,
        help="pause between puts, to model a prefill producing layers",
    )
    p.add_argument("--data", default="", help="an .npy of real KV, repeated to --bytes")
    p.add_argument("--rate", default="unlimited", help="token-bucket cap of the link, e.g. 1gbit")
    p.add_argument(
        "--compress",
        choices=["raw", "zstd", "split", "auto"],
        default="auto",
        help="the daemons' chunk compression policy (default auto)",
    )
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument(
        "--vs",
        choices=["mooncake"],
        help="also ship the same bytes through another system in the same run",
    )
    p.add_argument(
        "--mooncake-python",
        default="",
        help="an interpreter with mooncake-transfer-engine-non-cuda (default: this one)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="also run each transfer over mutual TLS 1.3 peer links (throwaway certificates): "
        "tls_goodput_GBps, tls_ratio_vs_plain, tls_cpu_s_per_GiB",
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    d = p.add_argument_group("dedup workloads (--workload prefix | prefix-pair)")
    d.add_argument(
        "--workload",
        choices=["transfer", "prefix", "prefix-pair"],
        default="transfer",
        help="transfer: throughput (default)",
    )
    d.add_argument("--model", default="dense-gqa-8b", help="layout preset (kvship layout list)")
    d.add_argument("--shared-fraction", type=float, default=0.9, help="prefix-pair")
    d.add_argument("--tokens", type=int, default=4096, help="prefix-pair prompt length")
    d.add_argument("--prefixes", type=int, default=3, help="prefix: shared prefixes")
    d.add_argument("--prefix-tokens", type=int, default=512)
    d.add_argument("--suffix-tokens", type=int, default=256, help="prefix: longest suffix")
    d.add_argument("--requests", type=int, default=8, help="prefix: requests")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--store-bytes",
        type=parse_size,
        default=4 << 30,
        help="the receiving daemon's block store (default 4GiB)",
    )
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(opts: argparse.Namespace) -> int:
    if opts.workload != "transfer":
        from .dedup import run_dedup_bench

        if not 0 <= opts.shared_fraction <= 1:
            raise ValueError("--shared-fraction must be between 0 and 1")
        result = run_dedup_bench(opts)
    else:
        result = run_bench(opts)
    if opts.json:
        print(json.dumps(result))
        return 0 if result["digest_match"] and result.get("tls_digest_match", True) else 1
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    return 0 if result["digest_match"] else 1
