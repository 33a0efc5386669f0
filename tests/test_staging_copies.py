"""Staging without a GPU: the copies, the run allocator and the outbox that GPU puts use.

The same code runs on a GPU with CUDA copies in place of memcpys (tests/test_gpu_staging.py);
here host copies made now and in a worker thread take both branches of every wait.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvship.client.outbox import Outbox, StagedGroup
from kvship.staging import (
    HAVE_CUPY,
    Arena,
    RingAllocator,
    StagingCopy,
    copy_in,
    copy_out,
    device_buffer,
    source_of,
)


# ------------------------------------------------------------------ copies
async def test_copy_out_now_and_in_the_background_are_bit_exact() -> None:
    data = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8)
    source = source_of(data.view(np.float16).reshape(512, 1024))
    now, later = bytearray(4096), bytearray(1 << 19)
    copy = copy_out(source, 100, memoryview(now), pinned=False)
    assert copy.done() and copy.error() is None and copy.event is None
    background = copy_out(source, 1 << 19, memoryview(later), pinned=False, background=True)
    await background.wait()
    assert background.done() and background.error() is None
    assert bytes(now) == data[100:4196].tobytes()
    assert bytes(later) == data[1 << 19 :].tobytes()


async def test_copy_out_refuses_bytes_outside_the_array() -> None:
    source = source_of(np.zeros(100, np.uint8))
    with pytest.raises(ValueError, match="outside a 100 B array"):
        copy_out(source, 90, memoryview(bytearray(20)), pinned=False)


def test_copy_in_fills_a_numpy_target_and_checks_it() -> None:
    src = memoryview(np.arange(64, dtype=np.uint16).tobytes())
    target = np.zeros((8, 8), np.uint16)
    assert copy_in(src, target, pinned=False).done()
    assert np.array_equal(target.reshape(-1), np.arange(64))
    with pytest.raises(ValueError, match="is 64 B, the layer 128 B"):
        copy_in(src, np.zeros(32, np.uint16), pinned=False)
    with pytest.raises(ValueError, match="contiguous"):
        copy_in(src, np.zeros((8, 16), np.uint16)[:, ::2], pinned=False)


class CudaInterfaceOnly:
    """What a torch CUDA tensor or a Numba device array shows kvship: the interface."""

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": (4,), "typestr": "<f2", "data": (1 << 40, False), "version": 3}


@pytest.mark.skipif(HAVE_CUPY, reason="checks the error where CuPy is missing")
def test_a_gpu_array_without_cupy_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match=r"no usable CuPy: install kvship\[gpu\]"):
        device_buffer(CudaInterfaceOnly())
    assert device_buffer(np.zeros(4)) is None


async def test_a_failed_background_copy_reports_its_error() -> None:
    source = source_of(np.zeros(8, np.uint8))
    copy = copy_out(source, 0, memoryview(bytes(8)), pinned=False, background=True)
    with pytest.raises(ValueError, match="read-only"):
        await copy.wait()
    assert isinstance(copy.error(), ValueError)


async def test_joined_copies_end_when_all_do() -> None:
    data = np.arange(1 << 16, dtype=np.uint8)
    source = source_of(data)
    out = bytearray(1 << 16)
    halves = [
        copy_out(source, i << 15, memoryview(out)[i << 15 : (i + 1) << 15], pinned=False,
                 background=True)
        for i in range(2)
    ]  # fmt: skip
    joined = StagingCopy.joined(halves)
    assert joined.nbytes == 1 << 16
    await joined.wait()
    assert all(h.done() for h in halves) and bytes(out) == data.tobytes()
    assert StagingCopy.joined([]).done()


# ------------------------------------------------------------ run allocator
@settings(max_examples=200, deadline=None)
@given(st.data())
def test_allocated_runs_never_overlap_and_all_come_back(data: st.DataObject) -> None:
    capacity = data.draw(st.integers(16, 4096), label="capacity")
    ring = RingAllocator(capacity)
    live: dict[int, int] = {}  # offset -> length
    for _ in range(data.draw(st.integers(1, 60), label="steps")):
        if live and data.draw(st.booleans(), label="release"):
            offset = data.draw(st.sampled_from(sorted(live)), label="which")
            ring.release(offset, live.pop(offset))
        else:
            lengths = data.draw(st.lists(st.integers(1, capacity // 4), min_size=1, max_size=4))
            start = ring.allocate_run(lengths)
            if start is None:
                continue
            for length in lengths:
                assert start + length <= capacity
                for other, other_len in live.items():
                    assert start + length <= other or other + other_len <= start
                live[start] = length
                start += length
        assert ring.in_use == sum(live.values())
    for offset, length in list(live.items()):
        ring.release(offset, length)
    assert ring.in_use == 0 and ring.allocate(capacity) == 0


def test_a_run_is_all_or_nothing() -> None:
    ring = RingAllocator(100)
    assert ring.allocate_run([30, 30]) == 0
    assert ring.allocate_run([30, 20]) is None  # 40 free at the end, 0 at the start
    assert ring.in_use == 60
    ring.release(0, 30)
    assert ring.allocate_run([20, 10]) == 60  # 40 free at the end take both
    with pytest.raises(ValueError):
        ring.allocate_run([60, 50])


# ------------------------------------------- put/receive/crash cycles (model)
class StagingModel:
    """An engine's side of staging, with the daemon's part played by the test: puts stage
    layers through the real arena, allocator, copies and outbox; "the daemon" checks each
    sent chunk's bytes, then releases it (in its own order); a crash drops the transfer
    with copies still running, as a failed Sender does."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.ring = RingAllocator(arena.size)
        self.sent: list[tuple[int, int, bytes]] = []  # (slot, length, expected bytes)
        self.failures: list[BaseException] = []
        self.running: list[StagingCopy] = []

    def new_outbox(self, expected: dict[int, bytes]) -> Outbox:
        def send(group: StagedGroup) -> None:
            slot = group.slot
            for i, length in enumerate(group.lengths):
                self.sent.append((slot, length, expected[group.first + i]))
                slot += length

        return Outbox(send, self.failures.append)

    def daemon_takes(self, rng: random.Random, count: int) -> None:
        rng.shuffle(self.sent)
        for slot, length, want in self.sent[:count]:
            assert bytes(self.arena.view(slot, length)) == want, "a chunk left before its copy"
            self.ring.release(slot, length)
        del self.sent[:count]


