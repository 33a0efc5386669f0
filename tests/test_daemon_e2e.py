"""End-to-end tests of kvshipd: two real daemon processes, real engines (kvship.Client),
real Unix and TCP sockets, real KV samples."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import (
    free_port,
    good_transfer,
    random_layers,
    receive_all,
    running_pair,
    same_bytes,
    send_layers,
    wait_for_condition,
)
from kvship import Client
from kvship.bench.spawn import DaemonProcess
from kvship.errors import (
    DaemonUnavailable,
    PeerUnreachable,
    RequestNotFound,
    TransferError,
)
from kvship.protocol import ErrorCode, LayerSpec
from testdata import DTYPES, KV, kv_path
from testdata import token_ids as sample_token_ids

MIB = 1024 * 1024
SAMPLE_FILES = [kv_path("prose", dtype).name for dtype in DTYPES]  # tests/data/kv: bf16, fp16, fp8
METRIC_FAMILIES = [
    "kvship_payload_sent_bytes",
    "kvship_payload_received_bytes",
    "kvship_chunks_sent",
    "kvship_chunks_received",
    "kvship_transfers",
    "kvship_protocol_errors",
    "kvship_transfers_in_flight",
    "kvship_staged_bytes",
    "kvship_connections",
]


def http_get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, 4xx/5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


# ---------------------------------------------------------- 9. real samples
@pytest.fixture(scope="module")
def token_ids() -> list[int]:
    return sample_token_ids("prose")


def load_layers(name: str) -> list[np.ndarray]:
    """A sample file of tests/data/kv as its 30 layers (the first axis)."""
    kv = np.load(KV / name)
    assert kv.shape[0] == 30
    return [np.ascontiguousarray(kv[i]) for i in range(kv.shape[0])]


async def ship(
    src: DaemonProcess,
    dst: DaemonProcess,
    request_id: str,
    layers: list[np.ndarray],
    token_ids: list[int],
    *,
    send_via: str,
    receive_via: str,
    subscribe_first: bool = True,
) -> None:
    """Send ``layers`` src -> dst through the engine API (``engine_socket``: shared memory,
    ``engine``: TCP) and check the receiver gets every layer bit-identical, with dtype,
    shape and token ids, and the same digest. With ``subscribe_first`` False the engine
    subscribes only once the whole transfer sits at the receiving daemon."""
    async with (
        Client(src.addresses[send_via]) as send_client,
        Client(dst.addresses[receive_via]) as recv_client,
    ):
        receiving = None
        if subscribe_first:
            receiving = asyncio.create_task(receive_all(recv_client, request_id))
        try:
            sending = send_layers(send_client, request_id, layers, dst.peer, token_ids=token_ids)
            result = await asyncio.wait_for(sending, 60)
            if receiving is None:
                receiving = asyncio.create_task(receive_all(recv_client, request_id))
            got, receiver = await asyncio.wait_for(receiving, 60)
        finally:
            if receiving is not None:
                receiving.cancel()
    assert sorted(got) == list(range(len(layers)))
    for i, layer in enumerate(layers):
        assert same_bytes(got[i], layer), f"{request_id}: layer {i} differs"
    assert list(receiver.token_ids) == token_ids
    assert receiver.complete and receiver.digest == result.digest  # digest_match
    assert result.total_bytes == sum(x.nbytes for x in layers)


@pytest.mark.parametrize("send_via", ["engine_socket", "engine"], ids=["shm", "tcp-send"])
@pytest.mark.parametrize("name", SAMPLE_FILES)
async def test_real_kv_samples_bit_exact(
    daemons: tuple[DaemonProcess, DaemonProcess], token_ids: list[int], name: str, send_via: str
) -> None:
    """Each sample file as 30 layers, put through shared memory (Unix socket) or the TCP
    engine API, received over shared memory: bit-identical, token ids intact."""
    a, b = daemons
    layers = load_layers(name)
    rid = f"sample-{send_via}-{Path(name).stem}"
    await ship(a, b, rid, layers, token_ids, send_via=send_via, receive_via="engine_socket")


async def test_real_kv_samples_bit_exact_tcp_receive(
    daemons: tuple[DaemonProcess, DaemonProcess], token_ids: list[int]
) -> None:
    """The samples end to end over the TCP engine API on both sides: each file three times
    (engine subscribed before the send, and twice after the transfer arrived)."""
    a, b = daemons
    for name in SAMPLE_FILES:
        layers = load_layers(name)
        for attempt, first in enumerate((True, False, False)):
            rid = f"sample-tcp-{Path(name).stem}-{attempt}"
            await ship(
                a, b, rid, layers, token_ids,
                send_via="engine", receive_via="engine", subscribe_first=first,
            )  # fmt: skip


async def test_tcp_receive_of_staged_transfer(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    """Repro of the bug above: multi-chunk layers (64 KiB chunks) that are all at the
    receiving daemon when the engine subscribes over TCP must still arrive bit-exact."""
    a, b = daemons
    for attempt in range(8):
        layers = random_layers(2, 256 * 1024, seed=90 + attempt)
        rid = f"staged-tcp-{attempt}"
        async with (
            Client(a.socket_path, chunk_bytes=65536) as sending,
            Client(b.addresses["engine"]) as receiving,
        ):
            await send_layers(sending, rid, layers, b.peer)
            got, receiver = await asyncio.wait_for(receive_all(receiving, rid), 30)
        for i, layer in enumerate(layers):
            assert same_bytes(got[i], layer), f"{rid}: layer {i} handed over corrupted"
        assert receiver.complete


# ------------------------------------------------------------ 10. streaming
async def test_first_layer_arrives_before_last_is_put(
    daemons: tuple[DaemonProcess, DaemonProcess],
) -> None:
    """Layer-wise pipelining: the receiver holds layer 0 while the sender has not yet put
    the last layer (the sender waits for that, bounded, before putting the rest)."""
    a, b = daemons
    arrays = random_layers(6, 512 * 1024, seed=10)
    events: list[tuple[str, int]] = []
    first = asyncio.Event()

    def on_layer(layer: int) -> None:
        events.append(("got", layer))
        first.set()

    async with Client(b.socket_path) as decode_engine, Client(a.socket_path) as prefill_engine:
        receiving = asyncio.create_task(receive_all(decode_engine, "streaming", on_layer=on_layer))
        try:
            layout = tuple(LayerSpec(x.dtype.name, x.shape, x.nbytes) for x in arrays)
            sender = await prefill_engine.send("streaming", layout, peer=b.peer)
            await sender.put(0, arrays[0])
            events.append(("put", 0))
            try:
                await asyncio.wait_for(first.wait(), 15)
            except TimeoutError:
                await sender.abort()
                pytest.fail("no layer reached the receiver before the sender finished putting")
            for i in range(1, len(arrays)):
                await sender.put(i, arrays[i])
                events.append(("put", i))
            result = await sender.finish(30)
            got, receiver = await asyncio.wait_for(receiving, 30)
        finally:
            receiving.cancel()
    assert events.index(("got", 0)) < events.index(("put", len(arrays) - 1))
    assert all(same_bytes(got[i], arrays[i]) for i in range(len(arrays)))
    assert receiver.digest == result.digest


# ------------------------------------------------------- 11. receive timeout
async def test_receive_of_unknown_request_times_out(
    daemons: tuple[DaemonProcess, DaemonProcess],
) -> None:
    async with Client(daemons[1].socket_path) as client:
        with pytest.raises(RequestNotFound) as info:
            await asyncio.wait_for(client.receive("never-sent", timeout=0.5), 10)
    assert info.value.code == ErrorCode.NOT_FOUND


# ---------------------------------------------------------- 12. control plane
async def test_control_plane(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    """/healthz, /metrics and /v1/transfers[/{id}] describe a finished transfer."""
    a, b = daemons
    request_id, result = await good_transfer(a, b, n_layers=3, layer_bytes=300_000, seed=12)
    total = 3 * 300_000

    for daemon in (a, b):
        status, ctype, body = await asyncio.to_thread(http_get, daemon.url("/healthz"))
        assert status == 200 and "json" in ctype
        health = json.loads(body)
        assert health["status"] == "ok" and health["node"] == daemon.name
        assert health["addresses"]["peer"] == daemon.peer

    for daemon, direction in ((a, "out"), (b, "in")):
        status, ctype, text = await asyncio.to_thread(http_get, daemon.url("/metrics"))
        assert status == 200 and ctype.startswith("text/plain")
        for family in METRIC_FAMILIES:
            assert f"# TYPE {family}" in text, f"{family} missing from {daemon.name}'s /metrics"
        done = daemon.metric("kvship_transfers_total", f'direction="{direction}"')
        assert done >= 1
        assert daemon.metric("kvship_transfers_in_flight", f'direction="{direction}"') == 0
    assert a.metric("kvship_payload_sent_bytes_total") >= total
    assert a.metric("kvship_chunks_sent_total") >= 3
    assert b.metric("kvship_payload_received_bytes_total") >= total
    assert b.metric("kvship_chunks_received_total") >= 3

    for daemon, direction in ((a, "out"), (b, "in")):
        listing = daemon.get_json("/v1/transfers")["transfers"]
        mine = [t for t in listing if t["request_id"] == request_id]
        assert len(mine) == 1, listing
        record = mine[0]
        assert record["direction"] == direction
        assert record["state"] == "complete" and record["error"] == ""
        assert record["total_bytes"] == record["bytes_done"] == total
        assert record["n_layers"] == 3 and record["chunks_done"] == record["n_chunks"]
        assert daemon.get_json(f"/v1/transfers/{record['transfer_id']}") == record
        assert daemon.get_json(f"/v1/transfers/{request_id}") == record
        status, _, body = await asyncio.to_thread(
            http_get, daemon.url("/v1/transfers/no-such-transfer")
        )
        assert status == 404 and "error" in json.loads(body)
    assert result.total_bytes == total


# ------------------------------------------------------ 14. peer unreachable
async def test_unreachable_peer(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    """Sending to a port where nothing listens fails with PeerUnreachable (bounded wait)."""
    a = daemons[0]
    nowhere = f"127.0.0.1:{free_port()}"
    arrays = random_layers(2, 64 * 1024, seed=14)
    async with Client(a.socket_path) as client:
        with pytest.raises(PeerUnreachable) as info:
            await asyncio.wait_for(
                client.send_arrays("unreachable", arrays, peer=nowhere, timeout=10), 15
            )
    assert info.value.code == ErrorCode.PEER_UNREACHABLE
    record = a.get_json("/v1/transfers/unreachable")
    assert record["state"] == "failed" and "PEER_UNREACHABLE" in record["error"]


# --------------------------------------------------------- 13. SIGTERM drain
async def test_sigterm_drains_running_transfer(tmp_path: Path) -> None:
    """SIGTERM mid-transfer: the running transfer completes, a new send is refused, and the
    daemon exits 0 within its drain deadline."""
    drain_s = 15.0
    with running_pair(tmp_path, ["--drain-timeout-s", str(drain_s)]) as (a, b):
        assert a.proc is not None
        arrays = random_layers(8, 256 * 1024, seed=13)
        put: list[int] = []

        async def slow_send(client: Client) -> Any:
            layout = tuple(LayerSpec(x.dtype.name, x.shape, x.nbytes) for x in arrays)
            sender = await client.send("draining", layout, peer=b.peer)
            for i, array in enumerate(arrays):
                await sender.put(i, array)
                put.append(i)
                await asyncio.sleep(0.25)
            return await sender.finish(30)

        health: list[tuple[int, str]] = []

        async def draining() -> bool:
            status, _, body = await asyncio.to_thread(http_get, a.url("/healthz"))
            health.append((status, body))
            return status != 200

        async with Client(a.socket_path) as prefill_engine, Client(b.socket_path) as decode_engine:
            receiving = asyncio.create_task(receive_all(decode_engine, "draining"))
            sending = asyncio.create_task(slow_send(prefill_engine))
            try:
                await wait_for_condition(
                    lambda: len(put) >= 2 or sending.done(), 10, "a few layers to be out"
                )
                assert not sending.done() and len(put) >= 2
                a.proc.send_signal(signal.SIGTERM)
                stopped_at = time.monotonic()
                await wait_for_condition(draining, 10, "the SIGTERM to land (/healthz not 200)")
                status, body = health[-1]
                assert status == 503 and json.loads(body)["status"] == "draining"
                async with Client(a.socket_path) as late_engine:
                    with pytest.raises((TransferError, DaemonUnavailable)) as info:
                        await asyncio.wait_for(
                            late_engine.send_arrays(
                                "too-late", arrays[:1], peer=b.peer, timeout=10
                            ),
                            15,
                        )
                if isinstance(info.value, TransferError):
                    assert info.value.code == ErrorCode.SHUTTING_DOWN

                result = await asyncio.wait_for(sending, 30)
                got, receiver = await asyncio.wait_for(receiving, 30)
            finally:
                sending.cancel()
                receiving.cancel()
        assert put == list(range(8)), "the sender was cut off during the drain"
        assert all(same_bytes(got[i], arrays[i]) for i in range(8))
        assert receiver.complete and receiver.digest == result.digest
        code = await asyncio.to_thread(a.proc.wait, drain_s + 5)
        assert code == 0, a.log_tail()
        assert time.monotonic() - stopped_at < drain_s + 5
        # The decode daemon never saw "too-late".
        assert all(t["request_id"] != "too-late" for t in b.get_json("/v1/transfers")["transfers"])


# ------------------------------------------------------- 15. bounded memory
STAGING = 16 * MIB
WINDOW = 4 * MIB
CONNECTIONS = 4  # connections_per_peer (the default)


@pytest.fixture
def tight_pair(tmp_path: Path) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    args = [
        "--staging-bytes", str(STAGING),
        "--window-bytes", str(WINDOW),
        "--connections-per-peer", str(CONNECTIONS),
    ]  # fmt: skip
    with running_pair(tmp_path, args) as pair:
        yield pair


async def test_unclaimed_transfer_is_bounded_by_staging(
    tight_pair: tuple[DaemonProcess, DaemonProcess],
) -> None:
    """256 MiB to a daemon whose engine has not subscribed yet: the sender blocks instead of
    the receiving daemon buffering it all; once an engine subscribes everything arrives
    bit-exact, and the staged bytes never exceed staging_bytes + 2 x window x connections
    (what was in flight when staging filled, and the credit the finishing rule grants the
    connections of the first incomplete layer once an engine claims it: kvship.daemon.budget)."""
    a, b = tight_pair
    n_layers, layer_bytes = 64, 4 * MIB
    base = np.random.default_rng(15).integers(0, 256, layer_bytes, dtype=np.uint8)

    def layer(i: int) -> np.ndarray:
        return np.bitwise_xor(base, np.uint8(i))

    samples: list[float] = []
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        for _ in range(3000):  # bounded: at most ~5 min of samples
            samples.append(await asyncio.to_thread(b.metric, "kvship_staged_bytes"))
            if stop_sampling.is_set():
                return
            await asyncio.sleep(0.05)

    async def send(client: Client) -> Any:
        layout = (LayerSpec("uint8", (layer_bytes,), layer_bytes),) * n_layers
        sender = await client.send("big", layout, peer=b.peer)
        for i in range(n_layers):
            await sender.put(i, layer(i))
        return await sender.finish(120)

    async with Client(a.socket_path) as prefill_engine, Client(b.socket_path) as decode_engine:
        sampler = asyncio.create_task(sample())
        sending = asyncio.create_task(send(prefill_engine))
        try:
            done, _ = await asyncio.wait({sending}, timeout=2.0)
            assert not done, "256 MiB were accepted with no receiver: nothing pushed back"
            assert samples and max(samples) > 0, "nothing was staged on the receiving daemon"

            receiver = await decode_engine.receive("big", timeout=30)
            seen = 0
            async for i, array in receiver.layers():
                assert np.array_equal(array, layer(i)), f"layer {i} differs"
                seen += 1
                if seen > n_layers:
                    break
            result = await asyncio.wait_for(sending, 120)
        finally:
            stop_sampling.set()
            sending.cancel()
            await asyncio.wait_for(sampler, 30)
    assert seen == n_layers and receiver.complete and receiver.digest == result.digest
    assert result.total_bytes == n_layers * layer_bytes
    bound = STAGING + 2 * WINDOW * CONNECTIONS
    assert max(samples) <= bound, f"staged {max(samples) / MIB:.1f} MiB > {bound / MIB} MiB"
    assert b.metric("kvship_staged_bytes") == 0
