"""The engine-facing API beyond the async basics: the blocking SyncClient, and transfer
priorities on a capped link."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from conftest import running_pair
from kvship import Client, SyncClient
from kvship.bench.spawn import DaemonProcess
from kvship.layout import layout_of


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


async def test_latency_transfer_overtakes_bulk_on_a_capped_link(
    capped: tuple[DaemonProcess, ...],
) -> None:
    """80 Mbit/s cap: a latency transfer started after a bulk one finishes first."""
    a, b = capped
    finished: list[str] = []

    async def ship(rid: str, nbytes: int, priority: str) -> None:
        # Random bytes: compression (auto, the cap binds) must not shrink them away.
        layers = [np.random.default_rng(i).bytes(nbytes // 4) for i in range(4)]
        layers = [np.frombuffer(x, dtype=np.uint8) for x in layers]
        receiving = asyncio.create_task(_drain(Client(b.socket_path), rid))
        sender = await Client(a.socket_path, chunk_bytes=256 << 10).send(
            rid, layout_of(layers), peer=b.peer, priority=priority
        )
        for i, layer in enumerate(layers):
            await sender.put(i, layer)
        await sender.finish(timeout=60)
        await asyncio.wait_for(receiving, 60)
        finished.append(rid)

    bulk = asyncio.create_task(ship("bulk-1", 6 << 20, "bulk"))
    await asyncio.sleep(0.2)  # the bulk transfer is queued on the link first
    await ship("latency-1", 1 << 20, "latency")
    await bulk
    assert finished == ["latency-1", "bulk-1"]


async def _drain(client: Client, rid: str) -> None:
    receiver = await client.receive(rid, timeout=60)
    await receiver.all()
