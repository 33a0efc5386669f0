"""Resume under resets: one large transfer between two real kvshipd whose peer connections
are all reset N times (tools/faultproxy.py ``reset_all``) while it runs; it must complete
bit-exact, and the bytes put on the wire beyond the payload say what resuming cost.

The same transfer without resets runs first, in the same run, as the baseline (wire bytes
and seconds). Compression is off, so wire bytes are payload plus frame headers and what
was sent twice. Prints one JSON object last (``--json``):

    .venv/bin/python tools/bench_resume.py --bytes 1GiB --resets 3 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import faultproxy  # beside this script (tools/), as tools/soak.py imports it
from kvship import Client
from kvship.bench.spawn import DaemonProcess
from kvship.protocol import LayerSpec
from kvship.units import parse_size


async def one_transfer(
    a: DaemonProcess, b: DaemonProcess, arrays: list[np.ndarray], resets: int, name: str
) -> dict[str, Any]:
    host, port = b.peer.rsplit(":", 1)
    proxy = faultproxy.FaultProxy((host, int(port)), faultproxy.Schedule(seed=0))
    total = sum(x.nbytes for x in arrays)
    layout = tuple(LayerSpec(x.dtype.name, tuple(x.shape), x.nbytes) for x in arrays)
    wire_before = a.metric("kvship_wire_sent_bytes")
    resent_before = a.metric("kvship_chunks_resent")
    done = 0
    async with proxy, Client(b.socket_path) as rx, Client(a.socket_path) as tx:

        async def receive() -> bool:
            receiver = await rx.receive(name, timeout=60)
            same = True
            async for layer, array in receiver.layers(copy=False):
                same &= bool(np.array_equal(array, arrays[layer]))
            return same and receiver.complete

        async def send() -> None:
            nonlocal done
            async with tx.send(name, layout, peer=proxy.address) as sender:
                for i, array in enumerate(arrays):
                    await sender.put(i, array)
                    done += array.nbytes
                await sender.finish(300)

        start = time.perf_counter()
        receiving = asyncio.create_task(receive())
        sending = asyncio.create_task(send())
        fired = 0
        while not sending.done():  # bounded by the send's own 300 s timeout
            await asyncio.sleep(0.01)
            if fired < resets and done >= total * (fired + 1) / (resets + 1):
                fired += proxy.reset_all() > 0
        await sending
        bitexact = await asyncio.wait_for(receiving, 60)
        seconds = time.perf_counter() - start
    wire = a.metric("kvship_wire_sent_bytes") - wire_before
    return {
        "resets": fired,
        "seconds": round(seconds, 3),
        "bitexact": bitexact,
        "wire_bytes": int(wire),
        "chunks_resent": int(a.metric("kvship_chunks_resent") - resent_before),
    }


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(opts.seed)
    layer = opts.bytes // opts.layers
    arrays = [rng.integers(0, 256, layer, dtype=np.uint8) for _ in range(opts.layers)]
    total = layer * opts.layers
    args = ["--compression", "raw", "--log-level", "warning", "--resume-timeout-s", "60"]
    with tempfile.TemporaryDirectory(prefix="kvship-resume-") as tmp:
        a = DaemonProcess("prefill", Path(tmp), args).start()
        b = DaemonProcess("decode", Path(tmp), args).start()
        try:
            base = await one_transfer(a, b, arrays, 0, "baseline")
            hit = await one_transfer(a, b, arrays, opts.resets, "resets")
        finally:
            a.stop()
            b.stop()
    extra = (hit["wire_bytes"] - base["wire_bytes"]) / total
    return {
        "payload_bytes": total,
        "resets": hit["resets"],
        "completed_bitexact": hit["bitexact"] and base["bitexact"],
        "resent_extra_fraction": round(extra, 4),
        "chunks_resent": hit["chunks_resent"],
        "wire_bytes": hit["wire_bytes"],
        "baseline_wire_bytes": base["wire_bytes"],
        "seconds": hit["seconds"],
        "baseline_seconds": base["seconds"],
        "slowdown_vs_baseline": round(hit["seconds"] / base["seconds"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--resets", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(argv)
    result = asyncio.run(run(opts))
    if opts.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:<24} {value}")
    ok = result["completed_bitexact"] and result["resets"] == opts.resets
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
