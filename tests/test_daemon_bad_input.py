"""Hostile peers against a real kvshipd over real sockets.

Each case: the hostile connection gets a GOAWAY with the specific error code (or is just
closed, for a truncated stream), the daemon counts it in /metrics and logs it, and a good
transfer between the two daemons, running at the same time, still arrives bit-exact.
"""

from __future__ import annotations

import asyncio
import secrets
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (
    LogMark,
    RawPeer,
    chunk_frame,
    error_count,
    exchange,
    goaway_of,
    good_transfer,
    new_tid,
    off_loop,
    open_frame,
    parse_frames,
    peer_hello,
    running_pair,
    wait_for_condition,
    wait_until,
)
from kvship import Client
from kvship.bench.spawn import DaemonProcess
from kvship.errors import IntegrityError, TransferError
from kvship.protocol import (
    MAGIC,
    ROLE_ENGINE,
    Abort,
    ErrorCode,
    FrameType,
    Hello,
    HelloAck,
    Ping,
    Pong,
    chunk_checksum,
    frame_header,
)

# A credit window of one default chunk (1 MiB) while max_chunk stays 4 MiB: a hostile peer
# can overrun the window with one CHUNK, and good transfers exercise CREDIT round trips.
WINDOW = 1024 * 1024


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, ...]]:
    with running_pair(tmp_path_factory.mktemp("bad"), ["--window-bytes", str(WINDOW)]) as p:
        yield p


async def with_good_transfer(pair: tuple[DaemonProcess, ...], hostile: Awaitable[None]) -> None:
    """Run ``hostile`` while a slow good transfer prefill -> decode is in progress, then
    check the good one arrived bit-exact, and that one more (after) does too."""
    a, b = pair
    good = asyncio.create_task(good_transfer(a, b, n_layers=6, pause=0.05, seed=1))
    try:
        await hostile
    finally:
        await asyncio.wait_for(good, 60)
    await good_transfer(a, b, seed=2)
    assert b.proc is not None and b.proc.poll() is None, "the decode daemon died"


async def check_counted(daemon: DaemonProcess, code: ErrorCode, before: float) -> None:
    await wait_for_condition(
        off_loop(lambda: error_count(daemon, code.name) == before + 1),
        what=f"kvship_protocol_errors_total{{code={code.name}}} to go up by one",
    )


@dataclass(frozen=True)
class Refused:
    """A hostile peer's bytes and the GOAWAY code they must earn."""

    code: ErrorCode
    handshake: bool  # a valid preface + HELLO (and its HELLO_ACK) first
    # What follows, given the HELLO_ACK if any: the writes in order, each drained before the
    # next (as one write, a refusal may come with our bytes unread and reset the GOAWAY away).
    writes: Callable[[HelloAck | None], list[bytes]]


def _layout_mismatch(_ack: HelloAck | None) -> list[bytes]:
    # Chunk 0 lies in layer 0; this one claims layer 1. Only header + meta are sent: the
    # daemon refuses on the meta, before the data.
    tid = new_tid()
    return [
        open_frame(tid, f"layout-{tid:x}", [8192, 8192], 4096),
        chunk_frame(tid, 0, 1, 0, bytes(4096))[: 8 + 40],
    ]


def _oversized(ack: HelloAck | None) -> list[bytes]:
    assert ack is not None
    return [frame_header(FrameType.PING, ack.max_frame + 1)]


REFUSED = [
    # Bytes that are not the kvship preface: exactly the 8 bytes the daemon compares.
    pytest.param(Refused(ErrorCode.BAD_MAGIC, False, lambda _: [b"GET / HT"]), id="bad-magic"),
    # HELLO offering versions 2..3 only: no HELLO_ACK.
    pytest.param(
        Refused(
            ErrorCode.UNSUPPORTED_VERSION,
            False,
            lambda _: [peer_hello(min_version=2, max_version=3)],
        ),
        id="unsupported-version",
    ),
    # A 4 GiB length before the handshake completed (64 KiB limit there).
    pytest.param(
        Refused(
            ErrorCode.FRAME_TOO_LARGE,
            False,
            lambda _: [MAGIC + frame_header(FrameType.HELLO, 0xFFFFFFFF)],
        ),
        id="huge-length-in-handshake",
    ),
    # After a good handshake, a header announcing max_frame + 1 body bytes: refused on the
    # header, before any body is read.
    pytest.param(Refused(ErrorCode.FRAME_TOO_LARGE, True, _oversized), id="frame-too-large"),
    # A CHUNK whose layer contradicts its index in the OPEN's layout.
    pytest.param(Refused(ErrorCode.LAYOUT_MISMATCH, True, _layout_mismatch), id="layout-mismatch"),
]


