"""GPU staging: device arrays through the pinned shared-memory arena. Marked ``gpu``: these
run only where CuPy sees a CUDA device and skip cleanly everywhere else (CI has no GPU);
``tools/gpu_check.sh`` runs them on a GPU machine. tests/test_staged_puts.py runs the same
code paths on the CPU (copies in a worker thread, numpy targets)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvship import Client
from kvship.layout import layout_of
from kvship.staging import HAVE_CUPY, Arena, copy_in, copy_out, pin, source_of, unpin

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAVE_CUPY, reason="needs CuPy and a CUDA device"),
]
MIB = 1 << 20


@pytest.fixture
def cp() -> Any:
    import cupy

    return cupy


@pytest.fixture
def pinned_arena() -> Iterator[Arena]:
    arena = Arena.create(64 * MIB)
    assert pin(arena.buffer) is True
    try:
        yield arena
    finally:
        unpin(arena.buffer)
        arena.close()


async def test_device_to_pinned_arena_and_back_is_asynchronous_and_bit_exact(
    cp: Any, pinned_arena: Arena
) -> None:
    src = cp.random.standard_normal((4096, 1024), dtype=cp.float32).astype(cp.float16)
    view = pinned_arena.view(0, src.nbytes)
    out = copy_out(source_of(src), 0, view, pinned=True)
    assert out.event is not None  # a CUDA event, for engine streams to wait on
    await out.wait()
    assert np.array_equal(np.frombuffer(view, np.float16).reshape(src.shape), src.get())
    dst = cp.empty_like(src)
    back = copy_in(view, dst, pinned=True)
    await back.wait()
    assert bool(cp.all(dst == src))


async def test_the_copy_waits_for_the_engine_stream(cp: Any, pinned_arena: Arena) -> None:
    """The engine fills the array on its own stream and puts without synchronizing: the
    copy is ordered after that work, never reading a half-written layer."""
    engine = cp.cuda.Stream(non_blocking=True)
    with engine:
        src = cp.zeros(16 * MIB // 2, dtype=cp.float16)
        for _ in range(20):  # enough kernels that an unordered copy would see zeros
            src += 1
    view = pinned_arena.view(0, src.nbytes)
    copy = copy_out(source_of(src), 0, view, pinned=True, stream=engine)
    await copy.wait()
    assert np.all(np.frombuffer(view, np.float16) == 20)


def _torch_cuda() -> Any:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    return torch


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[tuple[Any, ...]]:
    from conftest import running_pair

    with running_pair(tmp_path) as pair:
        yield pair


async def test_cupy_puts_return_at_once_and_arrive_in_device_buffers(
    cp: Any, daemons: tuple[Any, ...]
) -> None:
    """A GPU put queues one copy and returns; the receiving engine gets each layer into
    its own device buffer by an async host->device copy."""
    a, b = daemons
    layers = [cp.full((2048, 1024), i, dtype=cp.float16) for i in range(8)]
    targets = [cp.empty_like(layer) for layer in layers]
    async with (
        Client(b.socket_path) as decode,
        Client(a.socket_path, arena_bytes=64 * MIB) as prefill,
    ):
        receiving = asyncio.create_task(_into(decode, "gpu-puts", targets))
        async with prefill.send("gpu-puts", layout_of(layers), peer=b.peer) as sender:
            assert sender.pinned
            copies = [await sender.put(i, layer) for i, layer in enumerate(layers)]
            assert all(copy.event is not None for copy in copies)
            await sender.finish(timeout=60)
        await asyncio.wait_for(receiving, 60)
    for layer, target in zip(layers, targets, strict=True):
        assert bool(cp.all(layer == target))


async def _into(client: Client, rid: str, targets: list[Any]) -> None:
    async with client.receive(rid, timeout=30) as rx:
        assert rx.pinned
        copies = [copy async for _, copy in rx.to_device(targets)]
    for copy in copies:
        await copy.wait()


async def test_torch_bf16_tensors_ship_bit_exact(daemons: tuple[Any, ...]) -> None:
    """torch's bfloat16 has no CUDA-array-interface dtype: kvship copies its raw bytes."""
    torch = _torch_cuda()
    a, b = daemons
    stream = torch.cuda.current_stream()
    layers = [torch.randn(1024, 512, device="cuda").to(torch.bfloat16) for _ in range(4)]
    targets = [torch.empty_like(layer) for layer in layers]
    async with Client(b.socket_path) as decode, Client(a.socket_path) as prefill:
        receiving = asyncio.create_task(_into(decode, "torch-bf16", targets))
        async with prefill.send("torch-bf16", layout_of(layers), peer=b.peer) as sender:
            for i, layer in enumerate(layers):
                await sender.put(i, layer, stream=stream)
            await sender.finish(timeout=60)
        await asyncio.wait_for(receiving, 60)
    torch.cuda.synchronize()
    for layer, target in zip(layers, targets, strict=True):
        assert torch.equal(layer.view(torch.int16), target.view(torch.int16))
