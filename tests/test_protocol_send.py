"""The sending side checks itself (like h11): every frame this side may not send now raises
LocalProtocolError, with the code the peer would have answered it with, before anything is
encoded or changed; the connection then goes on as if nothing happened."""

from __future__ import annotations

from typing import Any

import pytest

from kvship.protocol import (
    CAP_CODECS,
    CAP_SHM,
    CAP_STRIPING,
    CODEC_ZSTD,
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
    GoAway,
    Hello,
    HelloAck,
    LayerSpec,
    Limits,
    LocalProtocolError,
    Open,
    Ping,
    Pong,
    ProtocolError,
    State,
    Subscribe,
)
from kvship.protocol.frames import MAX_WINDOW
from test_protocol_connection import SMALL, layout, pair


def snapshot(conn: Connection) -> tuple[Any, ...]:
    """Everything a refused send must leave as it was."""
    return (
        conn.state,
        conn.role,
        conn.limits,
        conn.send_credit,
        conn.recv_window,
        conn.negotiated.capabilities,
        {t: (s.chunks_sent, bytes(s.sent)) for t, s in conn._sending.items()},
        {t: r.chunks_seen for t, r in conn._receiving.items()},
        conn._ended.ids(),
        conn._dropped.ids(),
        conn._forgotten.ids(),
        conn._subscribing,
        conn._arena,
        conn._goaway_sent,
    )


def refused(conn: Connection, send: Any, code: ErrorCode, match: str | None = None) -> None:
    """``send()`` raises LocalProtocolError(code) and leaves ``conn`` as it was."""
    before = snapshot(conn)
    with pytest.raises(LocalProtocolError, match=match) as info:
        send()
    assert info.value.code is code, info.value
    assert isinstance(info.value, RuntimeError)  # what callers caught before it had a type
    assert snapshot(conn) == before
    assert not conn.closed or before[0] is State.CLOSED


def meta(index: int, layer: int, offset: int, length: int, tid: int = 1, codec: int = 0) -> Any:
    return ChunkMeta(tid, index, layer, offset, length, 0, codec)


# ------------------------------------------------------------------- transfers
def test_chunk_before_open_after_end_and_a_second_end() -> None:
    client, server = pair()
    refused(client, lambda: client.chunk_header(meta(0, 0, 0, 8), 8),
            ErrorCode.UNKNOWN_TRANSFER, "before its OPEN")  # fmt: skip
    refused(client, lambda: client.send(End(1, 0, 0)), ErrorCode.UNKNOWN_TRANSFER)
    out = client.send(layout(8)) + client.chunk_header(meta(0, 0, 0, 8), 8) + bytes(8)
    out += client.send(End(1, 1, 0))
    refused(client, lambda: client.chunk_header(meta(0, 0, 0, 8), 8),
            ErrorCode.UNKNOWN_TRANSFER, "after its END")  # fmt: skip
    refused(client, lambda: client.send(End(1, 1, 0)), ErrorCode.UNKNOWN_TRANSFER, "second END")
    events = server.receive_data(out)  # what did go out is a clean transfer
    assert [type(e).__name__ for e in events] == ["Open", "ReceivedChunk", "End"]
    assert server.open_transfers == 0 and not server.closed


def test_end_counts_the_chunks_sent_here() -> None:
    client, _ = pair()
    client.send(layout(16))
    client.chunk_header(meta(1, 0, 8, 8), 8)
    refused(client, lambda: client.send(End(1, 2, 0)), ErrorCode.PROTOCOL_ERROR, "1 went here")
    client.send(End(1, 1, 0))


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
def test_chunk_geometry_is_checked_before_sending(
    index: int, layer: int, offset: int, length: int
) -> None:
    client, server = pair()
    server.receive_data(client.send(layout(16, 4)))
    bad = meta(index, layer, offset, length)
    refused(client, lambda: client.chunk_header(bad, length), ErrorCode.LAYOUT_MISMATCH)
    with pytest.raises(ProtocolError) as info:  # the same code the receiver gives
        server.receive_data(Chunk(bad, bytes(length)).encode())
    assert info.value.code is ErrorCode.LAYOUT_MISMATCH


def test_chunk_codec_and_wire_length() -> None:
    client, _ = pair()
    client.send(layout(16))
    refused(client, lambda: client.chunk_header(meta(0, 0, 0, 8), 7), ErrorCode.MALFORMED_FRAME)
    coded = meta(0, 0, 0, 8, codec=CODEC_ZSTD)
    refused(client, lambda: client.chunk_header(coded, 3), ErrorCode.UNSUPPORTED_CODEC)
    client, _ = pair(offer=CAP_CODECS)
    client.send(layout(16))
    refused(client, lambda: client.chunk_header(coded, 8), ErrorCode.MALFORMED_FRAME, "codec 1")
    refused(client, lambda: client.chunk_header(meta(0, 0, 0, 8, codec=9), 3),
            ErrorCode.UNSUPPORTED_CODEC)  # fmt: skip
    client.chunk_header(coded, 3)  # smaller: fine


