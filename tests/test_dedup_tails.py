"""Dedup tails (SPEC §7.6.5, CAP_DEDUP_TAIL): which chunk travels in part, and what the
sans-IO core lets through. The daemons' exchange is in test_dedup_e2e; here the rule as
arithmetic and the connection's checks byte by byte."""

from __future__ import annotations

import pytest

from kvship.layout.dedup import skipped_bytes, skipped_chunks, tail_cuts
from kvship.layout.model import FullAttention, LinearState, ModelLayout
from kvship.protocol import (
    CAP_DEDUP,
    CAP_DEDUP_TAIL,
    CAP_STRIPING,
    ROLE_PEER,
    Chunk,
    ChunkMeta,
    Connection,
    ErrorCode,
    Hello,
    LayerSpec,
    Open,
    ProtocolError,
    Role,
    chunk_checksum,
)
from kvship.protocol.geometry import check_place, chunk_table

MODEL = ModelLayout(
    "tails",
    "tails-test",
    (FullAttention(16, 2, 64), LinearState(((2, 64, 64),), "float32"), FullAttention(16, 2, 64)),
)
BB = 8192  # block bytes of both full layers
N_BLOCKS = 40
LAYERS = (
    LayerSpec("uint8", (N_BLOCKS * BB,), N_BLOCKS * BB),
    LayerSpec("uint8", (32768,), 32768),
    LayerSpec("uint8", (N_BLOCKS * BB,), N_BLOCKS * BB),
)
CHUNK = 16 * BB  # 3 chunks per full layer: 16, 16 and 8 blocks


@pytest.mark.parametrize(
    "held, want",
    [
        (0, {}),  # nothing held: every chunk whole
        (6, {0: 6 * BB, 4: 6 * BB}),  # inside the first chunk
        (16, {}),  # on a chunk boundary: skipped whole, nothing in part
        (21, {1: 5 * BB, 5: 5 * BB}),
        (39, {2: 7 * BB, 6: 7 * BB}),  # inside the short last chunk
        # Every block held (a block-aligned prompt again): the short last chunk is held
        # whole, yet the skip rule counts whole chunk_size steps (SPEC §7.6.5) and a tail
        # cannot be empty, so it travels whole.
        (40, {}),
    ],
)
def test_the_chunk_straddling_the_held_prefix_is_cut_at_the_prefix(
    held: int, want: dict[int, int]
) -> None:
    assert chunk_table(LAYERS, CHUNK) == [0, 3, 4, 7]
    assert tail_cuts(MODEL, LAYERS, CHUNK, held) == want
    skip = skipped_chunks(MODEL, LAYERS, CHUNK, held, False)
    for index, cut in want.items():  # the tail chunk is the one after the skipped ones
        layer = 0 if index < 3 else 2
        assert index == (0 if layer == 0 else 4) + len(skip.get(layer, []))
        assert 0 < cut < CHUNK
    # Off the wire: exactly the held blocks of both full layers (but that last chunk).
    off = 2 * held * BB if held < N_BLOCKS else 2 * 2 * CHUNK
    assert skipped_bytes(LAYERS, skip, CHUNK, want) == off


def test_a_tail_passes_the_place_check_only_with_the_capability() -> None:
    starts = chunk_table(LAYERS, CHUNK)
    check_place(LAYERS, starts, CHUNK, 1, 0, CHUNK + 5 * BB, 11 * BB, tails=True)
    with pytest.raises(ProtocolError) as info:
        check_place(LAYERS, starts, CHUNK, 1, 0, CHUNK + 5 * BB, 11 * BB)
    assert info.value.code is ErrorCode.LAYOUT_MISMATCH
    bad = [
        (CHUNK + 5 * BB, 10 * BB),  # does not reach the chunk's end
        (CHUNK + 5 * BB, 12 * BB),  # runs into the next chunk
        (CHUNK - BB, 17 * BB),  # starts in the chunk before
        (2 * CHUNK, 1),  # starts at the chunk's end: an empty chunk is never a tail
    ]
    for offset, length in bad:
        with pytest.raises(ProtocolError, match="layout puts it at") as info:
            check_place(LAYERS, starts, CHUNK, 1, 0, offset, length, tails=True)
        assert info.value.code is ErrorCode.LAYOUT_MISMATCH


def peer_pair(acceptor_caps: int) -> tuple[Connection, Connection]:
    a = Connection(role=Role.PEER, initiator=True)
    b = Connection(role=Role.PEER, initiator=False)
    caps = CAP_STRIPING | CAP_DEDUP | CAP_DEDUP_TAIL
    b.receive_data(a.initiate(Hello(ROLE_PEER, "a", capabilities=caps)))
    a.receive_data(b.accept("b", acceptor_caps))
    return a, b


def tail_chunk() -> tuple[Open, Chunk]:
    opened = Open(7, "r", LAYERS, CHUNK)
    data = bytes(range(256)) * (11 * BB // 256)
    meta = ChunkMeta(7, 1, 0, CHUNK + 5 * BB, len(data), chunk_checksum(data))
    return opened, Chunk(meta, memoryview(data))


def test_a_tail_chunk_goes_out_and_in_with_the_capability() -> None:
    a, b = peer_pair(CAP_STRIPING | CAP_DEDUP | CAP_DEDUP_TAIL)
    opened, chunk = tail_chunk()
    b.receive_data(a.send(opened))
    b.receive_data(b.grant(CHUNK))
    a.receive_data(b.grant(CHUNK))
    wire = a.chunk_header(chunk.meta, len(chunk.view)) + bytes(chunk.view)
    events = b.receive_data(wire)
    assert [type(e).__name__ for e in events] == ["ReceivedChunk"]
    assert events[0].meta == chunk.meta


def test_without_the_capability_a_tail_is_refused_both_ways() -> None:
    a, b = peer_pair(CAP_STRIPING | CAP_DEDUP)  # the acceptor does not offer tails
    opened, chunk = tail_chunk()
    b.receive_data(a.send(opened))
    a.receive_data(b.grant(CHUNK))
    with pytest.raises(ProtocolError) as info:  # this side will not send it
        a.chunk_header(chunk.meta, len(chunk.view))
    assert info.value.code is ErrorCode.LAYOUT_MISMATCH
    with pytest.raises(ProtocolError) as info:  # and the other side refuses it
        b.receive_data(chunk.encode())
    assert info.value.code is ErrorCode.LAYOUT_MISMATCH