async def refused(daemon: DaemonProcess, case: Refused, before: float, mark: LogMark) -> None:
    """Play ``case`` against ``daemon``: the connection ends in a GOAWAY with its code (no
    HELLO_ACK without a handshake), counted once in /metrics, logged with our address."""
    peer = await RawPeer.connect(daemon.peer)
    try:
        ack = await peer.handshake() if case.handshake else None
        for data in case.writes(ack):
            await peer.send(data)
        goaway = await peer.goaway()
    finally:
        peer.close()
    assert goaway.code == case.code, goaway
    if not case.handshake:
        assert FrameType.HELLO_ACK not in [t for t, _ in peer.frames]
    await check_counted(daemon, case.code, before)
    await mark.wait_for_async(case.code.name, peer.local)


@pytest.mark.parametrize("case", REFUSED)
async def test_hostile_bytes_get_goaway(pair: tuple[DaemonProcess, ...], case: Refused) -> None:
    """Each hostile byte stream gets its GOAWAY code, counted and logged, while a good
    transfer runs (and after it, one more) bit-exact."""
    b = pair[1]
    before, mark = error_count(b, case.code.name), LogMark.of(b)
    await with_good_transfer(pair, refused(b, case, before, mark))


async def test_truncated_frame_then_eof(pair: tuple[DaemonProcess, ...]) -> None:
    """A transfer whose stream ends inside a CHUNK: MALFORMED_FRAME, the connection closes,
    and the engine subscribed to that request gets an error, never a complete transfer."""
    b = pair[1]
    before, mark = error_count(b, "MALFORMED_FRAME"), LogMark.of(b)
    tid, rid = new_tid(), f"trunc-{secrets.token_hex(4)}"
    layer0, layer1 = secrets.token_bytes(8192), secrets.token_bytes(8192)

    async def hostile() -> None:
        peer = await RawPeer.connect(b.peer)
        async with Client(b.socket_path) as engine:
            try:
                await peer.handshake()
                await peer.send(open_frame(tid, rid, [8192, 8192], 8192))
                receiver = await engine.receive(rid, timeout=10)
                await peer.send(chunk_frame(tid, 0, 0, 0, layer0))
                whole = chunk_frame(tid, 1, 1, 0, layer1)
                await peer.send(whole[: len(whole) - 100])  # 100 bytes short
                await peer.half_close()
                frames = await peer.until_closed()
            finally:
                peer.close()
            goaway = goaway_of(frames)  # optional after our EOF; if it comes, it says why
            assert goaway is None or goaway.code == ErrorCode.MALFORMED_FRAME, goaway
            await check_counted(b, ErrorCode.MALFORMED_FRAME, before)
            await mark.wait_for_async("MALFORMED_FRAME", peer.local)
            delivered: list[int] = []
            with pytest.raises(TransferError):
                async for layer, array in receiver.layers(copy=True):
                    delivered.append(layer)
                    assert array.tobytes() == layer0  # only a verified, whole layer may come
            assert 1 not in delivered and not receiver.complete

    await with_good_transfer(pair, hostile())


