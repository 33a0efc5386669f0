"""The sans-IO connection state machine: handshake, limits, transfers, credit, extensibility.

Every violation by the peer must raise ProtocolError with its specific code and leave
``closed`` True, so the IO layer can send ``close(error)``'s GOAWAY and drop just that
connection. (What this side may not send: test_protocol_send.py.)
"""

from __future__ import annotations

import pytest

from kvship.protocol import (
    CAP_SHM,
    CAP_STRIPING,
    FLAG_IGNORABLE,
    KNOWN_CAPS,
    MAGIC,
    ROLE_ENGINE,
    ROLE_PEER,
    Abort,
    Chunk,
    ChunkMeta,
    Connection,
    Credit,
    End,
    ErrorCode,
    FrameType,
    GoAway,
    Hello,
    HelloAck,
    LayerSpec,
    Limits,
    Open,
    Ping,
    ProtocolError,
    ReceivedChunk,
    Role,
    ShmAttach,
    ShmChunk,
    State,
    TransferDigest,
    chunk_checksum,
    digest_of_checksums,
    frame_header,
    pad_header,
)
from kvship.protocol.frames import HANDSHAKE_MAX_BODY, MAX_WINDOW

UNKNOWN_CAP = 1 << 40
SMALL = Limits(max_frame=1024 + 64, max_chunk=1024, max_transfers=2, initial_window=64)


def pair(
    limits: Limits | None = None,
    *,
    offer: int = CAP_SHM | CAP_STRIPING,
    support: int = KNOWN_CAPS,
    role: int = ROLE_PEER,
) -> tuple[Connection, Connection]:
    """An (initiator, acceptor) pair after a completed handshake."""
    client = Connection(initiator=True)
    server = Connection(initiator=False, limits=limits)
    events = server.receive_data(client.initiate(Hello(role, "client", capabilities=offer)))
    assert [type(e) for e in events] == [Hello]
    assert server.state is State.AWAIT_ACCEPT
    events = client.receive_data(server.accept("server", support))
    assert [type(e) for e in events] == [HelloAck]
    assert client.state is server.state is State.OPEN
    return client, server


def engine_pair(
    limits: Limits | None = None, *, offer: int = CAP_SHM, support: int = KNOWN_CAPS
) -> tuple[Connection, Connection]:
    """An (engine, daemon) pair after a completed handshake."""
    engine = Connection(role=Role.ENGINE)
    daemon = Connection(role=Role.DAEMON, limits=limits)
    daemon.receive_data(engine.initiate(Hello(ROLE_ENGINE, "engine", capabilities=offer)))
    engine.receive_data(daemon.accept("daemon", support))
    assert engine.state is daemon.state is State.OPEN
    return engine, daemon


def expect_error(conn: Connection, data: bytes, code: ErrorCode) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(data)
    assert info.value.code is code, info.value
    assert conn.closed
    return info.value


def layout(*sizes: int, chunk_size: int = 8, tid: int = 1, **kw: object) -> Open:
    layers = tuple(LayerSpec("uint8", (n,), n) for n in sizes)
    return Open(tid, f"req-{tid}", layers, chunk_size, **kw)  # type: ignore[arg-type]


def chunk(tid: int, index: int, layer: int, offset: int, data: bytes, codec: int = 0) -> bytes:
    meta = ChunkMeta(tid, index, layer, offset, len(data), chunk_checksum(data), codec)
    return Chunk(meta, data).encode()


# ------------------------------------------------------------------------ handshake
def test_handshake_negotiates_caps_limits_and_names() -> None:
    client, server = pair(SMALL, offer=CAP_SHM | CAP_STRIPING | UNKNOWN_CAP, support=CAP_STRIPING)
    for conn in (client, server):
        assert conn.negotiated.version == 1
        assert conn.negotiated.capabilities == CAP_STRIPING  # intersection, unknown bits gone
        assert conn.limits == SMALL  # both ends enforce the acceptor's limits
        assert conn.send_credit == conn.recv_window == SMALL.initial_window
    assert server.negotiated.peer_name == "client"
    assert server.negotiated.peer_role == ROLE_PEER
    assert client.negotiated.peer_name == "server"
    assert client.negotiated.peer_limits == SMALL


