"""Ending a transfer early: late frames are dropped, not errors; limits on transfer size."""

from __future__ import annotations

import pytest

from kvship.protocol import (
    CAP_SHM,
    Abort,
    ChunkMeta,
    End,
    ErrorCode,
    LocalProtocolError,
    Open,
    ReceivedChunk,
)
from kvship.protocol.connection import MAX_CHUNKS
from test_protocol_connection import SMALL, chunk, expect_error, layout, pair


def test_late_chunks_and_end_of_a_forgotten_transfer_are_dropped_quietly() -> None:
    client, server = pair(SMALL)
    server.receive_data(client.send(layout(16, tid=7)))
    server.receive_data(chunk(7, 0, 0, 0, b"a" * 8))
    server.forget(7)  # the receiver gave up on it (and sent ABORT)
    events = server.receive_data(chunk(7, 1, 0, 8, b"b" * 8) + End(7, 2, 0).encode())
    assert [type(e) for e in events] == [ReceivedChunk, End]
    assert server.open_transfers == 0
    assert server.recv_window == SMALL.initial_window - 16  # still debited: the app credits it
    assert not server.closed


def test_abort_received_frees_the_slot_and_tolerates_in_flight_chunks() -> None:
    client, server = pair(SMALL)
    server.receive_data(client.send(layout(16, tid=3)))
    server.receive_data(Abort(3, int(ErrorCode.CANCELLED), "bye").encode())
    assert server.open_transfers == 0 and server.is_forgotten(3)
    assert [type(e) for e in server.receive_data(chunk(3, 1, 0, 8, b"x" * 8))] == [ReceivedChunk]


def test_reopening_a_forgotten_id_tracks_it_again() -> None:
    client, server = pair(SMALL)
    server.receive_data(client.send(layout(8, tid=5)))
    server.forget(5)
    with pytest.raises(LocalProtocolError):  # the sender still has it open
        client.send(layout(8, tid=5))
    client.forget(5)  # both ways: the sender stops tracking it too
    assert client.sending_transfers == 0
    server.receive_data(client.send(layout(8, tid=5)))
    assert server.open_transfers == 1 and not server.is_forgotten(5)


def test_abort_sent_forgets_the_transfer_on_that_connection() -> None:
    """An ABORT through send() ends the transfer here (SPEC §7.3 "ABORT sent"): the
    receiver's slot is free again and late chunks are dropped quietly."""
    client, server = pair(SMALL)
    server.receive_data(client.send(layout(16, tid=4)))
    client.receive_data(server.send(Abort(4, int(ErrorCode.TRANSFER_TOO_LARGE), "no")))
    assert server.open_transfers == 0 and server.is_forgotten(4)
    assert client.sending_transfers == 0
    # the sender's chunk already in flight: checked by neither side, read and dropped
    late = client.chunk_header(ChunkMeta(4, 0, 0, 0, 8, 0), 8) + bytes(8)
    assert [type(e) for e in server.receive_data(late)] == [ReceivedChunk]
    assert not server.closed and not client.closed


def test_chunk_for_a_never_opened_transfer_is_still_an_error() -> None:
    _, server = pair(SMALL)
    expect_error(server, chunk(99, 0, 0, 0, b"z" * 8), ErrorCode.UNKNOWN_TRANSFER)


def test_open_with_too_many_chunks_is_refused() -> None:
    client, server = pair()
    huge = layout((MAX_CHUNKS + 1) * 8, chunk_size=8)
    with pytest.raises(LocalProtocolError) as info:  # the sender's core refuses it first
        client.send(huge)
    assert info.value.code is ErrorCode.TRANSFER_TOO_LARGE
    expect_error(server, huge.encode(), ErrorCode.TRANSFER_TOO_LARGE)


def test_striped_open_needs_the_striping_capability() -> None:
    client, server = pair(offer=CAP_SHM)
    striped = Open(1, "r", layout(8).layers, 8, n_stripes=2, stripe=1)
    with pytest.raises(LocalProtocolError) as info:
        client.send(striped)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    expect_error(server, striped.encode(), ErrorCode.PROTOCOL_ERROR)


def test_pong_is_not_a_ping() -> None:
    """Handlers dispatch on type: a PONG taken for a PING would be answered forever."""
    from kvship.protocol import Ping, Pong

    assert not isinstance(Pong(1), Ping) and not isinstance(Ping(1), Pong)