async def test_corrupt_chunk_is_checksum_mismatch(pair: tuple[DaemonProcess, ...]) -> None:
    """A CHUNK whose bytes do not match its checksum: ABORT CHECKSUM_MISMATCH of that
    transfer only (the connection stays and still serves, SPEC §7.4), counted; the engine
    subscribed to that request gets IntegrityError, never a complete transfer."""
    b = pair[1]
    before, mark = b.metric("kvship_chunks_corrupt"), LogMark.of(b)
    errors_before = error_count(b, "CHECKSUM_MISMATCH")
    tid, rid = new_tid(), f"corrupt-{secrets.token_hex(4)}"
    layer0, layer1 = secrets.token_bytes(8192), secrets.token_bytes(8192)

    async def hostile() -> None:
        peer = await RawPeer.connect(b.peer)
        async with Client(b.socket_path) as engine:
            try:
                await peer.handshake()
                await peer.send(open_frame(tid, rid, [8192, 8192], 4096))
                receiver = await engine.receive(rid, timeout=10)
                await peer.send(chunk_frame(tid, 0, 0, 0, layer0[:4096]))
                await peer.send(chunk_frame(tid, 1, 0, 4096, layer0[4096:]))
                await peer.send(chunk_frame(tid, 2, 1, 0, layer1[:4096]))
                flipped = bytes([layer1[4096] ^ 0x01]) + layer1[4097:]
                await peer.send(
                    chunk_frame(tid, 3, 1, 4096, flipped, checksum=chunk_checksum(layer1[4096:]))
                )  # the checksum of the original bytes, one bit flipped on the wire
                abort = await _next_of(peer, FrameType.ABORT)
                assert Abort.decode(memoryview(abort)).code == ErrorCode.CHECKSUM_MISMATCH
                await peer.send(Ping(7).encode())  # the connection still serves
                assert Pong.decode(memoryview(await _next_of(peer, FrameType.PONG))).opaque == 7
            finally:
                peer.close()
            await wait_for_condition(
                off_loop(lambda: b.metric("kvship_chunks_corrupt") == before + 1),
                what="kvship_chunks_corrupt_total to go up by one",
            )
            assert error_count(b, "CHECKSUM_MISMATCH") == errors_before  # no connection closed
            await mark.wait_for_async("CHECKSUM_MISMATCH", rid)
            delivered: list[int] = []
            with pytest.raises(IntegrityError) as info:
                async for layer, array in receiver.layers(copy=True):
                    delivered.append(layer)
                    assert array.tobytes() == layer0
            assert info.value.code == ErrorCode.CHECKSUM_MISMATCH
            assert 1 not in delivered and not receiver.complete
        record = await asyncio.to_thread(b.get_json, f"/v1/transfers/{rid}")
        assert record["state"] == "failed" and "CHECKSUM_MISMATCH" in record["error"]

    await with_good_transfer(pair, hostile())


async def _next_of(peer: RawPeer, frame_type: int) -> bytes:
    """The body of the next frame of ``frame_type`` (CREDITs and others skipped; bounded)."""
    for _ in range(50):
        frame = await peer.read_frame()
        assert frame is not None, f"the connection closed before a {frame_type:#x} frame"
        if frame[0] == frame_type:
            return frame[1]
    raise AssertionError(f"no {frame_type:#x} frame in 50")


async def test_corrupt_engine_chunk_aborts_only_that_transfer(
    pair: tuple[DaemonProcess, ...],
) -> None:
    """An engine whose staged bytes do not match its checksum: the prefill daemon forwards
    them unchecked; the decode daemon, taking it for link corruption, closes that
    connection so the chunk comes again (SPEC §7.7); the prefill daemon, resuming, finds the
    bytes it holds do not match their checksum and fails that transfer alone
    (CHECKSUM_MISMATCH, relayed to the engine). The link comes back, nothing else fails."""
    a, b = pair
    await good_transfer(a, b)  # the a -> b link is up

    def links() -> list[tuple[str, int]]:
        return [(link["peer"], link["connections"]) for link in a.get_json("/v1/links")["links"]]

    links_before = links()
    peer_errors_before = error_count(b, "CHECKSUM_MISMATCH")
    corrupt_before = b.metric("kvship_chunks_corrupt")
    engine = await RawPeer.connect(a.addresses["engine"])
    await engine.send(MAGIC + Hello(ROLE_ENGINE, "bad-engine").encode())
    assert (await engine.read_frame() or (0,))[0] == FrameType.HELLO_ACK
    await engine.send(open_frame(1, f"bad-engine-{new_tid():x}", [4096], 4096, peer=b.peer))
    await engine.send(chunk_frame(1, 0, 0, 0, bytes(4096), checksum=12345))
    frame = None
    for _ in range(10):
        frame = await engine.read_frame()
        if frame is None or frame[0] == FrameType.ABORT:
            break
    engine.close()
    assert frame is not None and frame[0] == FrameType.ABORT
    assert Abort.decode(memoryview(frame[1])).code == ErrorCode.CHECKSUM_MISMATCH
    await good_transfer(a, b)
    assert links() == links_before
    assert error_count(b, "CHECKSUM_MISMATCH") == peer_errors_before + 1  # the closed one
    assert b.metric("kvship_chunks_corrupt") == corrupt_before + 1  # seen once, not resent


