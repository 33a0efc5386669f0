#!/usr/bin/env python3
"""How long blocking work would stall an event loop, and how long it stalls it now.

For each piece of work that used to run on a loop (building the planner for the first
POST /v1/route, checking a long prompt's dedup manifest, hashing a long prompt for a
look-up, making a large receive arena, a full garbage collection of the daemon's heap
during its first small transfers), this measures in the same run:

* ``inline_s``: the work done right here, blocking (what a loop would stall for if the
  work ran on it: the baseline);
* ``lag_s``: the worst event-loop lag seen while a real daemon (or the engine's client)
  does it now. Daemon lag comes from its ``kvship_event_loop_lag_seconds`` histogram, so
  it is an upper bound: the smallest bucket holding every new sample.

    python tools/bench_loop_lag.py [--tokens 131072] [--arena-mib 1024] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import re
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kvship import Client
from kvship.aio.lag import LoopLag
from kvship.bench.spawn import DaemonProcess, daemon_pair
from kvship.daemon.dedup import verify_manifest
from kvship.layout import layout_of
from kvship.layout.dedup import Manifest
from kvship.layout.model import FullAttention, ModelLayout
from kvship.layout.prefix import block_keys
from kvship.staging import Arena

MODEL = ModelLayout("lag-model", "lag-model", (FullAttention(16, 1, 8),) * 2)
SMALL_TRANSFERS = 20  # 1 MiB each: a fresh daemon's first ones ran into full collections


def timed(work: Callable[[], Any]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def lag_buckets(daemon: DaemonProcess) -> dict[float, float]:
    text = daemon.metrics_text()
    pattern = r'^kvship_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$'
    return {float(le): float(n) for le, n in re.findall(pattern, text, re.M)}


def worst_lag_since(daemon: DaemonProcess, before: dict[float, float]) -> float:
    """The smallest bucket bound that holds every sample taken since ``before``."""
    after = lag_buckets(daemon)
    total = after[float("inf")] - before[float("inf")]
    for bound in sorted(after):
        if after[bound] - before[bound] >= total:
            return bound
    return float("inf")


def post(daemon: DaemonProcess, path: str, body: object) -> dict[str, Any]:
    req = urllib.request.Request(daemon.url(path), data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=120) as resp:
        return dict(json.loads(resp.read()))


async def daemon_case(daemon: DaemonProcess, work: Callable[[], Any]) -> float:
    before = lag_buckets(daemon)
    await asyncio.to_thread(work)
    await asyncio.sleep(0.1)  # let the lag monitor take its samples after the work
    return worst_lag_since(daemon, before)


async def run(tokens_n: int, arena_mib: int) -> dict[str, Any]:
    tokens = np.random.default_rng(1).integers(0, 50000, tokens_n, dtype=np.uint32)
    token_list = tokens.tolist()
    block = MODEL.layers[0].block_bytes  # type: ignore[union-attr]
    layers = [np.full((tokens_n // 16) * block, i, np.uint8) for i in range(2)]
    keys = tuple(block_keys(tokens, MODEL))
    extra = Manifest(MODEL, 0, keys).to_extra()
    specs = layout_of(layers)

    def planner() -> None:
        from kvship.router.scenario import planned_router

        planned_router()

    def made_arena() -> None:
        Arena.create(arena_mib << 20).close()

    def full_collection() -> None:
        import kvship.daemon.main  # noqa: F401  the daemon's heap, as it has it at start

        gc.collect()

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        a, b = daemon_pair(tmp)
        try:
            # Small transfers first, on fresh daemons: their first ones met full collections.
            async def small_transfers() -> None:  # fresh engines, 1 MiB each, one by one
                for i in range(SMALL_TRANSFERS):
                    layer = [np.full(1 << 20, i, np.uint8)]
                    async with Client(a.socket_path) as s, Client(b.socket_path) as r:
                        receiving = asyncio.create_task(r.receive(f"small-{i}", timeout=30))
                        await s.send_arrays(f"small-{i}", layer, peer=b.peer, timeout=30)
                        await (await receiving).all()

            before_a, before_b = lag_buckets(a), lag_buckets(b)
            await small_transfers()
            await asyncio.sleep(0.1)
            results["full_collection"] = {  # the worse of the two daemons
                "inline_s": timed(full_collection),
                "lag_s": max(worst_lag_since(a, before_a), worst_lag_since(b, before_b)),
            }
            # Then the planner: a fresh daemon has not built it yet (and this process has
            # not imported it, so its inline time includes the imports, as the daemon's does).
            results["first_route"] = {
                "inline_s": timed(planner),
                "lag_s": await daemon_case(
                    b, lambda: post(b, "/v1/route", {"prompt_tokens": 30000})
                ),
            }
            results["lookup_token_ids"] = {
                "inline_s": timed(lambda: block_keys(tokens, MODEL)),
                "lag_s": await daemon_case(
                    b,
                    lambda: post(
                        b, "/v1/lookup", {"model": MODEL.to_dict(), "token_ids": token_list}
                    ),
                ),
            }

            async def dedup_send() -> None:
                async with Client(a.socket_path) as s, Client(b.socket_path) as r:
                    sender = await s.send(
                        "lag", specs, peer=b.peer, token_ids=token_list, model=MODEL
                    )
                    for i, layer in enumerate(layers):
                        await sender.put(i, layer)
                    await sender.finish(timeout=60)
                    await (await r.receive("lag", timeout=60)).all()

            before = lag_buckets(b)
            await dedup_send()
            await asyncio.sleep(0.1)
            results["dedup_manifest"] = {
                "inline_s": timed(
                    lambda: verify_manifest(extra, specs, tuple(token_list), 4 * block)
                ),
                "lag_s": worst_lag_since(b, before),
            }

            lag = LoopLag(lambda _: None, interval_s=0.005)
            lag.start()
            async with Client(b.socket_path, receive_arena_bytes=arena_mib << 20) as c:
                await c._connect("recv", arena_mib << 20)  # the arena a receive would make
            lag.stop()
            results["receive_arena"] = {"inline_s": timed(made_arena), "lag_s": lag.worst_s}
        finally:
            a.stop()
            b.stop()
    for item in results.values():
        item["inline_s"] = round(item["inline_s"], 4)
        item["lag_s"] = round(item["lag_s"], 4)
    return {"tokens": tokens_n, "arena_MiB": arena_mib, "cases": results}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128 * 1024, help="prompt length")
    ap.add_argument("--arena-mib", type=int, default=1024, help="receive arena size")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args()
    out = asyncio.run(run(args.tokens, args.arena_mib))
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{'work':<18} {'inline (baseline)':>18} {'worst loop lag now':>20}")
    for name, item in out["cases"].items():
        print(f"{name:<18} {item['inline_s']:>16.3f} s {item['lag_s']:>18.3f} s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