def test_a_chunk_twice_on_one_connection() -> None:
    client, _ = pair()
    client.send(layout(16))
    client.chunk_header(meta(0, 0, 0, 8), 8)
    refused(client, lambda: client.chunk_header(meta(0, 0, 0, 8), 8), ErrorCode.PROTOCOL_ERROR)


def test_chunk_beyond_credit_waits_for_credit() -> None:
    client, server = pair(SMALL)  # window 64
    out = client.send(layout(128, chunk_size=32))
    out += client.chunk_header(meta(0, 0, 0, 32), 32) + bytes(32)
    out += client.chunk_header(meta(1, 0, 32, 32), 32) + bytes(32)
    third = meta(2, 0, 64, 32)
    refused(client, lambda: client.chunk_header(third, 32), ErrorCode.FLOW_CONTROL)
    refused(client, lambda: client.send(Chunk(third, bytes(32))), ErrorCode.FLOW_CONTROL)
    server.receive_data(out)
    client.receive_data(server.grant(32))
    server.receive_data(client.chunk_header(third, 32) + bytes(32))
    assert client.send_credit == server.recv_window == 0


def test_open_rules() -> None:
    client, _ = pair(SMALL, offer=CAP_SHM)  # max_transfers 2, max_chunk 1024
    client.send(layout(8, tid=1))
    refused(client, lambda: client.send(layout(8, tid=1)), ErrorCode.PROTOCOL_ERROR, "already")
    client.send(layout(8, tid=2))
    refused(client, lambda: client.send(layout(8, tid=3)), ErrorCode.TOO_MANY_TRANSFERS)
    client.send(End(1, 0, 0))  # END frees a slot ...
    client.send(layout(8, tid=3))
    client.send(Abort(3, int(ErrorCode.CANCELLED)))  # ... and so does ABORT, sent
    client.send(layout(8, tid=4))
    client.receive_data(Abort(4, int(ErrorCode.CANCELLED)).encode())  # or received
    client.send(layout(8, tid=5))
    assert client.sending_transfers == 2
    refused(client, lambda: client.send(layout(4096, chunk_size=1025, tid=9)),
            ErrorCode.FRAME_TOO_LARGE)  # fmt: skip
    striped = layout(8, tid=9, n_stripes=2, stripe=0)
    refused(client, lambda: client.send(striped), ErrorCode.PROTOCOL_ERROR, "CAP_STRIPING")
    refused(client, lambda: client.send(layout(8, tid=9, peer="x:1")), ErrorCode.PROTOCOL_ERROR)
    # a tid reused after its END is a new transfer
    client.send(End(5, 0, 0))
    client.send(layout(8, tid=5))


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (Credit(0), ErrorCode.FLOW_CONTROL),
        (Subscribe("", 0), ErrorCode.MALFORMED_FRAME),  # decoded first, as on receipt
        (Open(1, "", (LayerSpec("u8", (1,), 1),), 8), ErrorCode.MALFORMED_FRAME),
        (Open(1, "r", (), 8), ErrorCode.MALFORMED_FRAME),
        (Open(1, "r", (LayerSpec("u8", (1,), 1),), 0), ErrorCode.MALFORMED_FRAME),
        (Open(1, "r", (LayerSpec("u8", (1,), 1),), 8, stripe=1), ErrorCode.MALFORMED_FRAME),
        (Open(1, "\ud800", (LayerSpec("u8", (1,), 1),), 8), ErrorCode.MALFORMED_FRAME),
        (Open(1, "r", (LayerSpec("u8", (1,), 1),), 8, extra={"x": float("nan")}),
         ErrorCode.MALFORMED_FRAME),
        (Open(1, "r", (LayerSpec("u8", (1,), 1),), 8, token_ids=(2**32,)),
         ErrorCode.MALFORMED_FRAME),
        (Open(2**64, "r", (LayerSpec("u8", (1,), 1),), 8), ErrorCode.MALFORMED_FRAME),
        (Open(1, "r", (LayerSpec("u8", (1,), 1),), 8, extra={"x": object()}),
         ErrorCode.MALFORMED_FRAME),
        (Abort(1, 2**16), ErrorCode.MALFORMED_FRAME),
        (Ping(-1), ErrorCode.MALFORMED_FRAME),
        (GoAway(0, "x" * 70000), ErrorCode.NO_ERROR),  # truncated to 1000 characters: fine
    ],
    ids=repr,
)  # fmt: skip
def test_what_the_peer_could_not_decode_is_not_sent(frame: Any, code: ErrorCode) -> None:
    client, _ = pair()
    if code is ErrorCode.NO_ERROR:
        client.send(frame)
        return
    refused(client, lambda: client.send(frame), code)