async def test_chunk_beyond_credit_is_flow_control(tmp_path: Path) -> None:
    """A peer that keeps sending while the daemon withholds credit -> FLOW_CONTROL.

    With ``staging_bytes`` = one window and nobody claiming the transfer, the daemon
    credits the first chunk back but holds the second's credit (its memory is full), so
    the third chunk's meta exceeds the window, deterministically.
    """
    args = ["--window-bytes", str(WINDOW), "--staging-bytes", str(WINDOW)]
    with running_pair(tmp_path, args) as tight:
        b = tight[1]
        before, mark = error_count(b, "FLOW_CONTROL"), LogMark.of(b)
        tid, size = new_tid(), WINDOW

        def overrun(ack: HelloAck | None) -> list[bytes]:
            assert ack is not None
            assert ack.initial_window == WINDOW and ack.max_chunk == size
            return [
                # Three one-chunk layers (a layer above staging_bytes is refused at OPEN).
                open_frame(tid, f"flow-{tid:x}", [size, size, size], size),
                chunk_frame(tid, 0, 0, 0, bytes(size)),  # credited back
                chunk_frame(tid, 1, 1, 0, bytes(size)),  # credit withheld
                chunk_frame(tid, 2, 2, 0, bytes(size))[: 8 + 40],  # beyond the window
            ]

        case = Refused(ErrorCode.FLOW_CONTROL, True, overrun)
        await with_good_transfer(tight, refused(b, case, before, mark))


def test_pre_handshake_close_logs_no_asyncio_error(tmp_path: Path) -> None:
    """Connections that end before the handshake are logged once, specifically (or not at
    all, for a bare TCP probe), never as an unhandled asyncio error."""
    daemon = DaemonProcess("lonely", tmp_path).start()
    try:
        for payload in (b"", b"GET / HT", peer_hello(min_version=2, max_version=3)):
            exchange(daemon.peer, payload)
        wait_until(lambda: error_count(daemon, "UNSUPPORTED_VERSION") == 1)
    finally:
        daemon.stop()
    assert daemon.log_path is not None
    log = daemon.log_path.read_text()
    assert "BAD_MAGIC" in log and "UNSUPPORTED_VERSION" in log
    assert "never retrieved" not in log, log


# ------------------------------------------------------------ fuzzing
_TYPES = st.sampled_from([*range(0x00, 0x0D), *range(0x20, 0x27), 0x7F, 0xFF])
_FRAME = st.builds(
    lambda t, f, body: frame_header(t, len(body), f) + body,
    _TYPES,
    st.sampled_from([0, 0x80]),
    st.binary(max_size=64),
)
_PAYLOAD = st.one_of(
    st.binary(max_size=256),
    st.lists(_FRAME, max_size=6).map(b"".join),
    st.tuples(st.lists(_FRAME, max_size=3).map(b"".join), st.binary(max_size=32)).map(
        lambda p: p[0] + p[1]
    ),
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payload=_PAYLOAD)
def test_random_bytes_after_hello(pair: tuple[DaemonProcess, ...], payload: bytes) -> None:
    """Random bytes after a valid preface + HELLO: the daemon answers (HELLO_ACK, then maybe
    a GOAWAY), closes on our EOF, and stays alive."""
    b = pair[1]
    reply = exchange(b.peer, peer_hello("fuzz") + payload)
    frames, _ = parse_frames(reply)
    if frames:  # a reset may cut the answer short; what came must start with HELLO_ACK
        assert frames[0][0] == FrameType.HELLO_ACK
    assert b.proc is not None and b.proc.poll() is None, b.log_tail()


def test_daemon_healthy_after_fuzzing(pair: tuple[DaemonProcess, ...]) -> None:
    """After the fuzzer (same module daemon): /healthz is 200 and a transfer still works."""
    a, b = pair
    with urllib.request.urlopen(b.url("/healthz"), timeout=10) as resp:
        assert resp.status == 200
    # A well-behaved raw peer still gets its PONG on a fresh connection.
    frames, _ = parse_frames(exchange(b.peer, peer_hello("ping") + Ping(42).encode()))
    assert [t for t, _ in frames][:2] == [FrameType.HELLO_ACK, FrameType.PONG]
    asyncio.run(asyncio.wait_for(good_transfer(a, b, seed=3), 60))
    assert "Traceback" not in b.log_tail(10**7), "the daemon logged a traceback"
