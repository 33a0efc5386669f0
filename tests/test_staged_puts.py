"""Puts whose copy runs on after ``put`` returns, and receives into caller buffers, through
real daemons: the code path GPU engines take, run here with copies in a worker thread
(numpy ``background=True``) and numpy targets."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator

import numpy as np
import pytest

from conftest import running_pair, wait_for_condition
from kvship import Client
from kvship.bench.spawn import DaemonProcess
from kvship.errors import KvshipError
from kvship.layout import layout_of
from kvship.staging import StagingCopy

MIB = 1 << 20


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, ...]]:
    with running_pair(tmp_path_factory.mktemp("staged")) as p:
        yield p


def layers_for(seed: int, sizes: list[int]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1 << 16, n // 2, dtype=np.uint16) for n in sizes]


async def test_background_puts_of_layers_larger_than_half_the_arena_arrive_bit_exact(
    pair: tuple[DaemonProcess, ...],
) -> None:
    """8 MiB arena, 1 MiB chunks: a 6 MiB layer is staged as two groups of four chunks
    (two copies in flight at most); puts return before their copies end."""
    a, b = pair
    layers = layers_for(1, [6 * MIB, 3 * MIB, 512 * 1024, 6 * MIB])
    async with (
        Client(a.socket_path, chunk_bytes=MIB, arena_bytes=8 * MIB) as prefill,
        Client(b.socket_path) as decode,
    ):
        receiving = asyncio.create_task(_receive_all(decode, "bg-1"))
        async with prefill.send("bg-1", layout_of(layers), peer=b.peer) as sender:
            copies = [await sender.put(i, layer, background=True) for i, layer in enumerate(layers)]
            assert all(isinstance(c, StagingCopy) for c in copies)
            assert [c.nbytes for c in copies] == [layer.nbytes for layer in layers]
            assert not sender.pinned  # no GPU here: nothing to page-lock for
            result = await sender.finish(timeout=30)
        assert all(c.done() for c in copies)
        got = await asyncio.wait_for(receiving, 30)
    assert result.total_bytes == sum(layer.nbytes for layer in layers)
    assert all(np.array_equal(g, w) for g, w in zip(got, layers, strict=True))


async def _receive_all(client: Client, rid: str) -> list[np.ndarray]:
    async with client.receive(rid, timeout=30) as rx:
        return await rx.all()


@pytest.mark.parametrize("background", [False, True], ids=["now", "background"])
@pytest.mark.parametrize("path", ["engine_socket", "engine"])
async def test_to_device_fills_caller_buffers_and_frees_the_arena(
    pair: tuple[DaemonProcess, ...], path: str, background: bool
) -> None:
    """Receive into the caller's arrays (numpy here, CuPy/torch on a GPU), on the shared
    arena and the TCP path; four transfers of 7 MiB on one pooled connection with a 16 MiB
    arena show every arena region went back to the daemon (else the third one stalls)."""
    a, b = pair
    async with (
        Client(a.socket_path) as prefill,
        Client(b.addresses[path], receive_arena_max=16 * MIB) as decode,
    ):
        for n in range(4):
            rid = f"todev-{path}-{background}-{n}"
            layers = layers_for(10 + n, [2 * MIB, 64 * 1024, 5 * MIB])
            targets = [np.empty_like(layer) for layer in layers]
            receiving = asyncio.create_task(_receive_into(decode, rid, targets, background))
            await prefill.send_arrays(rid, layers, peer=b.peer, timeout=30)
            order = await asyncio.wait_for(receiving, 30)
            assert sorted(order) == [0, 1, 2]
            assert all(np.array_equal(t, w) for t, w in zip(targets, layers, strict=True))


async def _receive_into(
    client: Client, rid: str, targets: list[np.ndarray], background: bool = False
) -> list[int]:
    """Receive into ``targets``; with ``background``, waits for the copies only at the
    end (the arena regions go back as each copy ends, not when the next layer is asked)."""
    order, copies = [], []
    async with client.receive(rid, timeout=10) as rx:
        layers = rx.to_device(lambda i, spec: targets[i], background=background)
        async for layer, copy in layers:
            if not background:
                await copy.wait()
            order.append(layer)
            copies.append(copy)
    for copy in copies:
        await copy.wait()
    return order


async def test_a_target_of_the_wrong_size_fails_the_receive_clearly(
    pair: tuple[DaemonProcess, ...],
) -> None:
    a, b = pair
    layers = layers_for(3, [MIB])
    async with Client(a.socket_path) as prefill, Client(b.socket_path) as decode:
        receiving = asyncio.create_task(
            _receive_into(decode, "todev-bad", [np.empty(10, np.uint16)])
        )
        await prefill.send_arrays("todev-bad", layers, peer=b.peer, timeout=30)
        with pytest.raises(ValueError, match="the target is 20 B, the layer 1048576 B"):
            await asyncio.wait_for(receiving, 30)


async def test_randomized_puts_receives_and_crashes_leave_no_slot_behind(
    pair: tuple[DaemonProcess, ...],
) -> None:
    """60 transfers, a random mix of layer sizes, background copies, to_device receives,
    and crashes (an abort mid-put, a sender connection dropped, a receiver leaving early);
    afterwards the pooled connections' arenas are empty, the daemons hold no staged bytes
    and no transfer, and no arena file is left in /dev/shm."""
    a, b = pair
    rng = random.Random(7)
    shm_before = _arenas()
    async with (
        Client(a.socket_path, chunk_bytes=256 * 1024, arena_bytes=2 * MIB) as prefill,
        Client(b.socket_path) as decode,
    ):
        for n in range(60):
            await _random_cycle(prefill, decode, b.peer, rng, f"rand-{n}")
        for client in (prefill, decode):
            for conn in client._live:
                assert conn.allocator is None or conn.allocator.in_use == 0
    await wait_for_condition(
        lambda: all(
            d.metric("kvship_transfers_in_flight") == 0 and d.metric("kvship_staged_bytes") == 0
            for d in (a, b)
        ),
        what="both daemons idle",
    )
    assert _arenas() <= shm_before


def _arenas() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith(f"kvship-{os.getpid()}-")}


async def _random_cycle(
    prefill: Client, decode: Client, peer: str, rng: random.Random, rid: str
) -> None:
    sizes = [rng.choice([4096, 300_000, 1_500_000, 3 * MIB]) for _ in range(rng.randrange(1, 5))]
    layers = layers_for(rng.randrange(1 << 30), sizes)
    crash = rng.choice([None, None, None, "abort", "drop", "leave"])
    into = rng.random() < 0.5
    receiving = asyncio.create_task(_receive_maybe_early(decode, rid, layers, crash, into))
    try:
        async with prefill.send(rid, layout_of(layers), peer=peer) as sender:
            for i, layer in enumerate(layers):
                if crash in ("abort", "drop") and i == len(layers) - 1:
                    if crash == "abort":
                        await sender.abort()
                    else:
                        sender._conn.close("dropped by the test")
                    raise _Crashed
                await sender.put(i, layer, background=rng.random() < 0.5)
            await sender.finish(timeout=30)
    except (_Crashed, KvshipError):
        assert crash is not None
    with_error = await asyncio.wait_for(asyncio.gather(receiving, return_exceptions=True), 30)
    if crash is None:
        assert with_error == [True], rid


class _Crashed(Exception):
    pass


async def _receive_maybe_early(
    client: Client, rid: str, layers: list[np.ndarray], crash: str | None, into: bool
) -> bool:
    """True once every layer arrived bit-exact; a crashed transfer may end either way (one
    aborted before it left the prefill daemon never reaches the decode side: NOT_FOUND)."""
    timeout = 1.0 if crash in ("abort", "drop") else 30.0
    async with client.receive(rid, timeout=timeout) as rx:
        if into:
            targets, copies = [np.empty_like(layer) for layer in layers], []
            async for _, copy in rx.to_device(targets, background=crash is None):
                if crash == "leave":
                    return False
                copies.append(copy)
            for copy in copies:
                await copy.wait()
            return all(np.array_equal(t, w) for t, w in zip(targets, layers, strict=True))
        async for layer, array in rx.layers():
            if not np.array_equal(array, layers[layer]):
                return False
            if crash == "leave":
                return False
        return True