def test_handshake_byte_by_byte() -> None:
    client = Connection(initiator=True)
    server = Connection(initiator=False)
    hello = Hello(ROLE_ENGINE, "e", capabilities=CAP_SHM)
    events = [e for b in client.initiate(hello) for e in server.receive_data(bytes([b]))]
    assert events == [hello]
    ack = server.accept()
    events = [e for b in ack for e in client.receive_data(bytes([b]))]
    assert events == [HelloAck.decode(memoryview(ack)[8:])]
    assert client.negotiated.capabilities == CAP_SHM


@pytest.mark.parametrize(("lo", "hi"), [(0, 1), (1, 1), (1, 9), (0, 65535)])
def test_version_negotiation_picks_1(lo: int, hi: int) -> None:
    server = Connection(initiator=False)
    server.receive_data(MAGIC + Hello(ROLE_PEER, min_version=lo, max_version=hi).encode())
    ack = HelloAck.decode(memoryview(server.accept())[8:])
    assert ack.version == 1


@pytest.mark.parametrize(("lo", "hi"), [(2, 2), (2, 9), (0, 0)])
def test_no_common_version(lo: int, hi: int) -> None:
    server = Connection(initiator=False)
    hello = Hello(ROLE_PEER, min_version=lo, max_version=hi)
    error = expect_error(server, MAGIC + hello.encode(), ErrorCode.UNSUPPORTED_VERSION)
    assert GoAway.decode(memoryview(server.goaway_for(error))[8:]).code == 3


def test_initiator_refuses_a_version_it_did_not_offer() -> None:
    client = Connection(initiator=True)
    client.initiate(Hello(ROLE_PEER))
    ack = HelloAck(2, 0, 1024, 2048, 1024, 1)
    expect_error(client, ack.encode(), ErrorCode.UNSUPPORTED_VERSION)


def test_initiator_ignores_caps_it_did_not_offer() -> None:
    client = Connection(initiator=True)
    client.initiate(Hello(ROLE_PEER, capabilities=CAP_STRIPING))
    client.receive_data(
        HelloAck(1, CAP_SHM | CAP_STRIPING | UNKNOWN_CAP, 64, 2048, 1024, 1).encode()
    )
    assert client.negotiated.capabilities == CAP_STRIPING


def test_initiator_refused_with_goaway() -> None:
    client = Connection(initiator=True)
    client.initiate(Hello(ROLE_PEER))
    events = client.receive_data(GoAway(ErrorCode.AUTH_FAILED, "no").encode() + b"junk")
    assert events == [GoAway(ErrorCode.AUTH_FAILED, "no")]
    assert client.closed


def test_bad_magic() -> None:
    server = Connection(initiator=False)
    expect_error(server, b"\x89KVSHIP\r", ErrorCode.BAD_MAGIC)


def test_frames_out_of_order() -> None:
    server = Connection(initiator=False)
    expect_error(server, MAGIC + Ping(1).encode(), ErrorCode.PROTOCOL_ERROR)
    server = Connection(initiator=False)
    expect_error(server, MAGIC + chunk(1, 0, 0, 0, b"x"), ErrorCode.PROTOCOL_ERROR)
    client = Connection(initiator=True)
    client.initiate(Hello(ROLE_PEER))
    expect_error(client, Hello(ROLE_PEER).encode(), ErrorCode.PROTOCOL_ERROR)
    # the initiator sends nothing but PING before HELLO_ACK: anything else while accepting
    # is an error; a PING is taken (and answered once accepted)
    server = Connection(initiator=False)
    expect_error(
        server, MAGIC + Hello(ROLE_PEER).encode() + layout(8).encode(), ErrorCode.PROTOCOL_ERROR
    )
    server = Connection(initiator=False)
    events = server.receive_data(MAGIC + Hello(ROLE_PEER).encode() + Ping(1).encode())
    assert events == [Hello(ROLE_PEER), Ping(1)] and server.state is State.AWAIT_ACCEPT
    client, server = pair()
    expect_error(server, Hello(ROLE_PEER).encode(), ErrorCode.PROTOCOL_ERROR)
    expect_error(client, HelloAck(1, 0, 1, 2048, 1, 1).encode(), ErrorCode.PROTOCOL_ERROR)


