"""GPU staging benchmark: device -> pinned arena -> daemon -> wire -> daemon -> device.

    python tools/bench_gpu.py [--layers 32] [--layer-mib 16] [--repeat 5] [--json]
    python tools/bench_gpu.py --host ...   # the same code path on numpy (no GPU)

Figures, each a median over ``--repeat`` runs measured in this one invocation:
- ``memcpy_peak_GBps``: CuPy's own device->pinned-host memcpy of one layer (the ceiling);
  ``device_to_arena_GBps``: kvship's copy of a layer into its pinned shared arena;
  ``ratio_vs_peak`` = the second / the first (target >= 0.8).
- A ``--layers``-layer put through two real daemons on loopback, received into device
  buffers: ``put_ms_median``/``put_ms_max`` (how long ``Sender.put`` held the engine;
  target < 1 ms), ``total_s`` (first put to the decode engine holding every layer),
  ``copy_s`` (the layers' device->arena copies alone), ``send_s`` (the same transfer
  from host memory); ``overlap_visible``: total_s < copy_s + send_s.
- ``digest_match``: every layer arrived bit-exact.

With ``--host`` the "device" arrays are numpy and the copies run in a worker thread
(``put(background=True)``): the figures then describe this CPU, and the run proves the
tool and its code path work where no GPU is (the tests run it so).
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
import xxhash

from kvship import Client
from kvship.bench.spawn import DaemonProcess
from kvship.layout import layout_of
from kvship.staging import HAVE_CUPY, Arena, copy_out, pin, source_of, unpin

MIB = 1 << 20


class Backend:
    """Arrays, copies and clocks: CuPy's on a GPU, numpy's with ``--host``."""

    def __init__(self, host: bool) -> None:
        self.host = host
        if not host:
            import cupy

            self.xp: Any = cupy
            self.device_name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        else:
            self.xp = np
            self.device_name = "host (numpy, no GPU)"

    def layers(self, n: int, nbytes: int) -> list[Any]:
        rng = self.xp.random.default_rng(0) if self.host else self.xp.random
        base = (rng.standard_normal(nbytes // 2, dtype=self.xp.float32) * 0.5).astype(
            self.xp.float16
        )
        out = []
        for i in range(n):
            layer = base.copy()
            layer[:4] = i
            out.append(layer)
        self.sync()
        return out

    def to_host(self, array: Any) -> np.ndarray:
        return np.asarray(array) if self.host else array.get()

    def empty_like(self, array: Any) -> Any:
        return self.xp.empty_like(array)

    def sync(self) -> None:
        if not self.host:
            self.xp.cuda.Device().synchronize()

    def memcpy_peak(self, layer: Any, repeat: int) -> float:
        """Seconds for the library's own device->pinned copy of ``layer`` (median)."""
        if self.host:
            dst = np.empty(layer.nbytes, np.uint8)
            src = layer.reshape(-1).view(np.uint8)
            return _median(lambda: np.copyto(dst, src), repeat)
        import cupyx

        pinned = cupyx.empty_pinned((layer.nbytes,), dtype=np.uint8)
        flat = layer.reshape(-1).view(self.xp.uint8)
        stream = self.xp.cuda.Stream(non_blocking=True)

        def copy() -> None:
            flat.get(out=pinned, stream=stream)
            stream.synchronize()

        return _median(copy, repeat)


def _median(work: Any, repeat: int) -> float:
    work()  # warm: first-touch faults, CUDA context, page-locking
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        work()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def device_to_arena(backend: Backend, layer: Any, repeat: int) -> tuple[float, bool]:
    """Seconds for kvship's copy of ``layer`` into a pinned arena (median), and whether
    the arena could be pinned."""
    arena = Arena.create(layer.nbytes)
    pinned = pin(arena.buffer)
    try:
        source, view = source_of(layer), arena.view(0, layer.nbytes)
        await copy_out(source, 0, view, pinned=pinned, background=backend.host).wait()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            await copy_out(source, 0, view, pinned=pinned, background=backend.host).wait()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), pinned
    finally:
        if pinned:
            unpin(arena.buffer)
        arena.close()


