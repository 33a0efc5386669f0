"""Compression between real daemons: coded chunks arrive bit-exact, smaller on the wire;
a coded chunk that lies is refused like any corrupt chunk."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from conftest import (
    RawPeer,
    error_count,
    new_tid,
    off_loop,
    open_frame,
    receive_all,
    running_pair,
    same_bytes,
    send_layers,
    wait_for_condition,
)
from kvship import Client
from kvship.bench.spawn import DaemonProcess
from kvship.payload import CODEC_SPLIT16, Encoder
from kvship.protocol import (
    CAP_CODECS,
    CAP_STRIPING,
    Abort,
    Chunk,
    ChunkMeta,
    ErrorCode,
    FrameType,
    Ping,
    chunk_checksum,
)
from testdata import DOCS, kv_sample


@pytest.fixture(scope="module")
def split_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, ...]]:
    with running_pair(tmp_path_factory.mktemp("split"), ["--compression", "split"]) as pair:
        yield pair


@pytest.mark.parametrize("doc", DOCS)
async def test_split16_ships_real_bf16_bit_exact_and_smaller(
    split_pair: tuple[DaemonProcess, ...], doc: str
) -> None:
    a, b = split_pair
    kv = kv_sample(doc, "bf16")  # [30 layers, 2, T, 3, 64] bf16 bits as uint16 (tests/data/kv)
    layers = [np.ascontiguousarray(kv[i].reshape(2, -1)) for i in range(kv.shape[0])]
    # Several layers per chunk-sized array, so chunks are large enough to compress well.
    arrays = [np.concatenate(layers[i : i + 10], axis=1) for i in range(0, 30, 10)]
    before_payload = a.metric("kvship_payload_sent_bytes")
    before_wire = a.metric("kvship_wire_sent_bytes")
    rid = f"bf16-split-{doc}"
    async with Client(b.socket_path) as engine_b, Client(a.socket_path) as engine_a:
        receiving = asyncio.create_task(receive_all(engine_b, rid))
        try:
            result = await send_layers(engine_a, rid, arrays, b.peer)
            got, receiver = await asyncio.wait_for(receiving, 60)
        finally:
            receiving.cancel()
    assert receiver.complete and receiver.digest == result.digest
    for i, array in enumerate(arrays):
        assert same_bytes(got[i], array), f"layer {i} differs"
    payload = a.metric("kvship_payload_sent_bytes") - before_payload
    wire = a.metric("kvship_wire_sent_bytes") - before_wire
    assert payload == sum(x.nbytes for x in arrays)
    assert payload / wire >= 1.40, (payload, wire)  # split16 gives ~1.45x on this data


async def test_coded_chunk_that_lies_is_refused(split_pair: tuple[DaemonProcess, ...]) -> None:
    """A split16 chunk whose decoded bytes do not match its checksum: the daemon fails that
    transfer alone (ABORT CHECKSUM_MISMATCH), counts it, and the connection still serves."""
    b = split_pair[1]
    before = b.metric("kvship_chunks_corrupt")
    errors_before = error_count(b, "CHECKSUM_MISMATCH")
    raw = (np.arange(65536, dtype=np.uint16) % 7).tobytes()
    used, wire = Encoder().encode(memoryview(raw), CODEC_SPLIT16)
    assert used == CODEC_SPLIT16
    tid = new_tid()
    peer = await RawPeer.connect(b.peer)
    ack = await peer.handshake(capabilities=CAP_STRIPING | CAP_CODECS)
    assert ack.capabilities & CAP_CODECS
    await peer.send(open_frame(tid, f"liar-{tid:x}", [len(raw)], len(raw)))
    meta = ChunkMeta(tid, 0, 0, 0, len(raw), chunk_checksum(raw) ^ 1, CODEC_SPLIT16)
    await peer.send(Chunk.header(meta, len(wire)) + bytes(wire) + Ping(3).encode())
    seen = {}
    for _ in range(20):  # bounded: the ABORT, and the PONG answering the PING (the chunk
        frame = await peer.read_frame()  # decodes in a worker: either may come first)
        assert frame is not None, "the daemon closed the connection"
        seen[frame[0]] = frame[1]
        if {FrameType.ABORT, FrameType.PONG} <= seen.keys():
            break
    peer.close()
    assert Abort.decode(memoryview(seen[FrameType.ABORT])).code == ErrorCode.CHECKSUM_MISMATCH
    await wait_for_condition(
        off_loop(lambda: b.metric("kvship_chunks_corrupt") == before + 1),
        what="kvship_chunks_corrupt_total to go up by one",
    )
    assert error_count(b, "CHECKSUM_MISMATCH") == errors_before