def test_api_misuse_is_runtime_error() -> None:
    client = Connection(initiator=True)
    with pytest.raises(RuntimeError):
        client.send(Ping(1))
    with pytest.raises(RuntimeError):
        client.accept()
    client.initiate(Hello(ROLE_PEER))
    with pytest.raises(RuntimeError):
        client.initiate(Hello(ROLE_PEER))
    with pytest.raises(RuntimeError):
        Connection(initiator=False).initiate(Hello(ROLE_PEER))


# --------------------------------------------------------------------------- limits
def test_frame_too_large_before_handshake() -> None:
    server = Connection(initiator=False)
    server.receive_data(MAGIC + frame_header(FrameType.HELLO, HANDSHAKE_MAX_BODY))  # the limit
    server = Connection(initiator=False, limits=Limits(max_frame=2**30))  # not used yet
    expect_error(
        server,
        MAGIC + frame_header(FrameType.HELLO, HANDSHAKE_MAX_BODY + 1),
        ErrorCode.FRAME_TOO_LARGE,
    )
    client = Connection(initiator=True)
    client.initiate(Hello(ROLE_PEER))
    expect_error(
        client, frame_header(FrameType.HELLO_ACK, HANDSHAKE_MAX_BODY + 1), ErrorCode.FRAME_TOO_LARGE
    )


def test_frame_too_large_after_handshake() -> None:
    _, server = pair(SMALL)
    assert server.receive_data(frame_header(0x30, SMALL.max_frame, FLAG_IGNORABLE)) == []
    for side in (0, 1):  # the initiator enforces the acceptor's limit too
        conn = pair(SMALL)[side]
        expect_error(
            conn, frame_header(FrameType.PING, SMALL.max_frame + 1), ErrorCode.FRAME_TOO_LARGE
        )


def test_chunk_size_above_max_chunk() -> None:
    _, server = pair(SMALL)
    expect_error(server, layout(4096, chunk_size=1025).encode(), ErrorCode.FRAME_TOO_LARGE)


def test_reserved_header_bits() -> None:
    _, server = pair()
    expect_error(server, Ping(1).encode()[:6] + b"\x00\x01" + bytes(8), ErrorCode.MALFORMED_FRAME)


# ------------------------------------------------------------------------ transfers
def test_transfer_lifecycle() -> None:
    _, server = pair()
    op = layout(16, 5)
    data = [bytes(range(8)), bytes(range(8, 16)), b"abcde"]
    stream = op.encode()
    stream += chunk(1, 2, 1, 0, data[2]) + chunk(1, 0, 0, 0, data[0]) + chunk(1, 1, 0, 8, data[1])
    digest = digest_of_checksums([chunk_checksum(d) for d in data])
    stream += End(1, 3, digest).encode()
    events = server.receive_data(stream)
    assert events[0] == op
    assert [bytes(e.data) for e in events[1:4]] == [data[2], data[0], data[1]]
    assert events[4] == End(1, 3, digest)
    assert server.open_transfers == 0
    assert server.recv_window == Limits().initial_window - 21


def test_chunk_before_open() -> None:
    _, server = pair()
    expect_error(server, chunk(1, 0, 0, 0, b"x"), ErrorCode.UNKNOWN_TRANSFER)


def test_chunk_after_end() -> None:
    _, server = pair()
    server.receive_data(layout(8).encode() + chunk(1, 0, 0, 0, bytes(8)) + End(1, 1, 0).encode())
    expect_error(server, chunk(1, 0, 0, 0, bytes(8)), ErrorCode.UNKNOWN_TRANSFER)


@pytest.mark.parametrize(
    ("index", "layer", "offset", "length"),
    [
        (0, 1, 0, 8),  # chunk 0 is in layer 0
        (2, 0, 16, 4),  # layer 0 has chunks 0..1 only
        (1, 0, 4, 8),  # chunk 1 sits at offset 8
        (1, 0, 8, 7),  # and is 8 bytes long
        (2, 1, 0, 5),  # the last chunk of layer 1 is 4 bytes long
        (0, 2, 0, 8),  # there is no layer 2
        (3, 1, 0, 4),  # there is no chunk 3
    ],
)
def test_chunk_geometry(index: int, layer: int, offset: int, length: int) -> None:
    _, server = pair()
    server.receive_data(layout(16, 4).encode())
    expect_error(server, chunk(1, index, layer, offset, bytes(length)), ErrorCode.LAYOUT_MISMATCH)


