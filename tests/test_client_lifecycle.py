"""Engines open and close transfers the way Python code does: ``async with`` for clients,
sends and receives; whatever way a block is left, the transfer is finished or aborted and
its connection is pooled only if it ended cleanly; ``Client.aclose`` closes everything
the client made (busy connections, arenas, the lookup HTTP session)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import off_loop, random_layers, running_pair, wait_for_condition
from kvship import Client
from kvship.bench.spawn import DaemonProcess
from kvship.errors import DaemonConnectionLost, KvshipError
from kvship.layout import layout_of
from kvship.layout.model import FullAttention, ModelLayout

MODEL = ModelLayout("tiny", "tiny-lifecycle", (FullAttention(16, 2, 64),) * 2)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, ...]]:
    with running_pair(tmp_path_factory.mktemp("lifecycle")) as p:
        yield p


def shm_maps() -> int:
    """Staging arenas this process has mapped (unlinked ones show as "(deleted)")."""
    return sum("/dev/shm/kvship-" in line for line in Path("/proc/self/maps").open())


def engine_connections(daemon: DaemonProcess) -> float:
    return daemon.metric("kvship_connections", 'kind="engine_unix"')


def record(daemon: DaemonProcess, rid: str) -> dict[str, object]:
    return dict(daemon.get_json(f"/v1/transfers/{rid}"))


def failed_with(daemon: DaemonProcess, rid: str, code: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            r = record(daemon, rid)
        except OSError:  # 404 until the daemon knows it
            return False
        return r["state"] == "failed" and code in str(r["error"])

    return check


async def test_send_block_left_by_an_exception_aborts(pair: tuple[DaemonProcess, ...]) -> None:
    a, b = pair
    arrays = random_layers(3, 64 << 10, seed=1)
    async with Client(a.socket_path) as client:
        with pytest.raises(RuntimeError, match="forward pass failed"):
            async with client.send("ctx-raise", layout_of(arrays), peer=b.peer) as sender:
                await sender.put(0, arrays[0])
                raise RuntimeError("forward pass failed")
        await wait_for_condition(
            off_loop(failed_with(a, "ctx-raise", "CANCELLED")), what="the send aborted"
        )
        assert client._live == set() and client._idle["send"] == []  # closed, not pooled
        with pytest.raises(KvshipError):  # the transfer is over
            await sender.put(1, arrays[1])


async def test_send_block_left_without_finish_aborts(pair: tuple[DaemonProcess, ...]) -> None:
    a, b = pair
    arrays = random_layers(3, 64 << 10, seed=2)
    async with Client(a.socket_path) as client:
        async with client.send("ctx-unfinished", layout_of(arrays), peer=b.peer) as sender:
            for i, array in enumerate(arrays):
                await sender.put(i, array)
        await wait_for_condition(
            off_loop(failed_with(a, "ctx-unfinished", "CANCELLED")), what="the send aborted"
        )
        assert client._live == set()


async def test_finished_send_and_complete_receive_pool_their_connections(
    pair: tuple[DaemonProcess, ...],
) -> None:
    a, b = pair
    arrays = random_layers(3, 64 << 10, seed=3)
    async with Client(a.socket_path) as sending, Client(b.socket_path) as receiving:
        # Both forms: the Opening is a coroutine, so create_task takes it as it is.
        subscribed = asyncio.create_task(receiving.receive("ctx-ok", timeout=20))
        async with sending.send("ctx-ok", layout_of(arrays), peer=b.peer) as sender:
            for i, array in enumerate(arrays):
                await sender.put(i, array)
            result = await sender.finish(20)
        async with await subscribed as receiver:
            got = {layer: kv.copy() async for layer, kv in receiver}
        assert receiver.complete and receiver.digest == result.digest
        assert all(np.array_equal(got[i], arrays[i]) for i in range(3))
        assert record(a, "ctx-ok")["state"] == "complete"
        assert len(sending._idle["send"]) == 1 and len(receiving._idle["recv"]) == 1
        with pytest.raises(KvshipError, match="iterate it once"):
            receiver.layers()
        await sender.abort()  # after a clean finish: does nothing to the pooled connection
        assert sending._idle["send"][0].is_open


@pytest.mark.parametrize("form", ["async with", "bare break"])
async def test_breaking_out_of_a_receive_releases_its_connection(
    pair: tuple[DaemonProcess, ...], form: str
) -> None:
    a, b = pair
    rid = f"ctx-break-{form.replace(' ', '-')}"
    arrays = random_layers(4, 256 << 10, seed=4)
    before = engine_connections(b)
    async with Client(a.socket_path) as sending, Client(b.socket_path) as client:
        sent = asyncio.create_task(sending.send_arrays(rid, arrays, peer=b.peer, timeout=20))
        if form == "async with":
            async with client.receive(rid, timeout=20) as receiver:
                async for _layer, _kv in receiver:
                    break
            assert client._live == set()  # closed on the way out, at once
        else:
            receiver = await client.receive(rid, timeout=20)
            async for _layer, _kv in receiver:
                break  # the iterator is dropped here; its finalizer closes the connection
            await wait_for_condition(lambda: client._live == set(), what="the connection to close")
        assert client._idle["recv"] == [] and not receiver.complete
        await asyncio.wait_for(sent, 20)  # the sender's side was done: the far daemon has it
        # The daemon saw the engine go (and dropped whatever it had not delivered yet).
        await wait_for_condition(
            off_loop(lambda: engine_connections(b) == before), what="the daemon to see it close"
        )


async def test_aclose_closes_busy_connections_arenas_and_the_http_session(
    pair: tuple[DaemonProcess, ...],
) -> None:
    a, b = pair
    gc.collect()  # arenas earlier tests left to the collector must not go mid-test
    maps_before = shm_maps()
    arrays = random_layers(2, 64 << 10, seed=5)
    tokens = list(range(64))
    client = Client(a.socket_path, control=b.addresses["control"])
    sender = await client.send("ctx-aclose", layout_of(arrays), peer=b.peer)
    await sender.put(0, arrays[0])
    assert await client.lookup(tokens, MODEL) == 0
    http = client._http
    assert await client.lookup(tokens, MODEL) == 0 and client._http is http  # one session
    assert http is not None and len(client._live) == 1 and shm_maps() > maps_before

    await client.aclose()
    assert client.closed and http.closed and client._live == set()
    assert shm_maps() == maps_before  # the busy connection's arena is unmapped
    with pytest.raises(DaemonConnectionLost, match="Client was closed"):
        await sender.put(1, arrays[1])
    with pytest.raises(KvshipError, match="closed"):
        await client.send("after-aclose", layout_of(arrays), peer=b.peer)
    await client.aclose()  # idempotent
    await wait_for_condition(
        off_loop(failed_with(a, "ctx-aclose", "CANCELLED")), what="the send cancelled"
    )


async def test_aclose_fails_a_waiting_receive(pair: tuple[DaemonProcess, ...]) -> None:
    b = pair[1]
    client = Client(b.socket_path)
    waiting = asyncio.create_task(client.receive("ctx-never", timeout=20))
    await wait_for_condition(lambda: len(client._live) == 1, what="the subscription")
    await client.aclose()
    with pytest.raises(DaemonConnectionLost, match="Client was closed"):
        await asyncio.wait_for(waiting, 10)
