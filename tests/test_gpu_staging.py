"""GPU staging: CuPy arrays through pinned shared-memory arenas. Marked ``gpu``: these run
only where CuPy sees a CUDA device and skip cleanly everywhere else (CI has no GPU)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvship.staging import HAVE_CUPY, Arena, copy_from_host, copy_to_host, pin, unpin

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAVE_CUPY, reason="needs CuPy and a CUDA device"),
]


@pytest.fixture
def cp():  # type: ignore[no-untyped-def]
    import cupy

    return cupy


def test_pin_and_unpin_an_arena() -> None:
    arena = Arena.create(8 << 20)
    try:
        assert pin(arena.buffer) is True
        unpin(arena.buffer)
    finally:
        arena.close()


def test_device_to_pinned_host_and_back_is_bit_exact(cp) -> None:  # type: ignore[no-untyped-def]
    arena = Arena.create(4 << 20)
    pin(arena.buffer)
    try:
        src = cp.random.standard_normal((512, 1024), dtype=cp.float32).astype(cp.float16)
        view = arena.view(0, src.nbytes)
        copy_to_host(src, view)
        assert np.array_equal(np.frombuffer(view, np.float16).reshape(src.shape), src.get())
        dst = cp.empty_like(src)
        copy_from_host(view, dst)
        assert bool(cp.all(dst == src))
    finally:
        unpin(arena.buffer)
        arena.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[tuple]:  # type: ignore[type-arg]
    from conftest import running_pair

    with running_pair(tmp_path) as pair:
        yield pair


def test_cupy_layers_ship_bit_exact(cp, daemons) -> None:  # type: ignore[no-untyped-def]
    """An engine puts CuPy layers; they cross via the pinned arena and arrive intact."""
    from kvship import Client

    a, b = daemons
    layers = [cp.full((256, 1024), i, dtype=cp.float16) for i in range(4)]

    async def run() -> list[np.ndarray]:
        async with Client(b.socket_path) as decode_engine, Client(a.socket_path) as prefill_engine:
            receiving = asyncio.create_task(_receive(decode_engine))
            try:
                await prefill_engine.send_arrays("gpu", layers, peer=b.peer, timeout=60)
                return await asyncio.wait_for(receiving, 60)
            finally:
                receiving.cancel()

    got = asyncio.run(run())
    for i, layer in enumerate(layers):
        assert np.array_equal(got[i], layer.get())


async def _receive(client) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    receiver = await client.receive("gpu", timeout=30)
    return await receiver.all()