def test_chunk_codec_and_length() -> None:
    _, server = pair()
    server.receive_data(layout(16).encode())
    expect_error(server, chunk(1, 0, 0, 0, bytes(8), codec=1), ErrorCode.UNSUPPORTED_CODEC)
    _, server = pair()
    server.receive_data(layout(16).encode())
    meta = ChunkMeta(1, 0, 0, 0, 8, 0)
    expect_error(server, Chunk(meta, bytes(7)).encode(), ErrorCode.MALFORMED_FRAME)
    _, server = pair()
    expect_error(server, frame_header(FrameType.CHUNK, 39) + bytes(39), ErrorCode.MALFORMED_FRAME)


def test_open_twice() -> None:
    _, server = pair()
    server.receive_data(layout(8).encode())
    expect_error(server, layout(8).encode(), ErrorCode.PROTOCOL_ERROR)


def test_too_many_transfers_and_slots_freed() -> None:
    _, server = pair(SMALL)
    server.receive_data(layout(8, tid=1).encode() + layout(8, tid=2).encode())
    assert server.open_transfers == 2
    server.receive_data(End(1, 0, 0).encode() + Abort(2, ErrorCode.CANCELLED).encode())
    assert server.open_transfers == 0
    server.receive_data(layout(8, tid=3).encode() + layout(8, tid=4).encode())
    expect_error(server, layout(8, tid=5).encode(), ErrorCode.TOO_MANY_TRANSFERS)


def test_end_count_mismatch() -> None:
    _, server = pair()
    server.receive_data(layout(16).encode() + chunk(1, 0, 0, 0, bytes(8)))
    expect_error(server, End(1, 2, 0).encode(), ErrorCode.PROTOCOL_ERROR)
    _, server = pair()
    expect_error(server, End(9, 0, 0).encode(), ErrorCode.UNKNOWN_TRANSFER)


def test_striped_transfer_counts_per_connection() -> None:
    stripes = [pair()[1] for _ in range(2)]
    data = [bytes([i]) * 8 for i in range(3)]
    digest = TransferDigest(3)
    placed: list[tuple[int, bytes]] = []
    for stripe, conn in enumerate(stripes):
        op = layout(24, n_stripes=2, stripe=stripe)
        mine = [i for i in range(3) if i % 2 == stripe]
        stream = op.encode() + b"".join(chunk(1, i, 0, 8 * i, data[i]) for i in mine)
        stream += End(1, len(mine), 0).encode()
        for event in conn.receive_data(stream):
            if isinstance(event, Chunk):
                digest.add(event.meta.chunk_index, chunk_checksum(event.data))
                placed.append((event.meta.chunk_index, bytes(event.data)))
    assert digest.complete
    assert digest.value() == digest_of_checksums([chunk_checksum(d) for d in data])
    assert sorted(placed) == list(enumerate(data))


def test_shm_chunk_counts_but_takes_no_credit() -> None:
    _, daemon = engine_pair(SMALL)
    attach = ShmAttach(1 << 20, "/dev/shm/x").encode()
    daemon.receive_data(attach + layout(8, 4, peer="b:1").encode())
    frames = [ShmChunk(ChunkMeta(1, 0, 0, 0, 8, 0), 0), ShmChunk(ChunkMeta(1, 1, 1, 0, 4, 0), 8)]
    events = daemon.receive_data(b"".join(f.encode() for f in frames) + End(1, 2, 0).encode())
    assert events[:2] == frames
    assert daemon.recv_window == SMALL.initial_window
    _, daemon = engine_pair(SMALL)
    daemon.receive_data(attach + layout(8, peer="b:1").encode())
    bad = ShmChunk(ChunkMeta(1, 0, 0, 4, 8, 0), 0)
    expect_error(daemon, bad.encode(), ErrorCode.LAYOUT_MISMATCH)


# --------------------------------------------------------------------- flow control
def test_flow_control_violation() -> None:
    _, server = pair(SMALL)  # window 64
    server.receive_data(layout(128, chunk_size=32).encode())
    server.receive_data(chunk(1, 0, 0, 0, bytes(32)) + chunk(1, 1, 0, 32, bytes(32)))
    assert server.recv_window == 0
    expect_error(server, chunk(1, 2, 0, 64, bytes(32)), ErrorCode.FLOW_CONTROL)


