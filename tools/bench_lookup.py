#!/usr/bin/env python3
"""Time the prefix lookup of a long prompt: hash its block keys once, then match_prefix.

A store holds the first 90 % of a ``--tokens``-token prompt's blocks for every
full-attention layer of ``--layout``; ``match_prefix`` over all the prompt's keys must find
exactly that many. Reported: medians (and p90) in microseconds over ``--runs`` runs, for
``match_prefix`` (the lookup; keys hashed once) and for ``block_keys`` (hashing itself).
Block data is one shared zero block per layer, so the store's memory stays small.

    python tools/bench_lookup.py                       # 128K tokens, kimi-linear-48b
    python tools/bench_lookup.py --layout ring-2.5-1t --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np

from kvship.layout import block_keys, preset, preset_names
from kvship.store import BlockStore


def timings_us(fn: Callable[[], object], runs: int) -> dict[str, float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t0) / 1e3)
    times.sort()
    return {
        "median_us": round(statistics.median(times), 1),
        "p90_us": round(times[int(0.9 * (len(times) - 1))], 1),
        "min_us": round(times[0], 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", default="kimi-linear-48b", choices=preset_names())
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--held", type=float, default=0.9, help="fraction of blocks held")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args()

    layout = preset(args.layout)
    tokens = np.random.default_rng(0).integers(0, 150_000, args.tokens, dtype=np.int64)
    keys = block_keys(tokens, layout)
    held = int(len(keys) * args.held)
    full = layout.full_layers
    block_bytes = max(layout.layers[i].block_bytes for i in full)  # type: ignore[union-attr]
    store = BlockStore(max(1, held * len(full) * block_bytes), layout)
    for layer in full:
        zero = memoryview(bytes(layout.layers[layer].block_bytes))  # type: ignore[union-attr]
        for key in keys[:held]:
            store.put(key, layer, zero)
    if store.match_prefix(keys) != held:
        raise SystemExit("match_prefix found the wrong count")

    result = {
        "layout": layout.name,
        "tokens": args.tokens,
        "blocks": len(keys),
        "held_blocks": held,
        "full_layers": len(full),
        "runs": args.runs,
        "match_prefix": timings_us(lambda: store.match_prefix(keys), args.runs),
        "block_keys": timings_us(lambda: block_keys(tokens, layout), args.runs),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{layout.name}: {args.tokens} tokens = {len(keys)} blocks, {held} held "
            f"x {len(full)} full layers, {args.runs} runs"
        )
        for name in ("match_prefix", "block_keys"):
            r = result[name]
            print(f"  {name:<13} median {r['median_us']:>9.1f} us   p90 {r['p90_us']:>9.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
