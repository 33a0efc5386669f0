"""`make wan-bench`: kvship against iperf3 over an emulated datacenter link (tools/wan/link.py).

For each cell of the matrix (rate x RTT x kernel buffers) it builds the link, checks its
fidelity (a TCP ping-pong's RTT, iperf3's own min / mean RTT), measures iperf3 with one and
four streams, then runs two kvshipd in the link's namespaces with their defaults (the
prefill daemon keeps its link to the decode daemon warm: ``--peers``) and ships, engine to
engine: one 1 MiB transfer (how many RTTs until its layer is at the decode engine), then
``--bytes`` of random (incompressible) KV in 32 layers, every layer checked bit for bit.
Prints a table, then one JSON object as the last line:
``{"cells": [{rate_gbit, rtt_ms, buffers, ping_rtt_ms, iperf3_rtt_ms, iperf3_p1_gbps,
iperf3_p4_gbps, kvship_gbps, ratio_vs_iperf3, bitexact, first_small_transfer_rtts,
daemon_rss_mib, receive_window_growth_mib}, ...], "ok": ...}``.

Bounded: every cell has a deadline; the link is torn down after each cell, error or not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent))
from link import ADDR_A, ADDR_B, WanLink, missing

from kvship import Client
from kvship.bench.spawn import DaemonProcess, metric_sum
from kvship.units import parse_size

LAYERS = 32
SMALL = 1 << 20


def start_daemon(
    link: WanLink, ns: str, name: str, addr: str, work: Path, *extra: str
) -> DaemonProcess:
    # The veth addresses exist only in the namespaces the link made: --insecure (no keys)
    # is safe there, and the daemons' control planes are reachable only from inside.
    daemon = DaemonProcess(name, work, ["--insecure", "--log-level", "warning", *extra],
                           prefix=link.prefix(ns))  # fmt: skip
    daemon.host = addr
    return daemon.start(timeout=30)


def control_get(link: WanLink, ns: str, daemon: DaemonProcess, path: str) -> str:
    """GET ``path`` of a daemon's control plane, from inside its namespace."""
    code = (
        "import urllib.request;"
        f"print(urllib.request.urlopen('{daemon.url(path)}',timeout=10).read().decode())"
    )
    return link.run(ns, sys.executable, "-c", code, timeout=30)


def links_of(link: WanLink, ns: str, daemon: DaemonProcess) -> list[dict[str, Any]]:
    return list(json.loads(control_get(link, ns, daemon, "/v1/links"))["links"])


def wait_warm(link: WanLink, a: DaemonProcess, deadline: float) -> None:
    """The prefill daemon's configured peer link is up with all its connections, done
    with their warm-up padding (as a link configured at start is long before traffic)."""
    while time.monotonic() < deadline:
        links = links_of(link, link.ns_a, a)
        if links and links[0].get("connections", 0) >= 1 and not links[0].get("warming"):
            return
        time.sleep(0.2)
    raise TimeoutError("the configured peer link never came up")


def rss_mib(daemon: DaemonProcess) -> float:
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


async def ship(
    a: DaemonProcess,
    b: DaemonProcess,
    layers: list[np.ndarray],
    rid: str,
    engine_arena: int | None = None,
) -> dict[str, Any]:
    """Send ``layers`` a -> b; (seconds from send to the last layer at the decode engine,
    seconds to the first, bit-exact). ``engine_arena``: both engines' arena bytes (default:
    the client's 32 MiB send arena, a 3-layer receive arena)."""
    want = [xxhash.xxh3_64_intdigest(x.data) for x in layers]
    arena = engine_arena or max(3 * layers[0].nbytes, 64 << 20)
    send_arena = {"arena_bytes": engine_arena} if engine_arena else {}
    async with (
        Client(b.socket_path, receive_arena_bytes=arena) as decode_engine,
        Client(a.socket_path, **send_arena) as prefill_engine,
    ):
        # As engines run: connected to their daemons with arenas made at start, so the
        # clock covers the transfer, not an engine's own set-up.
        await asyncio.gather(prefill_engine.prepare(send=1), decode_engine.prepare(receive=1))
        got: dict[int, bool] = {}
        marks: list[float] = []

        async def receive() -> Any:
            receiver = await decode_engine.receive(rid, timeout=120)
            async for i, array in receiver:
                got[i] = xxhash.xxh3_64_intdigest(array.reshape(-1).view(np.uint8).data) == want[i]
                marks.append(time.perf_counter())
            return receiver

        task = asyncio.create_task(receive())
        t0 = time.perf_counter()
        result = await prefill_engine.send_arrays(rid, layers, peer=b.peer, timeout=300)
        receiver = await asyncio.wait_for(task, 300)
    exact = (
        len(got) == len(layers)
        and all(got.values())
        and receiver.complete
        and receiver.digest == result.digest
    )
    return {"seconds": marks[-1] - t0, "first_s": marks[0] - t0, "bitexact": exact}