def test_credit_restores_the_window() -> None:
    client, server = pair(SMALL)
    out = client.send(layout(128, chunk_size=32))
    for i in range(2):
        meta = ChunkMeta(1, i, 0, 32 * i, 32, 0)
        out += client.chunk_header(meta, 32) + bytes(32)
    assert client.send_credit == 0
    with pytest.raises(RuntimeError):
        client.chunk_header(ChunkMeta(1, 2, 0, 64, 32, 0), 32)
    server.receive_data(out)
    assert server.recv_window == 0
    credit = server.grant(40)
    assert server.recv_window == 40
    assert client.receive_data(credit) == [Credit(40)]
    assert client.send_credit == 40
    more = client.chunk_header(ChunkMeta(1, 2, 0, 64, 32, 0), 32) + bytes(32)
    assert [type(e) for e in server.receive_data(more)] == [ReceivedChunk]
    assert server.recv_window == 8


def test_credit_above_max_window() -> None:
    client, server = pair()
    credit = Credit(MAX_WINDOW - Limits().initial_window + 1)
    expect_error(client, credit.encode(), ErrorCode.FLOW_CONTROL)
    with pytest.raises(RuntimeError):
        server.grant(MAX_WINDOW)
    with pytest.raises(ValueError):
        server.grant(0)


def test_sender_refuses_chunk_above_max_chunk() -> None:
    client, _ = pair(SMALL)
    with pytest.raises(RuntimeError):
        client.chunk_header(ChunkMeta(1, 0, 0, 0, 1025, 0), 10)


# -------------------------------------------------------------------- extensibility
def test_ignorable_unknown_frames_are_skipped() -> None:
    _, server = pair()
    unknown = frame_header(0x30, 3, FLAG_IGNORABLE) + b"abc"
    empty = frame_header(0xFE, 0, FLAG_IGNORABLE | 0x01)
    assert server.receive_data(unknown + empty + Ping(5).encode()) == [Ping(5)]


def test_pad_frames_are_read_and_dropped_byte_by_byte() -> None:
    """PAD (SPEC §5.23) between other frames, fed one byte at a time: no event, the next
    frame comes through; an empty PAD too."""
    _, server = pair()
    stream = pad_header(300) + bytes(300) + pad_header(0) + Ping(7).encode()
    events = [e for i in range(len(stream)) for e in server.receive_data(stream[i : i + 1])]
    assert events == [Ping(7)]


def test_pad_without_the_ignorable_flag_is_refused() -> None:
    _, server = pair()
    expect_error(server, frame_header(FrameType.PAD, 3) + b"abc", ErrorCode.UNKNOWN_FRAME)


def test_unknown_non_ignorable_frame() -> None:
    _, server = pair()
    expect_error(server, frame_header(0x30, 3) + b"abc", ErrorCode.UNKNOWN_FRAME)
    server = Connection(initiator=False)  # ignorable does not help before the handshake
    expect_error(server, MAGIC + frame_header(0x30, 0, FLAG_IGNORABLE), ErrorCode.UNKNOWN_FRAME)


def test_unknown_flag_bits_ignored_on_known_frames() -> None:
    _, server = pair()
    raw = bytearray(Ping(1).encode())
    raw[5] = 0x7F | FLAG_IGNORABLE
    assert server.receive_data(bytes(raw)) == [Ping(1)]


# -------------------------------------------------------------------------- closing
def test_goaway_closes_and_discards_the_rest() -> None:
    _, server = pair()
    events = server.receive_data(GoAway(0, "bye").encode() + Ping(1).encode() + b"\xff" * 9)
    assert events == [GoAway(0, "bye")]
    assert server.closed
    assert server.receive_data(b"more") == []


def test_goaway_for_error() -> None:
    _, server = pair()
    error = expect_error(server, chunk(1, 0, 0, 0, b"x"), ErrorCode.UNKNOWN_TRANSFER)
    goaway = GoAway.decode(memoryview(server.goaway_for(error))[8:])
    assert goaway.code == ErrorCode.UNKNOWN_TRANSFER
    assert "transfer" in goaway.message
    with pytest.raises(RuntimeError):
        server.read_buffer()


