"""Every failure reaches the engine as a typed kvship error (kvship.errors), never as a
bare OSError/ConnectionError/TimeoutError: above all when the *local* daemon dies in the
middle of a transfer (DaemonConnectionLost), which is not the far daemon being lost
(PeerUnreachable). Real daemons, killed with SIGKILL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import random_layers, running_pair
from kvship import Client
from kvship.bench.spawn import DaemonProcess
from kvship.client import Sender
from kvship.errors import (
    DaemonConnectionLost,
    DaemonUnavailable,
    ErrorCode,
    KvshipError,
    PeerUnreachable,
    TransferError,
)
from kvship.layout import layout_of

# A slow link keeps a transfer in flight for seconds: 4 MiB of random bytes at 8 Mbit/s.
# A killed decode daemon does not come back here: the sender stops resuming after 2 s.
CAPPED = ["--peer-rate", "8mbit", "--peer-burst", "256KiB", "--resume-timeout-s", "2"]
N_LAYERS, LAYER_BYTES = 4, 1 << 20
VIA = ["engine_socket", "engine"]  # the Unix socket (shared-memory arena) and TCP


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    with running_pair(tmp_path, CAPPED) as pair:
        yield pair


def kill(daemon: DaemonProcess) -> None:
    """SIGKILL: no GOAWAY, no drain; the kernel just closes its sockets."""
    assert daemon.proc is not None
    daemon.proc.kill()
    daemon.proc.wait(10)


def small_arena_client(address: str) -> Client:
    # A 256 KiB arena: a 1 MiB put waits for the daemon to release space as the capped
    # link drains, so the daemon dies while put() is waiting.
    return Client(address, arena_bytes=256 << 10, chunk_bytes=64 << 10)


async def put_rest_and_finish(sender: Sender, arrays: list[np.ndarray], stage: list[str]) -> Any:
    for i in range(1, len(arrays)):
        stage[0] = f"put {i}"
        await sender.put(i, arrays[i])
    stage[0] = "finish"
    return await sender.finish(30)


@pytest.mark.parametrize("via", VIA)
async def test_local_daemon_killed_mid_send(
    capped: tuple[DaemonProcess, DaemonProcess], via: str
) -> None:
    a, b = capped
    arrays = random_layers(N_LAYERS, LAYER_BYTES, seed=1)
    async with small_arena_client(a.addresses[via]) as client:
        sender = await client.send("killed-send", layout_of(arrays), peer=b.peer)
        await sender.put(0, arrays[0])
        stage = ["?"]
        sending = asyncio.create_task(put_rest_and_finish(sender, arrays, stage))
        await asyncio.sleep(0.3)
        assert not sending.done(), "the transfer was over before the daemon died"
        kill(a)
        with pytest.raises(KvshipError) as info:  # a KvshipError, never a bare OSError
            await asyncio.wait_for(sending, 10)
        error = info.value
        assert isinstance(error, DaemonConnectionLost), repr(error)
        assert isinstance(error, DaemonUnavailable) and not isinstance(error, TransferError)
        assert a.socket_path in str(error) or a.addresses["engine"] in str(error)
        # Shared memory: put() was waiting for arena space; TCP: every put was written
        # to the socket already, finish() was waiting for the acknowledgement.
        assert stage[0] == ("put 1" if via == "engine_socket" else "finish"), stage

        # The transfer stays failed with the same error, whatever is asked next.
        with pytest.raises(DaemonConnectionLost):
            await sender.put(N_LAYERS - 1, arrays[-1])
        with pytest.raises(DaemonConnectionLost):
            await sender.finish(5)
        await sender.abort()  # nothing left to abort: no error
        # A new transfer cannot even start: the daemon is not there.
        with pytest.raises(DaemonUnavailable) as again:
            await client.send("after-death", layout_of(arrays), peer=b.peer)
        assert not isinstance(again.value, DaemonConnectionLost)


@pytest.mark.parametrize("via", VIA)
async def test_local_daemon_killed_between_puts(
    capped: tuple[DaemonProcess, DaemonProcess], via: str
) -> None:
    """The daemon died while the engine was busy elsewhere: the next put says so."""
    a, b = capped
    arrays = random_layers(N_LAYERS, 64 << 10, seed=2)
    async with Client(a.addresses[via]) as client:
        sender = await client.send("killed-idle", layout_of(arrays), peer=b.peer)
        await sender.put(0, arrays[0])
        kill(a)
        await asyncio.sleep(0.3)  # the client's loop sees the connection close
        with pytest.raises(KvshipError) as info:
            await sender.put(1, arrays[1])
        assert isinstance(info.value, DaemonConnectionLost), repr(info.value)
        with pytest.raises(DaemonConnectionLost):
            await sender.finish(5)


@pytest.mark.parametrize("via", VIA)
async def test_local_daemon_killed_mid_receive(
    capped: tuple[DaemonProcess, DaemonProcess], via: str
) -> None:
    """The decode daemon dies after the first layer: the receiving engine gets
    DaemonConnectionLost; the sending engine's daemon lost its *peer*: PeerUnreachable."""
    a, b = capped
    arrays = random_layers(N_LAYERS, LAYER_BYTES, seed=3)
    async with Client(a.socket_path) as sending_client, Client(b.addresses[via]) as client:

        async def send() -> Any:
            sender = await sending_client.send("killed-recv", layout_of(arrays), peer=b.peer)
            for i, array in enumerate(arrays):
                await sender.put(i, array)
            return await sender.finish(30)

        sending = asyncio.create_task(send())
        got: list[int] = []
        receiver = await client.receive("killed-recv", timeout=20)
        with pytest.raises(KvshipError) as info:
            async for layer, array in receiver:
                assert np.array_equal(array, arrays[layer])
                got.append(layer)
                if len(got) == 1:
                    kill(b)
        assert got and len(got) < N_LAYERS
        assert isinstance(info.value, DaemonConnectionLost), repr(info.value)
        assert not receiver.complete

        with pytest.raises(KvshipError) as far:
            await asyncio.wait_for(sending, 30)
        assert isinstance(far.value, PeerUnreachable), repr(far.value)
        assert far.value.code == ErrorCode.PEER_UNREACHABLE


