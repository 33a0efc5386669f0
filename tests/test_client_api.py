"""The engine-facing API beyond the async basics: the blocking SyncClient (its calls, its
context managers, and that close() leaves nothing behind), bf16 layers without ml_dtypes,
and transfer priorities on a capped link."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import off_loop, random_layers, running_pair, wait_for_condition, wait_until
from kvship import Client, SyncClient
from kvship.bench.spawn import DaemonProcess
from kvship.errors import KvshipError
from kvship.layout import as_array, layer_spec, layout_of, spec_of, storage_dtype
from kvship.layout.model import FullAttention, ModelLayout
from kvship.protocol import LayerSpec

MODEL = ModelLayout("tiny", "tiny-sync", (FullAttention(16, 2, 64),) * 2)


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, ...]]:
    args = ["--peer-rate", "80mbit", "--peer-burst", "1MiB"]
    with running_pair(tmp_path_factory.mktemp("capped"), args) as pair:
        yield pair


def test_sync_client_round_trip(capped: tuple[DaemonProcess, ...]) -> None:
    a, b = capped
    layers = [np.arange(20000, dtype=np.float32) * i for i in range(3)]
    got: list[tuple[int, np.ndarray]] = []

    def receive() -> None:
        with SyncClient(b.socket_path) as client:
            for layer, array in client.receive("sync-2", timeout=20):
                got.append((layer, array))

    thread = threading.Thread(target=receive)
    thread.start()
    with SyncClient(a.socket_path) as sender:
        result = sender.send_arrays("sync-2", layers, peer=b.peer, timeout=20)
    thread.join(30)
    assert not thread.is_alive()
    assert result.total_bytes == sum(x.nbytes for x in layers)
    assert sorted(layer for layer, _ in got) == [0, 1, 2]
    for layer, array in got:
        assert np.array_equal(array, layers[layer])  # copies: still intact after iteration


def test_sync_client_background_puts_and_receive_into_buffers(
    capped: tuple[DaemonProcess, ...],
) -> None:
    """The GPU engine's calls, blocking: puts that return before their copy ends, and a
    receive into the engine's own buffers (numpy here; CuPy/torch on a GPU)."""
    a, b = capped
    layers = [np.arange(50000, dtype=np.float32) * i for i in range(3)]
    targets = [np.empty_like(layer) for layer in layers]
    order: list[int] = []

    def receive() -> None:
        with SyncClient(b.socket_path) as client, client.receive("sync-dev", timeout=20) as rx:
            for layer, copy in rx.to_device(targets, background=True):
                copy.wait()
                assert copy.done() and copy.event is None
                order.append(layer)

    thread = threading.Thread(target=receive)
    thread.start()
    with (
        SyncClient(a.socket_path) as client,
        client.send("sync-dev", layout_of(layers), peer=b.peer) as sender,
    ):
        copies = [sender.put(i, layer, background=True) for i, layer in enumerate(layers)]
        sender.finish(timeout=20)
        for copy in copies:
            copy.wait()
            assert copy.done()
    thread.join(30)
    assert not thread.is_alive() and sorted(order) == [0, 1, 2]
    assert all(np.array_equal(t, w) for t, w in zip(targets, layers, strict=True))


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def shm_maps() -> int:
    """Staging arenas this process has mapped (unlinked ones show as "(deleted)")."""
    return sum("/dev/shm/kvship-" in line for line in Path("/proc/self/maps").open())


def kvship_threads() -> int:
    return sum(t.name == "kvship" and t.is_alive() for t in threading.enumerate())


def test_sync_client_context_managers_lookup_and_close_leave_nothing_behind(
    capped: tuple[DaemonProcess, ...],
) -> None:
    a, b = capped
    arrays = random_layers(3, 128 << 10, seed=7)
    gc.collect()  # what earlier tests left for the collector must not close mid-test
    fds, maps, threads = open_fds(), shm_maps(), kvship_threads()
    received: dict[int, np.ndarray] = {}
    receiver_done = threading.Event()

    def receive() -> None:
        with (
            SyncClient(b.socket_path) as client,
            client.receive("sync-with", timeout=20) as receiver,
        ):
            for layer, array in receiver:
                received[layer] = array
            assert receiver.complete
        receiver_done.set()

    thread = threading.Thread(target=receive)
    thread.start()
    client = SyncClient(a.socket_path, control=b.addresses["control"])
    assert client.lookup(list(range(64)), MODEL) == 0
    with client.send("sync-with", layout_of(arrays), peer=b.peer) as sender:
        for i, array in enumerate(arrays):
            sender.put(i, array)
        result = sender.finish(20)
    # Leaving the block by an exception aborts the transfer.
    with (
        pytest.raises(RuntimeError, match="engine failed"),
        client.send("sync-abort", layout_of(arrays), peer=b.peer) as sender,
    ):
        sender.put(0, arrays[0])
        raise RuntimeError("engine failed")
    wait_until(lambda: a.get_json("/v1/transfers/sync-abort")["state"] == "failed")
    client.close()
    client.close()  # idempotent
    with pytest.raises(KvshipError, match="closed"):
        client.send("after-close", layout_of(arrays), peer=b.peer)
    thread.join(30)
    assert receiver_done.is_set() and not thread.is_alive()
    assert result.total_bytes == sum(x.nbytes for x in arrays)
    assert all(np.array_equal(received[i], arrays[i]) for i in range(3))

    gc.collect()
    assert open_fds() == fds  # sockets, the loop's selector and self-pipe, HTTP session
    assert shm_maps() == maps  # every arena unmapped
    assert kvship_threads() == threads  # the loop thread joined


