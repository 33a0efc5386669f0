"""Transfers that survive their connections (SPEC §7.7): real daemons on loopback, the
peer traffic through tools/faultproxy.py, every connection reset mid-transfer; the bytes
arrive bit-exact and little is sent twice. And the clean failures: a receiving daemon that
restarted, a sender that never comes back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conftest import (
    LogMark,
    free_port,
    load_tool,
    random_layers,
    receive_all,
    same_bytes,
    send_layers,
)
from kvship import Client
from kvship.bench.spawn import DaemonProcess
from kvship.errors import KvshipError
from kvship.protocol import (
    CAP_RESUME,
    CAP_STRIPING,
    ROLE_PEER,
    Ack,
    Connection,
    ErrorCode,
    Hello,
    LayerSpec,
    LocalProtocolError,
    Open,
    ProtocolError,
    Resume,
    Role,
)

faultproxy = load_tool("faultproxy")

# Slow enough that three resets land mid-transfer: 24 MiB at 400 Mbit/s is ~0.5 s.
RATE = ["--peer-rate", "400mbit", "--peer-burst", "4MiB", "--resume-timeout-s", "20"]
LAYERS, LAYER_BYTES, CHUNK = 6, 4 << 20, 256 << 10


def kill(daemon: DaemonProcess) -> None:
    assert daemon.proc is not None
    daemon.proc.kill()
    daemon.proc.wait(10)


def pair(workdir: Path, *extra: str) -> tuple[DaemonProcess, DaemonProcess]:
    a = DaemonProcess("prefill", workdir, [*RATE, *extra]).start()
    try:
        b = DaemonProcess("decode", workdir, [*RATE, *extra]).start()
    except BaseException:
        a.stop()
        raise
    return a, b


@pytest.mark.parametrize(
    ("arena", "copy_min_rtt_s"),
    [(32 << 20, 0.005), (1 << 20, 0.0), (1 << 20, 0.005), (0, 0.0)],
    ids=["arena-32MiB", "arena-1MiB-copied", "arena-1MiB-loopback", "inline-1MiB-window"],
)
async def test_every_connection_reset_three_times_the_transfer_still_arrives(
    tmp_path: Path, arena: int, copy_min_rtt_s: float
) -> None:
    """With a 1 MiB sending arena and copies at any RTT (as on a long link), most chunks
    wait for their ACK as the daemon's copies (the engine's memory goes back at once):
    those are what the resets send again. At the default on loopback they wait in the
    arena, uncopied. Inline (TCP, a 1 MiB engine window) they wait as the bytes that came
    in, never copied."""
    window = ["--window-bytes", str(1 << 20)] if not arena else []
    a, b = pair(tmp_path, *window, "--unacked-copy-min-rtt-s", str(copy_min_rtt_s))
    try:
        arrays = random_layers(LAYERS, LAYER_BYTES, seed=11)
        host, port = b.peer.rsplit(":", 1)
        proxy = faultproxy.FaultProxy((host, int(port)), faultproxy.Schedule(seed=1))
        if arena:
            tx_client = Client(a.socket_path, chunk_bytes=CHUNK, arena_bytes=arena)
        else:
            tx_client = Client(a.addresses["engine"], chunk_bytes=CHUNK)
        async with proxy, Client(b.socket_path) as rx, tx_client as tx:
            receiving = asyncio.create_task(receive_all(rx, "resumed", timeout=30))
            sending = asyncio.create_task(
                send_layers(tx, "resumed", arrays, proxy.address, timeout=60)
            )
            resets = 0
            for _ in range(200):  # bounded: 10 s
                await asyncio.sleep(0.05)
                sent = a.metric("kvship_payload_sent_bytes")
                if sent > (resets + 1) * LAYERS * LAYER_BYTES / 5 and resets < 3:
                    resets += proxy.reset_all() > 0
                if resets == 3 or sending.done():
                    break
            result = await asyncio.wait_for(sending, 60)
            got, receiver = await asyncio.wait_for(receiving, 60)
        assert resets == 3, "the transfer finished before three resets"
        assert receiver.complete and sorted(got) == list(range(LAYERS))
        assert all(same_bytes(got[i], arrays[i]) for i in range(LAYERS))
        assert result is not None
        assert b.metric("kvship_transfers_resumed") >= 3
        resent = a.metric("kvship_chunks_resent")
        chunks = LAYERS * LAYER_BYTES // CHUNK
        assert 0 < resent < chunks / 2, resent  # the unacked ones only, not the transfer
        assert a.metric("kvship_transfers", 'outcome="complete"') >= 1
        copied = a.metric("kvship_unacked_copied_bytes")
        small_arena = 0 < arena < LAYERS * LAYER_BYTES // 4
        assert (copied > 0) == (small_arena and copy_min_rtt_s == 0), copied
    finally:
        a.stop()
        b.stop()


async def test_a_restarted_receiver_makes_the_sender_fail_cleanly(tmp_path: Path) -> None:
    port = free_port()
    fixed = ["--peer-listen", f"127.0.0.1:{port}"]
    a = DaemonProcess("prefill", tmp_path, RATE).start()  # ~0.3 s for the 16 MiB
    b = DaemonProcess("decode", tmp_path, fixed).start()
    try:
        arrays = random_layers(4, 4 << 20, seed=12)
        async with Client(a.socket_path) as tx:
            sending = asyncio.create_task(send_layers(tx, "restarted", arrays, b.peer, timeout=30))
            for _ in range(100):  # until the receiver acknowledged part of it
                await asyncio.sleep(0.05)
                if b.metric("kvship_chunks_received") > 0:
                    break
            await asyncio.sleep(0.1)  # its ACKs reached the sender
            kill(b)  # the way a crash does: no GOAWAY
            b = DaemonProcess("decode", tmp_path, fixed).start()
            with pytest.raises(KvshipError) as info:
                await asyncio.wait_for(sending, 30)
        assert "cannot resume" in str(info.value) or "UNKNOWN_TRANSFER" in str(info.value)
    finally:
        a.stop()
        b.stop()


async def test_a_sender_that_never_comes_back_fails_the_receiving_engine(
    tmp_path: Path,
) -> None:
    a, b = pair(tmp_path, "--resume-timeout-s", "1")
    try:
        arrays = random_layers(4, 4 << 20, seed=13)
        async with Client(b.socket_path) as rx, Client(a.socket_path) as tx:
            receiver = await asyncio.wait_for(asyncio.shield(_start(tx, rx, arrays, b)), 20)
            kill(a)  # the sending daemon dies mid-transfer
            with pytest.raises(KvshipError) as info:
                async for _ in receiver.layers(copy=True):
                    pass
        assert info.value.code in (ErrorCode.TIMEOUT, ErrorCode.PEER_UNREACHABLE), info.value
        assert not receiver.complete
    finally:
        a.stop()
        b.stop()


async def _start(tx: Client, rx: Client, arrays: list, b: DaemonProcess):  # type: ignore[no-untyped-def]
    layout = tuple(LayerSpec(x.dtype.name, tuple(x.shape), x.nbytes) for x in arrays)
    sender = await tx.send("abandoned", layout, peer=b.peer)
    await sender.put(0, arrays[0])
    return await rx.receive("abandoned", timeout=10)


def test_resume_needs_the_capability() -> None:
    a = Connection(role=Role.PEER, initiator=True)
    b = Connection(role=Role.PEER, initiator=False)
    b.receive_data(a.initiate(Hello(ROLE_PEER, "a", capabilities=CAP_STRIPING | CAP_RESUME)))
    a.receive_data(b.accept("b", CAP_STRIPING))  # this acceptor does not resume
    layers = (LayerSpec("uint8", (8,), 8),)
    with pytest.raises(LocalProtocolError, match="CAP_RESUME"):
        a.send(Open(1, "r", layers, 8, resume=True))
    with pytest.raises(ProtocolError):
        b.receive_data(Open(1, "r", layers, 8, resume=True).encode())


def test_ack_and_resume_frames_refuse_what_does_not_add_up() -> None:
    assert Resume.of(1, 10, {0, 9}).held_chunks() == {0, 9}
    bad = bytearray(Resume.of(1, 10, {0}).encode())
    bad[-1] |= 0x80  # chunk 15 of 10
    with pytest.raises(ProtocolError, match="past n_chunks"):
        Resume.decode(memoryview(bad)[8:])
    with pytest.raises(ProtocolError, match="ACK of 0"):
        Ack.decode(memoryview(Ack(1, ()).encode())[8:])


async def test_a_wedged_connection_is_found_and_the_transfer_resumes(tmp_path: Path) -> None:
    """A flipped bit in a length field (decode -> prefill) leaves the prefill side's reader
    waiting for a body that never comes, with TCP healthy: its PINGs go unanswered, the
    connection is closed as stuck, and the transfers on it resume on a new link."""
    fast = ["--connect-timeout-s", "2"]
    a, b = pair(tmp_path, *fast)
    try:
        host, port = b.peer.rsplit(":", 1)
        proxy = faultproxy.FaultProxy((host, int(port)), faultproxy.Schedule(seed=2))
        async with proxy, Client(b.socket_path) as rx, Client(a.socket_path) as tx:
            first = random_layers(2, 1 << 20, seed=14)
            await ship(tx, rx, "before-wedge", first, proxy.address)
            mark = LogMark.of(a)
            proxy.inject(faultproxy.Fault("flip", at=1, bit=3), faultproxy.DOWN)
            for i in range(6):  # across the wedge, its detection and the new link: ~3 s
                arrays = random_layers(4, 1 << 20, seed=15 + i)
                await asyncio.wait_for(ship(tx, rx, f"after-wedge-{i}", arrays, proxy.address), 30)
                await asyncio.sleep(0.5)
            await mark.wait_for_async("TIMEOUT", "no frame for")
        assert a.metric("kvship_transfers", 'outcome="complete"') >= 7
    finally:
        a.stop()
        b.stop()


async def ship(tx: Client, rx: Client, request_id: str, arrays: list, peer: str) -> None:  # type: ignore[type-arg]
    receiving = asyncio.create_task(receive_all(rx, request_id, timeout=30))
    try:
        await send_layers(tx, request_id, arrays, peer, timeout=30)
        got, receiver = await asyncio.wait_for(receiving, 30)
    finally:
        receiving.cancel()
        await asyncio.gather(receiving, return_exceptions=True)
    assert receiver.complete
    assert all(same_bytes(got[i], arrays[i]) for i in range(len(arrays)))


async def test_a_corrupted_chunk_is_sent_again_not_delivered(tmp_path: Path) -> None:
    """A bit flipped on the way: the chunk fails its checksum, the receiver closes that
    connection (first corruption of that chunk), the sender resumes and sends it again:
    the transfer completes bit-exact and nothing corrupt reached the engine."""
    a, b = pair(tmp_path)
    try:
        arrays = random_layers(LAYERS, LAYER_BYTES, seed=21)
        host, port = b.peer.rsplit(":", 1)
        proxy = faultproxy.FaultProxy((host, int(port)), faultproxy.Schedule(seed=3))
        async with proxy, Client(b.socket_path) as rx, Client(a.socket_path) as tx:
            first = random_layers(1, 64 << 10, seed=22)
            await ship(tx, rx, "warm", first, proxy.address)  # the link is up: chunks next
            proxy.inject(faultproxy.Fault("flip", at=30000, bit=5), faultproxy.UP)
            await asyncio.wait_for(ship(tx, rx, "flipped", arrays, proxy.address), 60)
        detected = b.metric("kvship_chunks_corrupt") + b.metric("kvship_protocol_errors")
        assert detected >= 1
        assert b.metric("kvship_transfers_resumed") >= 1
    finally:
        a.stop()
        b.stop()


async def test_dedup_tails_survive_every_connection_reset(tmp_path: Path) -> None:
    """A deduplicated transfer whose straddling chunks travel as tails (CAP_DEDUP_TAIL),
    its connections reset while it runs: the chunks the receiver had not ACKed go again as
    they first went (a tail is never cut twice, a coded chunk never coded twice) and the
    request arrives bit-exact, its held prefix from the store."""
    import numpy as np
    import xxhash

    from kvship.layout import layout_of
    from kvship.layout.model import FullAttention, ModelLayout
    from kvship.layout.prefix import block_keys

    model = ModelLayout("tails-resume", "tails-resume-test", (FullAttention(16, 2, 64),) * 24)
    block = 8192

    def kv(tokens: np.ndarray) -> list[np.ndarray]:
        keys = block_keys(tokens, model)
        tail = [bytes(block)] * (-(-len(tokens) // 16) - len(keys))
        return [
            np.frombuffer(
                b"".join(
                    np.random.default_rng(xxhash.xxh64_intdigest(k + bytes([i]))).bytes(block)
                    for k in keys
                )
                + b"".join(tail),
                np.uint8,
            )
            for i in range(len(model.layers))
        ]

    async def ship(tx: Client, rx: Client, rid: str, tokens: np.ndarray, peer: str) -> None:
        layers = kv(tokens)
        receiving = asyncio.create_task(receive_all(rx, rid, timeout=30))
        sender = await tx.send(
            rid, layout_of(layers), peer=peer, token_ids=tokens.tolist(), model=model
        )
        for i, layer in enumerate(layers):
            await sender.put(i, layer)
        await sender.finish(timeout=60)
        got, receiver = await asyncio.wait_for(receiving, 60)
        assert receiver.complete and all(same_bytes(got[i], x) for i, x in enumerate(layers))

    slow = ["--peer-rate", "40mbit", "--peer-burst", "1MiB", "--resume-timeout-s", "20"]
    a = DaemonProcess("prefill", tmp_path, slow).start()
    b = DaemonProcess("decode", tmp_path, slow).start()
    try:
        host, port = b.peer.rsplit(":", 1)
        rng = np.random.default_rng(4)
        first = rng.integers(0, 50000, 2048, dtype=np.uint32)
        second = first.copy()  # 120 of 128 blocks shared: each layer's tail from block 120
        second[120 * 16 + 7 :] = rng.integers(0, 50000, 2048 - 120 * 16 - 7)
        proxy = faultproxy.FaultProxy((host, int(port)), faultproxy.Schedule(seed=3))
        tx_client = Client(a.socket_path, chunk_bytes=16 * block)
        async with proxy, Client(b.socket_path) as rx, tx_client as tx:
            await ship(tx, rx, "tails-first", first, proxy.address)
            resent_before = a.metric("kvship_chunks_resent")
            resumed_before = b.metric("kvship_transfers_resumed")
            sent_before = a.metric("kvship_chunks_sent")
            shipping = asyncio.create_task(ship(tx, rx, "tails-second", second, proxy.address))
            resets = 0
            for _ in range(100):  # bounded: 5 s
                await asyncio.sleep(0.05)
                # Chunks flow only after HAVE: reset once the exchange is done.
                if resets < 3 and a.metric("kvship_chunks_sent") > sent_before + 2:
                    resets += proxy.reset_all() > 0
                    await asyncio.sleep(0.3)
                if resets == 3 or shipping.done():
                    break
            await asyncio.wait_for(shipping, 60)
        assert resets >= 1, "the transfer finished before a reset"
        assert b.metric("kvship_transfers_resumed") > resumed_before
        assert a.metric("kvship_chunks_resent") > resent_before
        record = b.get_json("/v1/transfers/tails-second")
        assert record["skipped_bytes"] == 24 * 120 * block  # the held blocks exactly
    finally:
        a.stop()
        b.stop()