@pytest.mark.parametrize("cut", [1, 7, 8, 9, 8 + 40, 8 + 40 + 3])
def test_eof_inside_a_frame(cut: int) -> None:
    _, server = pair()
    server.receive_data(layout(8).encode())
    server.receive_data(chunk(1, 0, 0, 0, bytes(8))[:cut])
    with pytest.raises(ProtocolError) as info:
        server.receive_eof()
    assert info.value.code is ErrorCode.MALFORMED_FRAME
    assert server.closed


def test_eof_at_boundaries() -> None:
    _, server = pair()
    server.receive_data(Ping(1).encode())
    server.receive_eof()
    assert server.closed
    fresh = Connection(initiator=False)
    fresh.receive_eof()
    assert fresh.closed
    partial = Connection(initiator=False)
    partial.receive_data(MAGIC[:3])
    with pytest.raises(ProtocolError):
        partial.receive_eof()


# ------------------------------------------------------------------------- payloads
def test_payload_sink_receives_chunk_bytes_in_place() -> None:
    arena = bytearray(64)
    calls: list[tuple[ChunkMeta, int]] = []

    def sink(meta: ChunkMeta, wire_length: int) -> tuple[memoryview, object]:
        calls.append((meta, wire_length))
        start = 16 * meta.chunk_index
        return memoryview(arena)[start : start + wire_length], ("arena", start)

    client = Connection(initiator=True)
    server = Connection(initiator=False, payload_sink=sink)
    server.receive_data(client.initiate(Hello(ROLE_PEER)))
    client.receive_data(server.accept())
    data = [b"A" * 16, b"B" * 16, b"C" * 3]
    stream = layout(35, chunk_size=16).encode()
    stream += b"".join(chunk(1, i, 0, 16 * i, d) for i, d in enumerate(data))
    events = [e for b in stream for e in server.receive_data(bytes([b]))]  # worst-case splits
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert bytes(arena[:35]) == b"".join(data)
    assert [len(c.data) for c in chunks] == [16, 16, 3]
    assert all(isinstance(c.data, memoryview) and c.data.obj is arena for c in chunks)
    assert [(m.chunk_index, n) for m, n in calls] == [(0, 16), (1, 16), (2, 3)]
    # the sink's tag comes back on each chunk event: where its bytes landed
    assert [c.tag for c in chunks] == [("arena", 0), ("arena", 16), ("arena", 32)]
    assert all(c == Chunk(c.meta, bytes(c.data)) for c in chunks)  # the tag is not a field


def test_default_sink_tags_nothing() -> None:
    _, server = pair()
    events = server.receive_data(layout(8).encode() + chunk(1, 0, 0, 0, b"12345678"))
    assert isinstance(events[1], ReceivedChunk) and events[1].tag is None
    assert Chunk(events[1].meta, b"12345678").tag is None


def test_zero_copy_read_buffer_path() -> None:
    _, server = pair()
    stream = layout(8).encode() + chunk(1, 0, 0, 0, b"12345678") + Ping(9).encode()
    events = []
    pos = 0
    while pos < len(stream):
        buf = server.read_buffer()
        n = min(len(buf), len(stream) - pos, 5)
        buf[:n] = stream[pos : pos + n]
        pos += n
        events.extend(server.buffer_updated(n))
        while server.pending:
            events.extend(server.next_frames())
    assert [type(e).__name__ for e in events] == ["Open", "ReceivedChunk", "Ping"]
    assert bytes(events[1].data) == b"12345678"


def test_payload_sink_of_wrong_size_is_a_bug() -> None:
    server = Connection(
        initiator=False, payload_sink=lambda meta, n: (memoryview(bytearray(n + 1)), None)
    )
    server.receive_data(MAGIC + Hello(ROLE_PEER).encode())
    server.accept()
    server.receive_data(layout(8).encode())
    with pytest.raises(RuntimeError):
        server.receive_data(chunk(1, 0, 0, 0, bytes(8)))