async def ship(
    backend: Backend,
    prefill: Client,
    decode: Client,
    peer: str,
    layers: list[Any],
    rid: str,
    *,
    from_host: bool,
) -> dict[str, Any]:
    """One transfer engine to engine; ``from_host``: the layers as numpy arrays (the
    send-only reference), else device arrays put straight from the device."""
    arrays = [backend.to_host(layer) for layer in layers] if from_host else layers
    targets = [backend.empty_like(layer) for layer in layers]
    receiving = asyncio.create_task(_into(decode, rid, targets, backend.host))
    put_s = []
    t0 = time.perf_counter()
    async with prefill.send(rid, layout_of(arrays), peer=peer) as sender:
        for i, array in enumerate(arrays):
            p0 = time.perf_counter()
            await sender.put(i, array, background=backend.host and not from_host)
            put_s.append(time.perf_counter() - p0)
        await sender.finish(timeout=300)
        pinned = sender.pinned
    await asyncio.wait_for(receiving, 300)
    backend.sync()
    total_s = time.perf_counter() - t0
    match = all(
        xxhash.xxh3_64_intdigest(backend.to_host(t).tobytes())
        == xxhash.xxh3_64_intdigest(backend.to_host(w).tobytes())
        for t, w in zip(targets, layers, strict=True)
    )
    return {"total_s": total_s, "put_s": put_s, "match": match, "pinned": pinned}


async def _into(client: Client, rid: str, targets: list[Any], host: bool) -> None:
    async with client.receive(rid, timeout=60) as rx:
        copies = [copy async for _, copy in rx.to_device(targets, background=host)]
    for copy in copies:
        await copy.wait()


async def run(opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    backend = Backend(opts.host)
    layer_bytes = opts.layer_mib * MIB
    layers = backend.layers(opts.layers, layer_bytes)
    peak_s = backend.memcpy_peak(layers[0], opts.repeat)
    arena_s, pinned = await device_to_arena(backend, layers[0], opts.repeat)
    args = ["--log-level", "warning"]
    arena_bytes = opts.layers * layer_bytes + 4 * MIB  # every layer in flight: no put waits
    a = DaemonProcess("prefill", workdir, args).start()
    try:
        b = DaemonProcess("decode", workdir, args).start()
        try:
            async with (
                Client(a.socket_path, arena_bytes=arena_bytes) as prefill,
                Client(b.socket_path, receive_arena_bytes=arena_bytes) as decode,
            ):
                device_runs, host_runs = [], []
                for i in range(opts.repeat + 1):  # run 0 warms connections and arenas
                    h = await ship(
                        backend, prefill, decode, b.peer, layers, f"h{i}", from_host=True
                    )
                    d = await ship(
                        backend, prefill, decode, b.peer, layers, f"d{i}", from_host=False
                    )
                    if i:
                        host_runs.append(h)
                        device_runs.append(d)
        finally:
            b.stop()
    finally:
        a.stop()
    total = opts.layers * layer_bytes
    total_s = statistics.median(r["total_s"] for r in device_runs)
    send_s = statistics.median(r["total_s"] for r in host_runs)
    copy_s = opts.layers * arena_s
    puts = [s for r in device_runs for s in r["put_s"]]
    return {
        "device": backend.device_name,
        "host_mode": opts.host,
        "pinned": pinned and all(r["pinned"] for r in device_runs),
        "layers": opts.layers,
        "layer_bytes": layer_bytes,
        "repeat": opts.repeat,
        "memcpy_peak_GBps": round(layer_bytes / peak_s / 1e9, 2),
        "device_to_arena_GBps": round(layer_bytes / arena_s / 1e9, 2),
        "ratio_vs_peak": round(peak_s / arena_s, 3),
        "put_ms_median": round(statistics.median(puts) * 1e3, 3),
        "put_ms_max": round(max(puts) * 1e3, 3),
        "copy_s": round(copy_s, 4),
        "send_s": round(send_s, 4),
        "total_s": round(total_s, 4),
        "overlap_visible": total_s < copy_s + send_s,
        "goodput_GBps": round(total / total_s / 1e9, 3),
        "digest_match": all(r["match"] for r in device_runs + host_runs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--layer-mib", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--host", action="store_true", help="numpy instead of a GPU")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    opts = parser.parse_args(argv)
    if not opts.host and not HAVE_CUPY:
        print(
            "bench_gpu: no CUDA device CuPy can use (install kvship[gpu], or pass --host)",
            file=sys.stderr,
        )
        return 2
    import uvloop

    with tempfile.TemporaryDirectory(prefix="kvship-gpu-") as tmp:
        figures = uvloop.run(run(opts, Path(tmp)))
    if opts.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:>22}  {value}")
    return 0 if figures["digest_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
