"""Property tests of the sans-IO connection's receiving side.

(a) How bytes are split must not matter: a valid stream fed whole, in random pieces, byte by
    byte, or through the zero-copy read_buffer path gives the same events (on each end, with
    what that end's peer may send it: transfers to the acceptor, their answers to the
    initiator).
(b) Hostile input (random bytes, valid streams with bytes flipped, inserted or deleted) only
    ever raises ProtocolError, after which the connection is closed; nothing else escapes.

The sending side's properties: test_protocol_send_hypothesis.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvship.protocol import (
    CAP_SHM,
    CAP_STRIPING,
    FLAG_IGNORABLE,
    MAGIC,
    ROLE_PEER,
    Abort,
    Chunk,
    ChunkMeta,
    Complete,
    Connection,
    Credit,
    End,
    ErrorCode,
    GoAway,
    Hello,
    LayerSpec,
    Limits,
    Open,
    Ping,
    Pong,
    ProtocolError,
    ReceivedChunk,
    State,
    chunk_checksum,
    chunk_table,
    digest_of_checksums,
    frame_header,
)

FRAME_NAMES = {
    "Hello", "HelloAck", "Open", "ReceivedChunk", "End", "Complete", "Credit", "Abort", "Ping",
    "Pong", "GoAway", "Have", "Subscribe", "ShmAttach", "ShmAttached", "ShmChunk",
    "LayerReady", "Release",
}  # fmt: skip
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HELLO = Hello(ROLE_PEER, "fuzz", capabilities=CAP_SHM | CAP_STRIPING)
# Small limits keep hostile length fields from allocating 16 MiB bodies on every example.
LIMITS = Limits(max_frame=4096 + 64, max_chunk=4096, max_transfers=4, initial_window=1 << 20)


def chunk_frames(op: Open) -> list[tuple[bytes, int]]:
    """Every CHUNK of a transfer and its checksum, in index order, with deterministic data."""
    starts = chunk_table(op.layers, op.chunk_size)
    frames = []
    for layer, spec in enumerate(op.layers):
        for index in range(starts[layer], starts[layer + 1]):
            offset = (index - starts[layer]) * op.chunk_size
            length = min(op.chunk_size, spec.nbytes - offset)
            data = bytes((index * 31 + j) & 0xFF for j in range(length))
            meta = ChunkMeta(op.transfer_id, index, layer, offset, length, chunk_checksum(data))
            frames.append((Chunk(meta, data).encode(), meta.checksum))
    return frames


@st.composite
def frame_streams(draw: st.DrawFn) -> bytes:
    """Post-handshake frames: OPEN, chunks in any order, END, interleaved with control frames."""
    queues: list[list[bytes]] = []
    for tid in range(1, draw(st.integers(1, 3)) + 1):
        sizes = draw(st.lists(st.integers(0, 48), min_size=1, max_size=3))
        op = Open(
            tid,
            f"req-{tid}",
            tuple(LayerSpec("uint8", (n,), n) for n in sizes),
            draw(st.integers(4, 24)),
            token_ids=tuple(draw(st.lists(st.integers(0, 2**32 - 1), max_size=3))),
        )
        frames = chunk_frames(op)
        chunks = draw(st.permutations([frame for frame, _ in frames]))
        end = End(tid, len(chunks), digest_of_checksums([s for _, s in frames])).encode()
        queues.append([op.encode(), *chunks, end])
    control = st.sampled_from(
        [
            Ping(7).encode(),
            Pong(7).encode(),
            Credit(1000).encode(),
            frame_header(0x1F, 5, FLAG_IGNORABLE) + b"skip!",
            frame_header(0x7E, 0, FLAG_IGNORABLE),
        ]
    )
    out = []
    while queues:
        if draw(st.integers(0, 4)) == 0:
            out.append(draw(control))
        queue = queues[draw(st.integers(0, len(queues) - 1))]
        out.append(queue.pop(0))
        queues = [q for q in queues if q]
    if draw(st.booleans()):
        out.append(Abort(99, ErrorCode.CANCELLED, "x").encode())
    return b"".join(out)


@st.composite
def answer_streams(draw: st.DrawFn) -> bytes:
    """What a peer acceptor sends its initiator: answers (COMPLETE of transfers it does not
    know is ignored), credit, liveness, frames to skip."""
    frames = st.sampled_from(
        [
            Complete(5, 100, 7).encode(),
            Abort(6, ErrorCode.CHECKSUM_MISMATCH, "x").encode(),
            Ping(1).encode(),
            Pong(2).encode(),
            Credit(4096).encode(),
            frame_header(0x1E, 3, FLAG_IGNORABLE) + b"abc",
        ]
    )
    return b"".join(draw(st.lists(frames, max_size=12)))


def acceptor_after_hello() -> Connection:
    conn = Connection(initiator=False, limits=LIMITS)
    conn.receive_data(MAGIC + HELLO.encode())
    conn.accept("acceptor")
    return conn


def initiator() -> Connection:
    conn = Connection(initiator=True)
    conn.initiate(HELLO)
    return conn


def ack() -> bytes:
    conn = Connection(initiator=False, limits=LIMITS)
    conn.receive_data(MAGIC + HELLO.encode())
    return conn.accept("acceptor")


def feed_split(conn: Connection, data: bytes, cuts: list[int]) -> list[Any]:
    events: list[Any] = []
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for lo, hi in itertools.pairwise(bounds):
        events += conn.receive_data(data[lo:hi])
    return events


def feed_bytewise(conn: Connection, data: bytes) -> list[Any]:
    return [e for i in range(len(data)) for e in conn.receive_data(data[i : i + 1])]


def feed_zero_copy(conn: Connection, data: bytes, step: int) -> list[Any]:
    events: list[Any] = []
    pos = 0
    while pos < len(data):
        buf = conn.read_buffer()
        n = min(len(buf), len(data) - pos, step)
        buf[:n] = data[pos : pos + n]
        pos += n
        events += conn.buffer_updated(n)
        while conn.pending:  # a bulk read may hold several frames: one at a time
            events += conn.next_frames()
    return events


def snapshot(events: list[Any]) -> list[Any]:
    """Events with chunk data as bytes (the sink's buffers differ between runs)."""
    out = []
    for e in events:
        if isinstance(e, Chunk):
            assert isinstance(e, ReceivedChunk) and e.tag is None  # the default sink's
            e = Chunk(e.meta, bytes(e.data))
        out.append(e)
    return out


# ------------------------------------------------------------------- (a) splitting
@SETTINGS
@given(frames=frame_streams(), answers=answer_streams(), data=st.data())
def test_splits_do_not_change_events(frames: bytes, answers: bytes, data: st.DataObject) -> None:
    streams: list[tuple[Callable[[], Connection], bytes]] = [
        (initiator, ack() + answers),  # the initiator: HELLO_ACK, then the acceptor's frames
        (acceptor_after_hello, frames),
    ]
    for make, stream in streams:
        reference = make()
        whole = snapshot(reference.receive_data(stream))
        assert reference.open_transfers == 0
        assert not reference.closed
        cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=24), label="cuts")
        assert snapshot(feed_split(make(), stream, cuts)) == whole
        assert snapshot(feed_bytewise(make(), stream)) == whole
        step = data.draw(st.integers(1, 64), label="step")
        conn = make()
        assert snapshot(feed_zero_copy(conn, stream, step)) == whole
        assert conn.recv_window == reference.recv_window
        assert conn.send_credit == reference.send_credit