def test_sync_receiver_break_closes_its_connection(capped: tuple[DaemonProcess, ...]) -> None:
    a, b = capped
    arrays = random_layers(3, 128 << 10, seed=8)
    with SyncClient(a.socket_path) as sending, SyncClient(b.socket_path) as client:
        sending.send_arrays("sync-break", arrays, peer=b.peer, timeout=20)
        receiver = client.receive("sync-break", timeout=20)
        for _layer, _array in receiver:
            break
        assert not receiver.complete
        assert client.client._live == set() and client.client._idle["recv"] == []


async def test_bf16_layers_keep_their_shape_without_ml_dtypes(
    capped: tuple[DaemonProcess, ...],
) -> None:
    """numpy here has no bfloat16 (no ml_dtypes): a bf16 layer travels labelled
    "bfloat16", is put as its uint16 stand-in, and arrives as uint16 of its shape."""
    a, b = capped
    try:
        np.dtype("bfloat16")
        pytest.skip("ml_dtypes is loaded: numpy knows bfloat16 here")
    except TypeError:
        pass
    shape = (2, 17, 4, 32)
    spec = layer_spec("bfloat16", shape)
    assert spec == LayerSpec("bfloat16", shape, 2 * int(np.prod(shape)))
    assert storage_dtype("bfloat16") == np.uint16
    assert storage_dtype("float8_e4m3fn") == np.uint8
    bits = [np.random.default_rng(i).integers(0, 1 << 16, shape, dtype=np.uint16) for i in range(3)]
    assert spec_of(bits[0]) == LayerSpec("uint16", shape, spec.nbytes)  # what numpy sees
    view = as_array(memoryview(bits[0].tobytes()), spec)
    assert view.dtype == np.uint16 and view.shape == shape and np.array_equal(view, bits[0])
    # Only a spec whose shape cannot hold its bytes comes back flat.
    assert as_array(memoryview(bytes(12)), LayerSpec("float32", (2, 3), 12)).shape == (12,)

    async with Client(a.socket_path) as sending, Client(b.socket_path) as receiving:
        rx = asyncio.create_task(receiving.receive("bf16-shape", timeout=20))
        async with sending.send("bf16-shape", (spec,) * 3, peer=b.peer) as sender:
            for i, layer in enumerate(bits):
                await sender.put(i, layer)
            await sender.finish(20)
        async with await rx as receiver:
            assert receiver.layout == (spec,) * 3
            got = await receiver.all()
    for i, array in enumerate(got):
        assert array.dtype == np.uint16 and array.shape == shape
        assert np.array_equal(array, bits[i])


async def test_put_checks_the_layer_against_the_layout(capped: tuple[DaemonProcess, ...]) -> None:
    a, b = capped
    async with Client(a.socket_path) as client:
        layout = (layer_spec("bfloat16", (4, 8)),)
        async with client.send("wrong-dtype", layout, peer=b.peer) as sender:
            with pytest.raises(ValueError, match="the layout says bfloat16"):
                await sender.put(0, np.zeros((4, 8), np.float16))  # same size, not bf16 bits
            with pytest.raises(IndexError):
                await sender.put(1, np.zeros((4, 8), np.uint16))


@pytest.mark.parametrize(
    ("second", "first_done"), [("latency", "second"), ("bulk", "first")], ids=["latency", "bulk"]
)
async def test_latency_transfer_overtakes_bulk_on_a_capped_link(
    capped: tuple[DaemonProcess, ...], second: str, first_done: str
) -> None:
    """80 Mbit/s cap, two transfers of the same size, the second started once the first
    is on the wire. Shared byte-fairly (both "bulk"), the first, with its head start,
    finishes first; a "latency" second one takes the link and finishes first. So the
    test fails if priority is broken, not only if sharing is."""
    a, b = capped
    finished: list[str] = []
    size = 6 << 20

    async def ship(rid: str, priority: str) -> None:
        # Random bytes: compression (auto, the cap binds) must not shrink them away.
        layers = [np.random.default_rng(i).bytes(size // 4) for i in range(4)]
        arrays = [np.frombuffer(x, dtype=np.uint8) for x in layers]
        async with (
            Client(b.socket_path) as receiving,
            Client(a.socket_path, chunk_bytes=256 << 10) as sending,
        ):
            drained = asyncio.create_task(_drain(receiving, rid))
            async with sending.send(
                rid, layout_of(arrays), peer=b.peer, priority=priority
            ) as sender:
                for i, array in enumerate(arrays):
                    await sender.put(i, array)
                await sender.finish(timeout=60)
            await asyncio.wait_for(drained, 60)
        finished.append(rid)

    label = f'peer="{b.peer}"'
    sent_before = a.metric("kvship_payload_sent_bytes", label)
    first = asyncio.create_task(ship(f"first-{second}", "bulk"))
    await wait_for_condition(
        off_loop(lambda: a.metric("kvship_payload_sent_bytes", label) > sent_before + (1 << 20)),
        timeout=30,
        what="the first transfer on the wire",
    )
    await ship(f"second-{second}", second)
    await first
    assert finished[0] == f"{first_done}-{second}", finished


async def _drain(client: Client, rid: str) -> None:
    async with client.receive(rid, timeout=60) as receiver:
        await receiver.all()
