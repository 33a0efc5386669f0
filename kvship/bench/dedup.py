"""``kvship bench --workload prefix|prefix-pair``: what prefix dedup saves on the wire.

Real daemons (subprocesses) on loopback, engines in this process. KV is synthetic but
deterministic per block: a block's bytes follow from its prefix key, as a real engine's
KV follows from the prefix, so shared prefixes give identical blocks and every layer can
be checked bit for bit at the receiving engine.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from ..client import Client
from ..layout import layout_of
from ..layout.model import FullAttention, ModelLayout
from ..layout.prefix import block_keys, full_prefix_key
from ..layout.presets import preset
from .spawn import DaemonProcess


def synthetic_kv(model: ModelLayout, tokens: np.ndarray) -> list[np.ndarray]:
    """Per-layer KV for ``tokens``: full-attention blocks seeded by their keys (the tail
    block by the whole prompt), linear states seeded by the whole prompt."""
    keys = block_keys(tokens, model)
    whole = full_prefix_key(tokens, model, keys=keys)
    n_blocks = -(-len(tokens) // model.block_tokens)
    layers = []
    for i, kind in enumerate(model.layers):
        if isinstance(kind, FullAttention):
            seeds = [*keys, *([whole] * (n_blocks - len(keys)))]
            blob = b"".join(_noise(k + bytes([i % 256]), kind.block_bytes) for k in seeds)
        else:
            blob = _noise(whole + bytes([i % 256]), kind.state_bytes)
        layers.append(np.frombuffer(blob, dtype=np.uint8))
    return layers


def _noise(seed: bytes, n: int) -> bytes:
    return np.random.default_rng(xxhash.xxh64_intdigest(seed)).bytes(n)


@dataclass
class Engines:
    """The prefill and decode engines' clients, kept for every request as a serving
    engine keeps its own: their connections and arenas are made once, not per request.
    The decode engine's arena holds 3 layers (the client's default), as on kvship
    bench's plain path, and each layer is checked where it arrived."""

    a: DaemonProcess
    b: DaemonProcess
    tx: Client
    rx: Client


async def _ship(
    engines: Engines, model: ModelLayout, rid: str, tokens: np.ndarray
) -> dict[str, Any]:
    a, b = engines.a, engines.b
    layers = synthetic_kv(model, tokens)
    wire_before = a.metric("kvship_wire_sent_bytes")
    t0 = time.perf_counter()  # from the OPEN (dedup's HAVE exchange included) to delivery
    receiving = asyncio.create_task(_receive(engines.rx, rid, layers))
    sender = await engines.tx.send(
        rid, layout_of(layers), peer=b.peer, token_ids=tokens.tolist(), model=model
    )
    for i, layer in enumerate(layers):
        await sender.put(i, layer)
    await sender.finish(timeout=300)
    exact = await asyncio.wait_for(receiving, 300)
    seconds = time.perf_counter() - t0
    record = b.get_json(f"/v1/transfers/{rid}")
    return {
        "payload_bytes": sum(x.nbytes for x in layers),
        "wire_bytes": int(a.metric("kvship_wire_sent_bytes") - wire_before),
        "skipped_bytes": int(record["skipped_bytes"]),
        "seconds": seconds,
        "digest_match": exact,
        "chunk_bytes": sender.chunk_bytes,
    }


def _goodput(run: dict[str, Any]) -> float:
    """Payload-equivalent GB/s: the request's KV bytes (store-filled ones included) over
    the time it took to have them all at the decode engine."""
    return round(run["payload_bytes"] / run["seconds"] / 1e9, 3)


async def _receive(client: Client, rid: str, want: list[np.ndarray]) -> bool:
    """Every layer arrived, bit-exact (compared in place, before its region is released)."""
    receiver = await client.receive(rid, timeout=300)
    seen = set()
    exact = True
    async for i, array in receiver:
        exact = exact and np.array_equal(array.reshape(-1).view(np.uint8), want[i])
        seen.add(i)
    return exact and seen == set(range(len(want))) and receiver.complete