@SETTINGS
@given(data=st.data())
def test_handshake_splits(data: st.DataObject) -> None:
    hello = Hello(
        ROLE_PEER,
        data.draw(st.text(max_size=20)),
        capabilities=data.draw(st.integers(0, 2**64 - 1)),
        auth=data.draw(st.binary(max_size=20)),
    )
    stream = MAGIC + hello.encode()
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    conn = Connection(initiator=False)
    assert feed_split(conn, stream, cuts) == [hello]
    assert conn.state is State.AWAIT_ACCEPT


# ---------------------------------------------------------------------- (b) hostile
def feed_hostile(stream: bytes, cuts: list[int]) -> None:
    """Drive a fresh acceptor like the IO layer does; only ProtocolError may come out."""
    conn = Connection(initiator=False, limits=LIMITS)
    try:
        pos = 0
        while pos < len(stream) and conn.state in (State.AWAIT_PREFACE, State.AWAIT_HELLO):
            conn.receive_data(stream[pos : pos + 1])  # byte by byte up to the HELLO
            pos += 1
        if conn.state is State.AWAIT_ACCEPT:
            conn.accept("acceptor")
        events = feed_split(conn, stream[pos:], cuts)
        conn.receive_eof()
    except ProtocolError as exc:
        assert conn.closed
        assert isinstance(exc.code, ErrorCode)
        assert GoAway.decode(memoryview(conn.goaway_for(exc))[8:]).code == exc.code
        return
    assert conn.closed
    for event in events:
        assert type(event).__module__.startswith("kvship.protocol.")
        assert type(event).__name__ in FRAME_NAMES


@SETTINGS
@given(
    prefix=st.sampled_from([b"", MAGIC, MAGIC + HELLO.encode()]),
    noise=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 2**16), max_size=8),
)
def test_random_bytes_only_raise_protocol_error(
    prefix: bytes, noise: bytes, cuts: list[int]
) -> None:
    feed_hostile(prefix + noise, cuts)


mutation = st.tuples(
    st.sampled_from(["flip", "insert", "delete"]),
    st.integers(0, 2**16),
    st.integers(0, 255),
)


@SETTINGS
@given(
    frames=frame_streams(),
    mutations=st.lists(mutation, min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 2**16), max_size=8),
)
def test_mutated_streams_only_raise_protocol_error(
    frames: bytes, mutations: list[tuple[str, int, int]], cuts: list[int]
) -> None:
    stream = bytearray(MAGIC + HELLO.encode() + frames)
    for kind, where, value in mutations:
        pos = where % (len(stream) + 1)
        if kind == "insert":
            stream[pos:pos] = bytes([value])
        elif pos < len(stream):
            if kind == "flip":
                stream[pos] ^= value or 0x80
            else:
                del stream[pos]
    feed_hostile(bytes(stream), cuts)
