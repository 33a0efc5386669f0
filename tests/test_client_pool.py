"""Engines reuse their daemon connections and arenas across transfers (the client pool)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from conftest import running_pair, wait_until
from kvship import Client
from kvship.bench.spawn import DaemonProcess
from kvship.errors import RequestNotFound
from kvship.layout import layout_of


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, ...]]:
    with running_pair(tmp_path_factory.mktemp("pool")) as p:
        yield p


async def ship_many(sender: Client, receiver: Client, peer: str, n: int, tag: str) -> None:
    for i in range(n):
        layers = [np.full(4096 + 64 * j, i * 7 + j, dtype=np.uint16) for j in range(3)]
        rid = f"{tag}-{i}"
        receiving = asyncio.create_task(receiver.receive(rid, timeout=20))
        await sender.send_arrays(rid, layers, peer=peer, timeout=20)
        async with await receiving as rx:
            got = await asyncio.wait_for(rx.all(), 20)
        assert all(np.array_equal(g, w) for g, w in zip(got, layers, strict=True)), rid


@pytest.mark.parametrize("path", ["engine_socket", "engine"])
async def test_seventy_transfers_over_reused_connections(
    pair: tuple[DaemonProcess, ...], path: str
) -> None:
    """More transfers than max_transfers_per_connection (64): each connection's transfers
    are closed properly (END), so reuse never runs out of slots."""
    a, b = pair
    kind = "engine_unix" if path == "engine_socket" else "engine_tcp"
    async with Client(a.addresses[path]) as sender, Client(b.addresses[path]) as receiver:
        await ship_many(sender, receiver, b.peer, 70, f"pool-{kind}")
        # Two pooled connections per side at most (receive() runs beside send()).
        assert a.metric("kvship_connections", f'kind="{kind}"') <= 2
        assert b.metric("kvship_connections", f'kind="{kind}"') <= 2
        assert len(sender._live) == 1 and len(receiver._live) == 1  # the pooled ones
    wait_until(lambda: a.metric("kvship_connections", f'kind="{kind}"') == 0)
    wait_until(lambda: b.metric("kvship_connections", f'kind="{kind}"') == 0)


async def test_a_failed_receive_does_not_return_its_connection(
    pair: tuple[DaemonProcess, ...],
) -> None:
    b = pair[1]
    async with Client(b.socket_path) as client:
        with pytest.raises(RequestNotFound):
            await client.receive("never-sent-pool", timeout=0.3)
        assert client._idle["recv"] == []


async def test_close_is_idle_only_and_aclose_everything(pair: tuple[DaemonProcess, ...]) -> None:
    """The sync close() closes the pooled connections only; aclose() the busy ones too."""
    a, b = pair
    async with Client(a.socket_path) as client:
        await client.send_arrays("pool-idle", [np.zeros(4096, np.uint8)], peer=b.peer, timeout=20)
        busy = await client.send("pool-busy", layout_of([np.zeros(8, np.uint8)]), peer=b.peer)
        assert len(client._idle["send"]) == 0 and len(client._live) == 1  # the pooled one left
        idle = await client.send("pool-busy-2", layout_of([np.zeros(8, np.uint8)]), peer=b.peer)
        await idle.abort()
        await client.send_arrays("pool-idle-2", [np.zeros(4096, np.uint8)], peer=b.peer)
        assert len(client._idle["send"]) == 1 and len(client._live) == 2
        client.close()
        assert client._idle["send"] == [] and len(client._live) == 1  # the busy one is kept
        await busy.put(0, np.zeros(8, np.uint8))
        assert (await busy.finish(20)).total_bytes == 8
    assert client._live == set()
