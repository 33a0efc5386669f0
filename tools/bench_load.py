"""Load: many concurrent transfers between two real kvshipd, into a slow receiving engine.

Every transfer is checked bit for bit. The receiving engine sleeps after each layer it
takes (``--consume-ms``), so the decode daemon stages and then stops granting credit:
the prefill daemon's memory must stay bounded by credit, and fairness means no transfer
starves. Prints one JSON object last (``--json``): both daemons' peak RSS, every
transfer's goodput (payload / its own wall time), the slowest over the mean.

    .venv/bin/python tools/bench_load.py --transfers 64 --transfer-mib 16 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kvship import Client
from kvship.bench.spawn import DaemonProcess
from kvship.protocol import LayerSpec

MIB = 1 << 20


class PrivatePeak:
    """The most private memory (RssAnon: heap, no shared arena pages) a process had,
    sampled every 20 ms: VmHWM also counts the engines' shared arenas the daemon touched."""

    def __init__(self, pid: int) -> None:
        self.path = Path(f"/proc/{pid}/status")
        self.peak_kib = 0

    def sample(self) -> None:
        for line in self.path.read_text().splitlines():
            if line.startswith("RssAnon:"):
                self.peak_kib = max(self.peak_kib, int(line.split()[1]))

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample()
            await asyncio.sleep(0.02)


async def one(
    tx: Client, rx: Client, peer: str, index: int, arrays: list[np.ndarray], consume_s: float
) -> dict[str, Any]:
    request_id = f"load-{index}"
    layout = tuple(LayerSpec(x.dtype.name, tuple(x.shape), x.nbytes) for x in arrays)
    start = time.perf_counter()

    async def receive() -> bool:
        receiver = await rx.receive(request_id, timeout=120)
        same = True
        async for layer, array in receiver.layers(copy=False):
            same &= bool(np.array_equal(array, arrays[layer]))
            await asyncio.sleep(consume_s)  # a slow engine: it holds the layer this long
        return same and receiver.complete

    receiving = asyncio.create_task(receive())
    async with tx.send(request_id, layout, peer=peer) as sender:
        for i, array in enumerate(arrays):
            await sender.put(i, array)
        await sender.finish(300)
    bitexact = await asyncio.wait_for(receiving, 300)
    seconds = time.perf_counter() - start
    nbytes = sum(x.nbytes for x in arrays)
    return {"bitexact": bitexact, "seconds": seconds, "goodput_Bps": nbytes / seconds}


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(opts.seed)
    layer = int(opts.transfer_mib * MIB) // opts.layers
    # Distinct bytes per transfer, made once (kept small: the pool is shared in rotation).
    pool = [rng.integers(0, 256, layer, dtype=np.uint8) for _ in range(opts.layers + 7)]
    payloads = [
        [pool[(i + j) % len(pool)] for j in range(opts.layers)] for i in range(opts.transfers)
    ]
    for i, arrays in enumerate(payloads):  # layer 0 names its transfer: no mix-up passes
        arrays[0] = arrays[0].copy()
        arrays[0][:8] = np.frombuffer(i.to_bytes(8, "big"), dtype=np.uint8)
    args = ["--log-level", "warning", *opts.daemon_args.split()]
    with tempfile.TemporaryDirectory(prefix="kvship-load-") as tmp:
        a = DaemonProcess("prefill", Path(tmp), args).start()
        b = DaemonProcess("decode", Path(tmp), args).start()
        try:
            assert a.proc is not None and b.proc is not None
            peaks = {"prefill": PrivatePeak(a.proc.pid), "decode": PrivatePeak(b.proc.pid)}
            stop = asyncio.Event()
            watchers = [asyncio.create_task(w.watch(stop)) for w in peaks.values()]
            async with Client(a.socket_path) as tx, Client(b.socket_path) as rx:
                start = time.perf_counter()
                results = await asyncio.gather(
                    *(
                        one(tx, rx, b.peer, i, payloads[i], opts.consume_ms / 1000)
                        for i in range(opts.transfers)
                    ),
                    return_exceptions=True,
                )
                wall = time.perf_counter() - start
            stop.set()
            await asyncio.gather(*watchers)
            rss = {"prefill": a.peak_rss_mib(), "decode": b.peak_rss_mib()}
            private = {k: w.peak_kib / 1024 for k, w in peaks.items()}
        finally:
            a.stop()
            b.stop()
    done = [r for r in results if isinstance(r, dict)]
    errors = [repr(r) for r in results if not isinstance(r, dict)]
    goodputs = [r["goodput_Bps"] for r in done]
    mean = statistics.fmean(goodputs) if goodputs else 0.0
    total = opts.transfers * layer * opts.layers
    return {
        "transfers": opts.transfers,
        "transfer_bytes": layer * opts.layers,
        "completed_bitexact": sum(r["bitexact"] for r in done),
        "errors": errors[:5],
        "wall_s": round(wall, 3),
        "aggregate_GBps": round(total / wall / 1e9, 3),
        "peak_rss_MiB": {k: round(v, 1) for k, v in rss.items()},
        "peak_private_MiB": {k: round(v, 1) for k, v in private.items()},
        "goodput_mean_MBps": round(mean / 1e6, 2),
        "goodput_min_MBps": round(min(goodputs) / 1e6, 2) if goodputs else None,
        "slowest_vs_mean": round(min(goodputs) / mean, 3) if goodputs else None,
        "consume_ms_per_layer": opts.consume_ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transfers", type=int, default=64)
    parser.add_argument("--transfer-mib", type=float, default=16.0)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--consume-ms", type=float, default=20.0, help="per layer, receiver")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--daemon-args", default="", help="extra kvshipd flags, both daemons")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(argv)
    result = asyncio.run(run(opts))
    if opts.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:<22} {value}")
    return 0 if result["completed_bitexact"] == opts.transfers else 1


if __name__ == "__main__":
    sys.exit(main())