# --------------------------------------------------------------------------- digest
def test_transfer_digest_any_order() -> None:
    sums = [chunk_checksum(bytes([i]) * 5) for i in range(5)]
    digest = TransferDigest(5)
    for i in (3, 0, 4, 1):
        digest.add(i, sums[i])
    assert not digest.complete
    with pytest.raises(RuntimeError):
        digest.value()
    digest.add(2, sums[2])
    assert digest.complete
    assert digest.value() == digest_of_checksums(sums)
    assert TransferDigest(0).value() == digest_of_checksums([])


def test_transfer_digest_duplicates_and_range() -> None:
    digest = TransferDigest(2)
    digest.add(0, 1)
    with pytest.raises(ProtocolError) as info:
        digest.add(0, 1)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    for index in (-1, 2, 2**32):
        with pytest.raises(ProtocolError) as info:
            digest.add(index, 1)
        assert info.value.code is ErrorCode.LAYOUT_MISMATCH


def test_checksum_is_xxh3_64_seed_0() -> None:
    assert chunk_checksum(b"") == 0x2D06800538D394C2
    assert chunk_checksum(memoryview(b"abc")) == chunk_checksum(bytearray(b"abc"))


# ------------------------------------------------------------- bulk reads
def _read(conn: Connection, data: bytes) -> list[list[object]]:
    """One read of ``data`` through read_buffer (a real socket read), then the frames
    handed over step by step: the list of each step's frames."""
    buf = conn.read_buffer()
    assert len(buf) >= len(data)
    buf[: len(data)] = data
    steps = [conn.buffer_updated(len(data))]
    while conn.pending:
        steps.append(conn.next_frames())
    return steps


def test_one_read_of_many_frames_hands_them_over_one_at_a_time() -> None:
    """A burst of small frames costs one read; each frame is handed over before the bytes
    after it are parsed, as if it had come alone."""
    _, server = pair()
    stream = b"".join(Ping(i).encode() for i in range(5)) + layout(8).encode()
    steps = _read(server, stream)
    assert [[type(f).__name__ for f in step] for step in steps] == [["Ping"]] * 5 + [["Open"]]
    assert [f.opaque for step in steps[:5] for f in step] == [0, 1, 2, 3, 4]  # type: ignore[attr-defined]


def test_read_buffer_refuses_while_bytes_are_pending() -> None:
    _, server = pair()
    buf = server.read_buffer()
    data = Ping(1).encode() + Ping(2).encode()
    buf[: len(data)] = data
    assert [type(f) for f in server.buffer_updated(len(data))] == [Ping]
    assert server.pending
    with pytest.raises(RuntimeError, match="pending"):
        server.read_buffer()
    with pytest.raises(RuntimeError, match="pending"):
        server.receive_data(b"")
    assert [type(f) for f in server.next_frames()] == [Ping] and not server.pending


def test_frames_before_garbage_in_the_same_read_come_first() -> None:
    """A valid frame and then bytes that break the protocol in one read: the frame is
    handed over, and only the next step raises (the error after it, as bytewise)."""
    _, server = pair()
    buf = server.read_buffer()
    data = Ping(7).encode() + frame_header(0x55, 0) + b"junk"
    buf[: len(data)] = data
    assert [type(f) for f in server.buffer_updated(len(data))] == [Ping]
    with pytest.raises(ProtocolError) as info:
        server.next_frames()
    assert info.value.code == ErrorCode.UNKNOWN_FRAME and server.closed and not server.pending


def test_a_chunk_read_in_bulk_continues_into_its_sink() -> None:
    """The header, meta and first data bytes of a chunk arrive in one bulk read (copied
    to the sink); the rest of its data is read straight into the sink."""
    _, server = pair()
    _read(server, layout(8).encode())
    sink = bytearray(8)
    server.payload_sink = lambda meta, n: (memoryview(sink), "tag")
    frame = chunk(1, 0, 0, 0, b"ABCDEFGH")
    assert _read(server, frame[:-3]) == [[]]  # 5 data bytes in the bulk read
    rest = server.read_buffer()
    assert len(rest) == 3  # the sink's remaining bytes, not the bulk buffer
    rest[:3] = frame[-3:]
    (received,) = server.buffer_updated(3)
    assert isinstance(received, ReceivedChunk) and bytes(received.data) == b"ABCDEFGH"
    assert received.tag == "tag" and bytes(sink) == b"ABCDEFGH"