@pytest.mark.parametrize("via", VIA)
async def test_local_daemon_killed_while_receive_waits_for_the_transfer(
    capped: tuple[DaemonProcess, DaemonProcess], via: str
) -> None:
    b = capped[1]
    async with Client(b.addresses[via]) as client:
        waiting = asyncio.create_task(client.receive("never-comes", timeout=30))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        kill(b)
        with pytest.raises(KvshipError) as info:
            await asyncio.wait_for(waiting, 10)
        assert isinstance(info.value, DaemonConnectionLost), repr(info.value)
        assert client._live == set()  # the failed receive's connection is closed


async def test_finish_timeout_is_a_transfer_error_and_the_transfer_goes_on(
    capped: tuple[DaemonProcess, DaemonProcess],
) -> None:
    a, b = capped
    arrays = random_layers(2, 256 << 10, seed=4)  # 512 KiB: about half a second capped
    async with Client(a.socket_path) as client:
        sender = await client.send("slow-ack", layout_of(arrays), peer=b.peer)
        for i, array in enumerate(arrays):
            await sender.put(i, array)
        with pytest.raises(TransferError) as info:
            await sender.finish(timeout=0.01)
        assert info.value.code == ErrorCode.TIMEOUT
        result = await sender.finish(timeout=30)
        assert result.total_bytes == 2 * (256 << 10)


async def test_a_frozen_daemon_is_named_as_not_answering(tmp_path: Path) -> None:
    """A daemon that accepts but never shakes hands (stopped, or its loop blocked) used to
    give 'cannot reach kvshipd at X: ' and nothing after the colon (a bare TimeoutError)."""
    import signal

    with running_pair(tmp_path) as (a, _):
        assert a.proc is not None
        a.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(DaemonUnavailable) as info:
                async with Client(a.socket_path, connect_timeout=0.5) as client:
                    await client.prepare(send=1)
        finally:
            a.proc.send_signal(signal.SIGCONT)
    assert "no handshake within 0.5 s" in str(info.value), str(info.value)