def test_frames_above_max_frame_are_not_sent() -> None:
    client, _ = pair(SMALL)  # max_frame 1088
    big = Open(1, "r", (LayerSpec("u8", (8,), 8),), 8, token_ids=tuple(range(300)))
    refused(client, lambda: client.send(big), ErrorCode.FRAME_TOO_LARGE)


# ------------------------------------------------------------ pipelining, handshake
def test_only_ping_is_pipelined_after_hello() -> None:
    client = Connection(initiator=True)
    refused(client, lambda: client.send(Ping(1)), ErrorCode.PROTOCOL_ERROR, "initiate")
    out = client.initiate(Hello(ROLE_PEER, capabilities=CAP_STRIPING))
    out += client.send(Ping(7))  # allowed before HELLO_ACK
    for attempt in (
        lambda: client.send(layout(8)),
        lambda: client.send(Credit(1)),
        lambda: client.send(Pong(1)),
        lambda: client.chunk_header(meta(0, 0, 0, 8), 8),
        lambda: client.grant(1),
    ):
        refused(client, attempt, ErrorCode.PROTOCOL_ERROR, "HELLO_ACK")
    server = Connection(initiator=False)
    events = server.receive_data(out)
    assert [type(e).__name__ for e in events] == ["Hello", "Ping"]
    assert server.state is State.AWAIT_ACCEPT
    refused(server, lambda: server.send(Pong(7)), ErrorCode.PROTOCOL_ERROR, "accept")
    ack = server.accept("acceptor")
    reply = ack + server.send(Pong(7))  # the PING is answered once accepted
    assert [type(e).__name__ for e in client.receive_data(reply)] == ["HelloAck", "Pong"]
    client.send(layout(8))  # and now anything goes


def test_the_acceptor_refuses_more_than_ping_before_accepting() -> None:
    server = Connection(initiator=False)
    hello = MAGIC + Hello(ROLE_PEER).encode()
    with pytest.raises(ProtocolError, match="PING") as info:
        server.receive_data(hello + Ping(1).encode() + layout(8).encode())
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    assert server.closed


@pytest.mark.parametrize("method", [1, 7, 255])
def test_unknown_auth_method_is_auth_failed(method: int) -> None:
    """SPEC §6.4: a HELLO whose auth_method this side does not know gets no HELLO_ACK but
    GOAWAY(AUTH_FAILED). The HELLO still reaches the application (it may log it); accept()
    refuses, and the connection is closed."""
    server = Connection(initiator=False)
    hello = Hello(ROLE_PEER, "guest", auth_method=method, auth=b"token")
    assert server.receive_data(MAGIC + hello.encode()) == [hello]
    with pytest.raises(ProtocolError) as info:
        server.accept("acceptor")
    assert info.value.code is ErrorCode.AUTH_FAILED
    assert not isinstance(info.value, LocalProtocolError)
    assert server.closed
    goaway = server.close(info.value)
    assert GoAway.decode(memoryview(goaway)[8:]).code == ErrorCode.AUTH_FAILED
    assert server.close() == b""  # one GOAWAY only


def test_auth_method_zero_is_accepted() -> None:
    server = Connection(initiator=False)
    server.receive_data(MAGIC + Hello(ROLE_ENGINE, auth_method=0).encode())
    ack = HelloAck.decode(memoryview(server.accept())[8:])
    assert ack.version == 1 and server.state is State.OPEN


# -------------------------------------------------------------------- closing
def test_goaway_is_the_last_frame() -> None:
    client, server = pair()
    data = client.send(GoAway(0, "drain"))
    assert client.closed
    refused(client, lambda: client.send(Ping(1)), ErrorCode.PROTOCOL_ERROR, "closed")
    assert client.close() == b""  # a GOAWAY went out already
    assert server.receive_data(data) == [GoAway(0, "drain")] and server.closed


def test_close_gives_the_goaway_once() -> None:
    _, server = pair()
    error = ProtocolError(ErrorCode.INTERNAL_ERROR, "handler failed")
    data = server.close(error)
    expected = GoAway(int(ErrorCode.INTERNAL_ERROR), "handler failed")
    assert GoAway.decode(memoryview(data)[8:]) == expected
    assert server.closed and server.close(error) == b""
    fresh = Connection(initiator=True)
    assert fresh.close() == b"" and fresh.closed  # nothing was sent: nothing to say


def test_grant_beyond_the_maximum_window_changes_nothing() -> None:
    _, server = pair()
    refused(server, lambda: server.grant(MAX_WINDOW), ErrorCode.FLOW_CONTROL)
    assert server.recv_window == Limits().initial_window
    with pytest.raises(ValueError):
        server.grant(0)
    refused(server, lambda: server.send(Credit(MAX_WINDOW)), ErrorCode.FLOW_CONTROL)


def test_send_credit_is_the_same_as_grant() -> None:
    client, server = pair()
    client.receive_data(server.send(Credit(100)))
    assert server.recv_window == client.send_credit == Limits().initial_window + 100