async def _cycle(model: StagingModel, rng: random.Random, cycle: int) -> None:
    chunk = rng.choice([64, 256, 1000])
    layers = [rng.randrange(1, 4 * chunk) for _ in range(rng.randrange(1, 4))]
    expected: dict[int, bytes] = {}
    outbox = model.new_outbox(expected)
    crash_at = rng.randrange(len(layers) + 1) if rng.random() < 0.3 else None
    index = 0
    for n, nbytes in enumerate(layers):
        if n == crash_at:
            break
        layer = np.frombuffer(rng.randbytes(nbytes), np.uint8)
        background = rng.random() < 0.5
        lengths = [min(chunk, nbytes - o) for o in range(0, nbytes, chunk)]
        per_group = max(1, len(lengths) if background else 1)
        offset = 0
        for start in range(0, len(lengths), per_group):
            run = lengths[start : start + per_group]
            for _ in range(1000):  # bounded: the arena frees up as the daemon takes chunks
                if (slot := model.ring.allocate_run(run)) is not None:
                    break
                await outbox_progress(outbox)
                model.daemon_takes(rng, len(model.sent))
            else:
                pytest.fail(f"cycle {cycle}: no arena room for {run} in 1000 rounds")
            for i, length in enumerate(run):
                expected[index + start + i] = layer[offset : offset + length].tobytes()
                offset += length
            dst = model.arena.view(slot, sum(run))
            copy = copy_out(
                source_of(layer), offset - sum(run), dst, pinned=False, background=background
            )
            model.running.append(copy)
            outbox.push(StagedGroup(n, index + start, offset - sum(run), slot, tuple(run), copy))
        index += len(lengths)
        if rng.random() < 0.5:
            model.daemon_takes(rng, rng.randrange(len(model.sent) + 1))
    if crash_at is None:
        await outbox.drain()
    else:
        outbox.cancel()
        # A crashed transfer's regions: the daemon releases what it got; what was never
        # sent goes with the connection (the arena is remapped): return it here.
        for copy in model.running:
            await copy.wait()
        unsent = _unsent(model, expected, outbox)
        for slot, length in unsent:
            model.ring.release(slot, length)
    model.daemon_takes(rng, len(model.sent))
    model.running.clear()
    assert model.ring.in_use == 0, f"cycle {cycle}: {model.ring.in_use} B leaked"
    assert not model.failures


def _unsent(model: StagingModel, expected: dict[int, bytes], outbox: Outbox) -> list[Any]:
    """Regions still allocated that were never sent: those the crash left behind."""
    sent = {slot for slot, _, _ in model.sent}
    return [
        (offset, length)
        for offset, (o, length, _) in list(model.ring._by_offset.items())
        if offset not in sent and o == offset
    ]


async def outbox_progress(outbox: Outbox) -> None:
    """Let the outbox's task send what its copies finished."""
    for _ in range(100):
        await asyncio.sleep(0)
        if not len(outbox):
            return
    await asyncio.sleep(0.001)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_ten_thousand_put_receive_crash_cycles_leak_no_slot(seed: int) -> None:
    """40 examples x 250 cycles = 10,000 randomized put / daemon-release / crash cycles."""
    rng = random.Random(seed)

    async def run() -> None:
        arena = Arena.create(1 << 14)
        try:
            model = StagingModel(arena)
            for cycle in range(250):
                await _cycle(model, rng, cycle)
        finally:
            arena.close()

    asyncio.run(run())
