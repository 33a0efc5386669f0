"""The two engine sides of ``kvship bench``, each run as its own process.

``python -m kvship.bench.workers send|recv ...`` prints one JSON line with its timings
(time.monotonic() is system-wide, so the parent can compare the two processes' clocks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import numpy as np
import xxhash

from ..client import Client
from ..layout import uniform_layout


def synthetic_layer(layer_bytes: int, seed: int = 0) -> np.ndarray:
    """fp16 values shaped like KV (small normal numbers): made once, stamped per layer."""
    rng = np.random.default_rng(seed)
    n = layer_bytes // 2
    return (rng.standard_normal(n, dtype=np.float32) * 0.5).astype(np.float16)


def stamp(base: np.ndarray, layer: int) -> np.ndarray:
    """Make layer ``layer`` differ from the others without regenerating it."""
    base[:4] = np.frombuffer(np.uint64(layer).tobytes(), dtype=np.float16)
    return base


async def send(args: argparse.Namespace) -> dict[str, object]:
    layer_bytes = args.bytes // args.layers
    base = synthetic_layer(layer_bytes)
    if args.data:
        real = np.load(args.data).reshape(-1).view(np.uint8)
        reps = -(-layer_bytes // real.size)
        base = np.tile(real, reps)[:layer_bytes].view(np.float16)
    layout = uniform_layout(args.layers, np.float16, (layer_bytes // 2,))
    client = Client(
        args.address,
        arena_bytes=args.arena_bytes,
        chunk_bytes=args.chunk_bytes,
        use_shm=args.local_path == "shm",
    )
    # The engine does not hash its layers: the bench's own check runs before the clock.
    digests = [xxhash.xxh3_64_hexdigest(stamp(base, layer).data) for layer in range(args.layers)]
    sender = await client.send(args.request_id, layout, peer=args.peer, token_ids=range(128))
    cpu0 = time.process_time()
    t_first = time.monotonic()
    put_done = []
    for layer in range(args.layers):
        await sender.put(layer, stamp(base, layer))
        put_done.append(time.monotonic())
        if args.layer_interval_ms:
            await asyncio.sleep(args.layer_interval_ms / 1000)
    result = await sender.finish(timeout=600)
    return {
        "t_first_put": t_first,
        "t_last_put": put_done[-1],
        "t_acked": time.monotonic(),
        "cpu_s": time.process_time() - cpu0,
        "digests": digests,
        "transfer_digest": result.digest,
        "payload_bytes": result.total_bytes,
    }


async def recv(args: argparse.Namespace) -> dict[str, object]:
    # A decode engine knows its model's layer size: its arena is ready before data flows.
    layer_bytes = args.bytes // args.layers
    client = Client(
        args.address,
        receive_arena_bytes=max(3 * layer_bytes, 64 << 20),
        use_shm=args.local_path == "shm",
    )
    receiver = await client.receive(args.request_id, timeout=120)
    cpu0 = time.process_time()
    digests: dict[int, str] = {}
    arrivals = []
    async for layer, array in receiver:
        digests[layer] = xxhash.xxh3_64_hexdigest(array.data)
        arrivals.append(time.monotonic())
    return {
        "t_first_layer": arrivals[0],
        "t_last_layer": arrivals[-1],
        "digests": [digests[i] for i in range(len(digests))],
        "complete": receiver.complete,
        "cpu_s": time.process_time() - cpu0,
        "transfer_digest": receiver.digest,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvship.bench.workers")
    parser.add_argument("role", choices=["send", "recv"])
    parser.add_argument("--address", required=True)
    parser.add_argument("--request-id", required=True)
    parser.add_argument("--peer", default="")
    parser.add_argument("--bytes", type=int, default=1 << 30)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--chunk-bytes", type=int, default=4 << 20)
    parser.add_argument("--arena-bytes", type=int, default=64 << 20)
    parser.add_argument("--layer-interval-ms", type=float, default=0.0)
    parser.add_argument("--data", default="")
    parser.add_argument("--local-path", choices=["shm", "socket"], default="shm")
    args = parser.parse_args(argv)
    import uvloop

    run = send if args.role == "send" else recv
    out = uvloop.run(run(args))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