def prefix_workload(opts: argparse.Namespace, model: ModelLayout) -> list[np.ndarray]:
    """``--requests`` prompts, each one of ``--prefixes`` shared prefixes of
    ``--prefix-tokens`` tokens plus a fresh suffix of ``--suffix-tokens`` / 4 .. that
    many tokens (seeded): the shape of system prompts, RAG documents and chat turns."""
    rng = np.random.default_rng(opts.seed)

    def tokens(n: int) -> np.ndarray:
        return rng.integers(0, 100_000, n, dtype=np.uint32)

    prefixes = [tokens(opts.prefix_tokens) for _ in range(opts.prefixes)]
    prompts = []
    for _ in range(opts.requests):
        suffix = tokens(int(rng.integers(opts.suffix_tokens // 4, opts.suffix_tokens + 1)))
        prompts.append(np.concatenate([prefixes[int(rng.integers(len(prefixes)))], suffix]))
    return prompts


async def _run(opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    model = preset(opts.model)
    args = ["--store-bytes", str(opts.store_bytes), "--log-level", "warning"]
    a = DaemonProcess("prefill", workdir, args).start()
    try:
        b = DaemonProcess("decode", workdir, args).start()
        try:
            async with Client(a.socket_path) as tx, Client(b.socket_path) as rx:
                return await _workload(opts, model, Engines(a, b, tx, rx))
        finally:
            b.stop()
    finally:
        a.stop()


async def _workload(
    opts: argparse.Namespace, model: ModelLayout, engines: Engines
) -> dict[str, Any]:
    if opts.workload == "prefix-pair":
        rng = np.random.default_rng(opts.seed)
        first = rng.integers(0, 100_000, opts.tokens, dtype=np.uint32)
        second = first.copy()
        cut = int(opts.tokens * opts.shared_fraction)
        second[cut:] = rng.integers(0, 100_000, opts.tokens - cut, dtype=np.uint32)
        # A request of other tokens first: the engines' connections and arenas,
        # and the daemons' memory, are then as a serving system has them.
        await _ship(engines, model, "pair-warm-up", rng.permutation(first))
        one = await _ship(engines, model, "pair-first", first)
        two = await _ship(engines, model, "pair-second", second)
        return {
            "workload": "prefix-pair",
            "model": opts.model,
            "tokens": opts.tokens,
            "shared_fraction": opts.shared_fraction,
            "chunk_bytes": two["chunk_bytes"],
            "first_wire_bytes": one["wire_bytes"],
            "second_wire_bytes": two["wire_bytes"],
            "second_vs_first": round(two["wire_bytes"] / one["wire_bytes"], 4),
            "first_goodput_GBps": _goodput(one),
            "second_goodput_GBps": _goodput(two),
            "second_vs_first_goodput": round(_goodput(two) / _goodput(one), 3),
            "payload_bytes": one["payload_bytes"] + two["payload_bytes"],
            "dedup_saved_bytes": two["skipped_bytes"],
            "digest_match": one["digest_match"] and two["digest_match"],
        }
    runs = [
        await _ship(engines, model, f"prefix-{i}", tokens)
        for i, tokens in enumerate(prefix_workload(opts, model))
    ]
    saved = sum(r["skipped_bytes"] for r in runs)
    payload = sum(r["payload_bytes"] for r in runs)
    return {
        "workload": "prefix",
        "model": opts.model,
        "requests": len(runs),
        "payload_bytes": payload,
        "wire_bytes": sum(r["wire_bytes"] for r in runs),
        "dedup_saved_bytes": saved,
        # Share of the requests' KV bytes the receiver took from its store.
        "store_hit_ratio": round(saved / payload, 4),
        "goodput_GBps": round(payload / sum(r["seconds"] for r in runs) / 1e9, 3),
        "digest_match": all(r["digest_match"] for r in runs),
    }


def run_dedup_bench(opts: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    with tempfile.TemporaryDirectory(prefix="kvship-dedup-") as tmp:
        return uvloop.run(_run(opts, Path(tmp)))