def synthetic(total: int, n_layers: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    per = max(1, total // n_layers)
    return [np.frombuffer(rng.bytes(per), np.uint8) for _ in range(n_layers)]


def cell(rate: float, rtt: float, buffers: str, opts: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"rate_gbit": rate, "rtt_ms": rtt, "buffers": buffers}
    if opts.daemon_args:
        out["daemon_args"] = opts.daemon_args
    idle = opts.slow_start_after_idle
    out["slow_start_after_idle"] = idle
    with WanLink(rate, rtt, buffers == "raised", slow_start_after_idle=idle) as link:
        out["ping_rtt_ms"] = round(link.ping_pong_rtt_ms(), 2)
        p1 = link.iperf3(1, opts.iperf_seconds)
        p4 = link.iperf3(4, opts.iperf_seconds)
        out["iperf3_rtt_ms"] = {
            "min": round(p4["min_rtt_ms"], 2),
            "mean": round(p4["mean_rtt_ms"], 2),
        }
        out["iperf3_p1_gbps"] = round(p1["gbps"], 3)
        out["iperf3_p4_gbps"] = round(p4["gbps"], 3)
        with tempfile.TemporaryDirectory(prefix="kvship-wan-") as tmp:
            work = Path(tmp)
            extra = opts.daemon_args.split()
            b = start_daemon(link, link.ns_b, "decode", ADDR_B, work, *extra)
            a = None
            try:
                a = start_daemon(
                    link, link.ns_a, "prefill", ADDR_A, work, "--peers", b.peer, *extra
                )
                wait_warm(link, a, time.monotonic() + 30)
                small = asyncio.run(
                    ship(
                        a,
                        b,
                        [np.frombuffer(np.random.default_rng(1).bytes(SMALL), np.uint8)],
                        "wan-small",
                    )
                )
                rtt_s = out["ping_rtt_ms"] / 1000
                out["first_small_transfer_rtts"] = (
                    round(small["first_s"] / rtt_s, 2) if rtt > 0 else None
                )
                layers = synthetic(opts.bytes, LAYERS, 2)
                big = asyncio.run(ship(a, b, layers, "wan-big", opts.engine_arena))
                out["kvship_gbps"] = round(opts.bytes * 8 / big["seconds"] / 1e9, 3)
                out["bitexact"] = bool(small["bitexact"] and big["bitexact"])
                out["kvship_link"] = {
                    k: v for k, v in links_of(link, link.ns_a, a)[0].items()
                    if k in ("connections", "rtt_s", "tcp_rtt_s", "ping_rtt_s")
                }  # fmt: skip
                out["daemon_rss_mib"] = {"prefill": rss_mib(a), "decode": rss_mib(b)}
                growth = metric_sum(
                    control_get(link, link.ns_b, b, "/metrics"),
                    "kvship_receive_window_growth_bytes",
                )
                out["receive_window_growth_mib"] = round(growth / (1 << 20), 1)
            finally:
                if a is not None:
                    a.stop()
                b.stop()
        best = max(out["iperf3_p4_gbps"], 1e-9)
        out["ratio_vs_iperf3"] = round(out["kvship_gbps"] / best, 3)
    out["delay_line"] = link.delay_stats
    return out


def table(cells: list[dict[str, Any]]) -> str:
    head = (
        "| Gbit/s | RTT ms | buffers | ping RTT | iperf3 -P1 | -P4 | kvship | ratio "
        "| 1 MiB in RTTs | bit-exact |"
    )
    rows = [head, "|" + "---|" * 10]
    for c in cells:
        if "error" in c:
            rows.append(
                f"| {c['rate_gbit']} | {c['rtt_ms']} | {c['buffers']} | error: {c['error'][:80]} |"
            )
            continue
        rows.append(
            f"| {c['rate_gbit']} | {c['rtt_ms']} | {c['buffers']} | {c['ping_rtt_ms']} | "
            f"{c['iperf3_p1_gbps']} | {c['iperf3_p4_gbps']} | {c['kvship_gbps']} | "
            f"{c['ratio_vs_iperf3']} | {c['first_small_transfer_rtts']} | {c['bitexact']} |"
        )
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="2,8", help="Gbit/s, comma-separated")
    ap.add_argument("--rtts", default="0,10,30,80", help="ms, comma-separated")
    ap.add_argument("--buffers", default="default,raised", help="default and/or raised")
    ap.add_argument(
        "--bytes", type=parse_size, default=parse_size("1GiB"), help="per kvship transfer"
    )
    ap.add_argument("--iperf-seconds", type=float, default=4.0)
    ap.add_argument(
        "--engine-arena",
        type=parse_size,
        default=None,
        help="both engines' arena bytes for the large transfer (default: the client's)",
    )
    ap.add_argument(
        "--daemon-args", default="", help="extra kvshipd flags for both daemons (default: none)"
    )
    ap.add_argument(
        "--slow-start-after-idle",
        type=int,
        choices=(0, 1),
        default=1,
        help="net.ipv4.tcp_slow_start_after_idle in both namespaces (kernel default 1)",
    )
    args = ap.parse_args()
    why = missing()
    if why:
        print(json.dumps({"cells": [], "ok": False, "skipped": why}))
        return 2
    cells = []
    for buffers in args.buffers.split(","):
        for rate in (float(x) for x in args.rates.split(",")):
            for rtt in (float(x) for x in args.rtts.split(",")):
                try:
                    cells.append(cell(rate, rtt, buffers, args))
                except (subprocess.SubprocessError, OSError, RuntimeError, TimeoutError) as exc:
                    cells.append(
                        {"rate_gbit": rate, "rtt_ms": rtt, "buffers": buffers, "error": repr(exc)}
                    )
                print(json.dumps(cells[-1]), file=sys.stderr, flush=True)
    print(table(cells))
    ok = all(c.get("bitexact") for c in cells)
    print(json.dumps({"cells": cells, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
