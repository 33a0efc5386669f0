#!/usr/bin/env python3
"""An engine's view of kvship, end to end: a prefill engine ships one request's KV layer
by layer as its forward pass produces it, and a decode engine loads each layer as it
arrives. Both talk only to their local kvshipd.

Run two daemons (``kvship demo`` shows how, or two ``kvshipd`` with their own sockets),
then:

    python examples/prefill_to_decode.py --prefill-socket /run/kvship-a/kvshipd.sock \\
        --decode-socket /run/kvship-b/kvshipd.sock --peer 10.0.0.2:7470 [--tokens 4096]

The "model" here is a stand-in with a real KV geometry (bf16 K and V per layer, as uint16
bits so numpy needs no bfloat16); an engine passes its own tensors the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Iterator

import numpy as np

import kvship
from kvship.layout import uniform_layout

N_LAYERS, KV_HEADS, HEAD_DIM = 8, 4, 128


def prefill_layers(n_tokens: int, seed: int) -> Iterator[np.ndarray]:
    """Stands in for a forward pass: one layer's K and V at a time, [2, T, heads, dim]."""
    rng = np.random.default_rng(seed)
    for _ in range(N_LAYERS):
        yield rng.integers(0, 1 << 16, (2, n_tokens, KV_HEADS, HEAD_DIM), dtype=np.uint16)


async def prefill(socket: str, peer: str, request_id: str, tokens: list[int]) -> float:
    layout = uniform_layout(N_LAYERS, "bfloat16", (2, len(tokens), KV_HEADS, HEAD_DIM))
    async with (
        kvship.Client(socket) as client,
        client.send(request_id, layout, peer=peer, token_ids=tokens) as sender,
    ):
        for i, layer_kv in enumerate(prefill_layers(len(tokens), seed=len(tokens))):
            await sender.put(i, layer_kv)  # staged; the network runs behind the model
        result = await sender.finish(timeout=60)
    return result.seconds


async def decode(socket: str, request_id: str) -> dict[int, np.ndarray]:
    cache: dict[int, np.ndarray] = {}
    async with (
        kvship.Client(socket) as client,
        client.receive(request_id, timeout=60) as receiver,
    ):
        async for layer, kv in receiver:  # in arrival order, before the rest is in
            cache[layer] = kv.copy()  # `kv` is a view into the staging arena: copy it now
    return cache


async def main(args: argparse.Namespace) -> dict[str, object]:
    tokens = list(range(args.tokens))
    request_id = f"example-{time.time_ns()}"
    start = time.perf_counter()
    receiving = asyncio.create_task(decode(args.decode_socket, request_id))
    sent_s = await prefill(args.prefill_socket, args.peer, request_id, tokens)
    cache = await receiving
    want = list(prefill_layers(len(tokens), seed=len(tokens)))
    exact = len(cache) == N_LAYERS and all(
        np.array_equal(cache[i], want[i]) for i in range(N_LAYERS)
    )
    return {
        "request_id": request_id,
        "layers": len(cache),
        "bytes": sum(kv.nbytes for kv in cache.values()),
        "sender_ack_s": round(sent_s, 4),
        "decode_done_s": round(time.perf_counter() - start, 4),
        "bit_exact": exact,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="ship one request's KV, prefill to decode")
    ap.add_argument("--prefill-socket", required=True, help="the prefill side's kvshipd")
    ap.add_argument("--decode-socket", required=True, help="the decode side's kvshipd")
    ap.add_argument("--peer", required=True, help="the decode daemon's peer address")
    ap.add_argument("--tokens", type=int, default=2048, help="prompt length")
    report = asyncio.run(main(ap.parse_args()))
    print(json.dumps(report))
    raise SystemExit(0 if report["bit_exact"] else 1)
