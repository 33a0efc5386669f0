"""Coded chunks on the wire: accepted only when CAP_CODECS was negotiated, and smaller."""

from __future__ import annotations

from kvship.protocol import (
    CAP_CODECS,
    CAP_STRIPING,
    CODEC_SPLIT16,
    CODEC_ZSTD,
    Chunk,
    ChunkMeta,
    ErrorCode,
    ReceivedChunk,
)
from test_protocol_connection import chunk, expect_error, layout, pair


def coded(tid: int, wire: bytes, raw_length: int, codec: int) -> bytes:
    meta = ChunkMeta(tid, 0, 0, 0, raw_length, 0, codec)
    return Chunk.header(meta, len(wire)) + wire


def test_coded_chunk_passes_when_negotiated() -> None:
    client, server = pair(offer=CAP_STRIPING | CAP_CODECS)
    server.receive_data(client.send(layout(8, tid=1)))
    events = server.receive_data(coded(1, b"xyz", 8, CODEC_ZSTD))
    assert [type(e) for e in events] == [ReceivedChunk]
    assert events[0].meta.codec == CODEC_ZSTD and bytes(events[0].data) == b"xyz"


def test_coded_chunk_without_the_capability_is_unsupported() -> None:
    client, server = pair(offer=CAP_STRIPING)
    server.receive_data(client.send(layout(8, tid=1)))
    expect_error(server, coded(1, b"xyz", 8, CODEC_SPLIT16), ErrorCode.UNSUPPORTED_CODEC)


def test_unknown_codec_is_unsupported() -> None:
    client, server = pair(offer=CAP_CODECS)
    server.receive_data(client.send(layout(8, tid=1)))
    expect_error(server, coded(1, b"xyz", 8, 9), ErrorCode.UNSUPPORTED_CODEC)


def test_coded_chunk_not_smaller_than_raw_is_malformed() -> None:
    client, server = pair(offer=CAP_CODECS)
    server.receive_data(client.send(layout(8, tid=1)))
    expect_error(server, coded(1, b"x" * 8, 8, CODEC_ZSTD), ErrorCode.MALFORMED_FRAME)


def test_raw_chunks_still_need_exact_length() -> None:
    client, server = pair(offer=CAP_CODECS)
    server.receive_data(client.send(layout(8, tid=1)))
    assert len(server.receive_data(chunk(1, 0, 0, 0, b"r" * 8))) == 1
