"""Property tests of the sending side, end to end through two cores.

(a) Random *legal* send sequences (transfers opened, chunks in any order, CHUNK and SHM_CHUNK,
    compressed chunks, END, ABORTs either way, COMPLETE, CREDIT, PING) from one Connection,
    fed in random pieces into its peer Connection, never raise on either side, and decode to
    exactly the frames sent; credit stays consistent between the two ends.
(b) Random *illegal* sends at random points raise LocalProtocolError and leave the sending
    core unchanged (the sequence then goes on); the same bytes, pushed to the peer anyway,
    fail it with the same code.
(c) Striping: one transfer over several connections (chunks on any stripe) reassembles
    into the sender's digest; each stripe counts its own chunks.
(d) Codecs: real zstd / split16 chunks go out only with CAP_CODECS and come back bit-exact.
(e) Credit exhaustion: a sender never gets past its window; the receiver's grants are
    what lets it go on, byte for byte.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import event as tally
from hypothesis import strategies as st

from kvship.payload import Decoder, Encoder
from kvship.protocol import (
    CAP_CODECS,
    CAP_SHM,
    CAP_STRIPING,
    CODEC_RAW,
    CODEC_SPLIT16,
    CODEC_ZSTD,
    ROLE_ENGINE,
    ROLE_PEER,
    Abort,
    Chunk,
    ChunkMeta,
    Complete,
    Connection,
    Credit,
    End,
    ErrorCode,
    Have,
    Hello,
    LayerReady,
    LayerSpec,
    Limits,
    LocalProtocolError,
    Open,
    Ping,
    ProtocolError,
    Role,
    ShmAttach,
    ShmAttached,
    ShmChunk,
    Side,
    Subscribe,
    TransferDigest,
    chunk_checksum,
    chunk_table,
    digest_of_checksums,
)
from test_protocol_send import snapshot

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ------------------------------------------------------------------------- a link
@dataclass
class Plan:
    """One transfer the sender means to send: its OPEN and every chunk's bytes."""

    open: Open
    chunks: list[tuple[ChunkMeta, bytes]]
    sent: list[int] = field(default_factory=list)  # chunk indices that went out
    state: str = "new"  # new -> open -> ended | aborted -> done


def plan(tid: int, sizes: list[int], chunk_size: int, *, engine: bool, seed: int) -> Plan:
    layers = tuple(LayerSpec("uint8", (n,), n) for n in sizes)
    op = Open(tid, f"req-{tid}", layers, chunk_size, peer="decode:7100" if engine else "")
    starts = chunk_table(layers, chunk_size)
    rng = np.random.default_rng(seed)
    chunks = []
    for layer, spec in enumerate(layers):
        for index in range(starts[layer], starts[layer + 1]):
            offset = (index - starts[layer]) * chunk_size
            length = min(chunk_size, spec.nbytes - offset)
            # compressible (a few distinct byte values, in runs) so codecs have work
            data = np.repeat(rng.integers(0, 4, (length + 7) // 8, np.uint8), 8)[:length]
            raw = data.tobytes()
            chunks.append((ChunkMeta(tid, index, layer, offset, length, chunk_checksum(raw)), raw))
    return Plan(op, chunks)


class Link:
    """A sender core and a receiver core after a handshake, and the bytes between them."""

    def __init__(self, sender_side: Side, caps: int, limits: Limits) -> None:
        if sender_side is Side.ENGINE:
            self.sender = Connection(role=Role.ENGINE)
            self.receiver = Connection(role=Role.DAEMON, limits=limits)
            hello = Hello(ROLE_ENGINE, "engine", capabilities=caps)
        else:
            self.sender = Connection(role=Role.PEER, initiator=True)
            self.receiver = Connection(role=Role.PEER, initiator=False, limits=limits)
            hello = Hello(ROLE_PEER, "sender", capabilities=caps)
        self.receiver.receive_data(self.sender.initiate(hello))
        self.sender.receive_data(self.receiver.accept("receiver"))
        self.to_receiver = bytearray()
        self.to_sender = bytearray()
        self.expect_at_receiver: list[Any] = []
        self.expect_at_sender: list[Any] = []
        self.chunk_bytes = 0  # CHUNK data bytes sent (what credit is debited by)

    def send(self, frame: Any) -> None:
        self.to_receiver += self.sender.send(frame)
        self.expect_at_receiver.append(frame)

    def send_chunk(self, meta: ChunkMeta, wire: bytes) -> None:
        self.to_receiver += self.sender.chunk_header(meta, len(wire)) + wire
        self.expect_at_receiver.append(Chunk(meta, wire))
        self.chunk_bytes += len(wire)

    def answer(self, frame: Any) -> None:
        self.to_sender += self.receiver.send(frame)
        self.expect_at_sender.append(frame)

    def grant(self, n: int) -> None:
        self.to_sender += self.receiver.grant(n)
        self.expect_at_sender.append(Credit(n))

    def flush(self, cuts: list[int]) -> list[Any]:
        """Deliver what is in flight (the receiver's part in pieces at ``cuts``)."""
        got = feed(self.receiver, bytes(self.to_receiver), cuts)
        self.to_receiver.clear()
        assert normal(got) == normal(self.expect_at_receiver)
        self.expect_at_receiver.clear()
        back = self.sender.receive_data(bytes(self.to_sender))
        self.to_sender.clear()
        assert back == self.expect_at_sender
        self.expect_at_sender.clear()
        return got


def feed(conn: Connection, data: bytes, cuts: list[int]) -> list[Any]:
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    out: list[Any] = []
    for lo, hi in itertools.pairwise(bounds):
        out += conn.receive_data(data[lo:hi])
    return out


def normal(events: list[Any]) -> list[Any]:
    return [Chunk(e.meta, bytes(e.data)) if isinstance(e, Chunk) else e for e in events]


# --------------------------------------------------------------- (a) + (b) + (e)
ILLEGAL_KINDS = (
    "chunk_unopened",
    "chunk_ended",
    "end_twice",
    "end_count",
    "geometry",
    "duplicate",
    "beyond_credit",
    "open_too_many",
    "open_twice",
    "wrong_role",
    "coded_without_caps",
    "credit_zero",
)


def illegal(link: Link, plans: list[Plan], kind: str, engine: bool) -> tuple[Any, bytes] | None:
    """An attempt this side may not make now, and the bytes it would have put on the
    wire: (a function doing the attempt, raw bytes), or None where none fits now."""
    s = link.sender
    live = [p for p in plans if p.state == "open"]
    ended = [p for p in plans if p.state == "ended"]
    if kind == "chunk_unopened":
        meta = ChunkMeta(10**6, 0, 0, 0, 1, 0)
        return lambda: s.chunk_header(meta, 1), Chunk.header(meta, 1) + b"x"
    if kind == "chunk_ended" and ended:
        meta, raw = ended[0].chunks[0] if ended[0].chunks else (None, b"")
        if meta is not None:
            return lambda: s.chunk_header(meta, len(raw)), Chunk.header(meta, len(raw)) + raw
    if kind == "end_twice" and ended:
        end = End(ended[0].open.transfer_id, len(ended[0].sent), 0)
        return lambda: s.send(end), end.encode()
    if kind == "end_count" and live:
        end = End(live[0].open.transfer_id, len(live[0].sent) + 1, 0)
        return lambda: s.send(end), end.encode()
    if kind == "geometry" and live and live[0].chunks:
        meta, raw = live[0].chunks[-1]
        bad = ChunkMeta(meta.transfer_id, meta.chunk_index + 1, meta.layer, meta.offset,
                        meta.raw_length, meta.checksum)  # fmt: skip
        return lambda: s.chunk_header(bad, len(raw)), Chunk.header(bad, len(raw)) + raw
    if kind == "duplicate" and live and live[0].sent:
        meta, raw = live[0].chunks[live[0].sent[0]]
        return lambda: s.chunk_header(meta, len(raw)), b""  # the receiving core cannot tell
    if kind == "beyond_credit" and live:
        for index, (meta, raw) in enumerate(live[0].chunks):
            if index not in live[0].sent and len(raw) > s.send_credit:
                size = len(raw)
                return lambda m=meta, n=size: s.chunk_header(m, n), Chunk.header(meta, size) + raw
    if kind == "open_too_many" and len(live) >= s.limits.max_transfers:
        op = Open(10**6 + 1, "extra", (LayerSpec("uint8", (1,), 1),), 1,
                  peer="decode:7100" if engine else "")  # fmt: skip
        return lambda: s.send(op), op.encode()
    if kind == "open_twice" and live:
        return lambda: s.send(live[0].open), live[0].open.encode()
    if kind == "wrong_role":
        frame: Any = LayerReady(1, 0, 0, 0) if engine else Subscribe("x", 0)
        if not engine and live:
            frame = Complete(live[0].open.transfer_id, 0, 0)
        return lambda: s.send(frame), frame.encode()
    if kind == "coded_without_caps" and live and not s.negotiated.capabilities & CAP_CODECS:
        for index, (meta, raw) in enumerate(live[0].chunks):
            if index not in live[0].sent and len(raw) > 1:
                coded = ChunkMeta(meta.transfer_id, meta.chunk_index, meta.layer, meta.offset,
                                  meta.raw_length, meta.checksum, CODEC_ZSTD)  # fmt: skip
                return lambda c=coded: s.chunk_header(c, 1), Chunk.header(coded, 1) + b"z"
    if kind == "credit_zero":
        return lambda: s.send(Credit(0)), Credit(0).encode()
    return None


@settings(SETTINGS, max_examples=300)
@given(data=st.data())
def test_random_send_sequences(data: st.DataObject) -> None:
    draw = data.draw
    engine = draw(st.booleans(), label="engine")
    codecs = not engine and draw(st.booleans(), label="codecs")
    shm = engine and draw(st.booleans(), label="shm")
    window = draw(st.integers(16, 400), label="window")
    max_chunk = draw(st.integers(1, min(64, window)), label="max_chunk")
    limits = Limits(4096, max_chunk, draw(st.integers(1, 4)), window)
    caps = (CAP_SHM if shm else 0) | (CAP_CODECS if codecs else 0)
    link = Link(Side.ENGINE if engine else Side.PEER_INITIATOR, caps, limits)
    s, r = link.sender, link.receiver
    plans = [
        plan(
            tid,
            draw(st.lists(st.integers(0, 120), min_size=1, max_size=3), label="sizes"),
            draw(st.integers(1, max_chunk), label="chunk_size"),
            engine=engine,
            seed=tid,
        )
        for tid in range(1, draw(st.integers(1, 5), label="transfers") + 1)
    ]
    if shm:
        link.send(ShmAttach(1 << 20, "/dev/shm/fuzz"))
        link.flush([])
        link.answer(ShmAttached(1 << 20))
        link.flush([])
    encoder, decoder = Encoder(), Decoder()
    consumed = 0  # chunk bytes the receiver holds and has not credited back yet
    granted = 0
    for _ in range(draw(st.integers(0, 120), label="steps")):
        live = [p for p in plans if p.state == "open"]
        ended = [p for p in plans if p.state == "ended"]
        new = [p for p in plans if p.state == "new"]
        actions = ["ping", "flush", "illegal"]
        if new and len(live) < limits.max_transfers:
            actions.append("open")
        if any(len(p.sent) < len(p.chunks) for p in live):
            actions.append("chunk")
        if live:
            actions += ["end", "abort", "peer_abort"]
        if ended:
            actions.append("complete")  # the peer acceptor's, or the daemon relaying one
        if consumed:
            actions.append("grant")
        action = draw(st.sampled_from(actions), label="action")
        tally(f"action {action}")
        if action == "open":
            p = new[0]
            link.send(p.open)
            p.state = "open"
        elif action == "chunk":
            p = draw(st.sampled_from([p for p in live if len(p.sent) < len(p.chunks)]))
            index = draw(st.sampled_from([i for i in range(len(p.chunks)) if i not in p.sent]))
            meta, raw = p.chunks[index]
            via_shm = shm and draw(st.booleans(), label="shm_chunk")
            if via_shm:
                link.flush([])
                before = r.recv_window
                link.send(ShmChunk(meta, 4096 * index))
                p.sent.append(index)
                link.flush([])
                assert r.recv_window == before  # SHM_CHUNK takes no credit
                continue
            wire = raw
            if codecs and len(raw) > 1 and draw(st.booleans(), label="code"):
                codec = draw(st.sampled_from([CODEC_ZSTD, CODEC_SPLIT16]))
                used, coded = encoder.encode(raw, codec)
                if used != CODEC_RAW:
                    meta = ChunkMeta(meta.transfer_id, meta.chunk_index, meta.layer, meta.offset,
                                     meta.raw_length, meta.checksum, used)  # fmt: skip
                    wire = bytes(coded)
            if len(wire) > s.send_credit:
                # (e): the core refuses, whatever the app wants; the receiver must grant
                before = snapshot(s)
                try:
                    s.chunk_header(meta, len(wire))
                except LocalProtocolError as exc:
                    assert exc.code is ErrorCode.FLOW_CONTROL
                else:
                    raise AssertionError("a chunk beyond credit went out")
                assert snapshot(s) == before
                link.flush([])
                if consumed:
                    link.grant(consumed)
                    granted += consumed
                    consumed = 0
                    link.flush([])
                continue
            link.send_chunk(meta, wire)
            p.sent.append(index)
            consumed += len(wire)
        elif action == "end":
            p = draw(st.sampled_from(live))
            link.send(End(p.open.transfer_id, len(p.sent), 0))
            p.state = "ended"
        elif action == "abort":
            p = draw(st.sampled_from(live))
            link.send(Abort(p.open.transfer_id, int(ErrorCode.CANCELLED), "sender"))
            p.state = "done"
        elif action == "peer_abort":
            p = draw(st.sampled_from(live))
            link.flush([])
            link.answer(Abort(p.open.transfer_id, int(ErrorCode.CHECKSUM_MISMATCH), "rx"))
            link.flush([])
            p.state = "done"
            assert p.open.transfer_id not in s._sending
            # a chunk that was on its way: neither core objects, the receiver drops it
            rest = [i for i in range(len(p.chunks)) if i not in p.sent]
            if rest and len(p.chunks[rest[0]][1]) <= s.send_credit:
                meta, raw = p.chunks[rest[0]]
                link.send_chunk(meta, raw)
                consumed += len(raw)
        elif action == "complete":
            p = draw(st.sampled_from(ended))
            link.flush([])
            link.answer(Complete(p.open.transfer_id, p.open.total_bytes, 0))
            p.state = "done"
        elif action == "grant":
            n = draw(st.integers(1, consumed), label="grant")
            link.grant(n)
            granted += n
            consumed -= n
        elif action == "ping":
            link.send(Ping(draw(st.integers(0, 2**64 - 1))))
        elif action == "flush":
            got = link.flush(draw(st.lists(st.integers(0, 2**16), max_size=6), label="cuts"))
            for event in got:  # the application's step: decode, verify
                if isinstance(event, Chunk):
                    out = bytearray(event.meta.raw_length)
                    decoder.decode(event.meta.codec, event.data, event.meta.raw_length,
                                   event.meta.checksum, out)  # fmt: skip
        else:  # (b) an illegal attempt: refused, nothing changes, the sequence goes on
            options = {k: illegal(link, plans, k, engine) for k in ILLEGAL_KINDS}
            kind = draw(st.sampled_from([k for k, v in options.items() if v]), label="illegal")
            do, raw = options[kind]  # type: ignore[misc]
            before = snapshot(s)
            tally(f"illegal {kind}")
            try:
                do()
            except LocalProtocolError:
                assert snapshot(s) == before, kind
            else:
                raise AssertionError(f"{kind} went out")
    link.flush([])
    # credit: both ends agree once nothing is in flight
    assert s.send_credit == r.recv_window == window + granted - link.chunk_bytes
    # last, an illegal attempt whose bytes are then pushed anyway: the peer refuses them
    # with the code the sending core gave
    options = {k: illegal(link, plans, k, engine) for k in ILLEGAL_KINDS}
    last = draw(st.sampled_from([k for k, v in options.items() if v]), label="last")
    attempt = options[last]
    if attempt is not None:
        do, raw = attempt
        try:
            do()
        except LocalProtocolError as exc:
            local = exc.code
        else:
            raise AssertionError("an illegal frame went out")
        if raw:
            tally(f"pushed {local.name}")
            try:
                r.receive_data(raw)
            except ProtocolError as remote:
                assert remote.code is local, (remote, local)
                assert r.closed
            else:
                raise AssertionError(f"the receiver took what the sender refused ({local})")


# ------------------------------------------------------------------- (c) striping
@SETTINGS
@given(
    sizes=st.lists(st.integers(0, 200), min_size=1, max_size=4),
    chunk_size=st.integers(1, 32),
    n_stripes=st.integers(1, 4),
    data=st.data(),
)
def test_striped_transfer(
    sizes: list[int], chunk_size: int, n_stripes: int, data: st.DataObject
) -> None:
    limits = Limits(4096, 64, 4, 1 << 20)
    links = [Link(Side.PEER_INITIATOR, CAP_STRIPING, limits) for _ in range(n_stripes)]
    received: list[Any] = []
    p = plan(7, sizes, chunk_size, engine=False, seed=len(sizes))
    stripe_of = [data.draw(st.integers(0, n_stripes - 1)) for _ in p.chunks]
    order = data.draw(st.permutations(range(len(p.chunks))))
    digest = TransferDigest(len(p.chunks))
    for k, link in enumerate(links):
        op = Open(7, p.open.request_id, p.open.layers, chunk_size, n_stripes=n_stripes, stripe=k)
        link.send(op)
        # a chunk of this transfer on a stripe whose OPEN did not go out is refused
    lone = Link(Side.PEER_INITIATOR, CAP_STRIPING, limits)
    if p.chunks:
        meta, raw = p.chunks[0]
        before = snapshot(lone.sender)
        try:
            lone.sender.chunk_header(meta, len(raw))
        except LocalProtocolError as exc:
            assert exc.code is ErrorCode.UNKNOWN_TRANSFER
        assert snapshot(lone.sender) == before
    for index in order:
        meta, raw = p.chunks[index]
        links[stripe_of[index]].send_chunk(meta, raw)
        if data.draw(st.integers(0, 3)) == 0:
            received += links[data.draw(st.integers(0, n_stripes - 1))].flush([])
    whole = digest_of_checksums([m.checksum for m, _ in p.chunks])
    for k, link in enumerate(links):
        link.send(End(7, stripe_of.count(k), whole))
        received += link.flush(data.draw(st.lists(st.integers(0, 2**16), max_size=4)))
        assert link.receiver.open_transfers == 0 and link.sender.sending_transfers == 0
    for event in received:
        if isinstance(event, Chunk):
            assert chunk_checksum(event.data) == event.meta.checksum
            digest.add(event.meta.chunk_index, event.meta.checksum)
    assert digest.complete and digest.value() == whole
    # the receiver ABORTs on stripe 0 only (§7.4): the sender forgets it on every stripe
    again = [Link(Side.PEER_INITIATOR, CAP_STRIPING, limits) for _ in range(n_stripes)]
    for k, link in enumerate(again):
        link.send(Open(8, "again", p.open.layers, chunk_size, n_stripes=n_stripes, stripe=k))
        link.flush([])
    again[0].answer(Abort(8, int(ErrorCode.CHECKSUM_MISMATCH)))
    again[0].flush([])
    for link in again:
        link.sender.forget(8)
        link.receiver.forget(8)
        assert link.sender.sending_transfers == 0 and link.receiver.open_transfers == 0


# --------------------------------------------------------------------- (d) codecs
@SETTINGS
@given(
    runs=st.lists(st.tuples(st.integers(0, 255), st.integers(1, 64)), min_size=1, max_size=40),
    codec=st.sampled_from([CODEC_ZSTD, CODEC_SPLIT16]),
    negotiated=st.booleans(),
)
def test_coded_chunks(runs: list[tuple[int, int]], codec: int, negotiated: bool) -> None:
    raw = b"".join(bytes([v]) * n for v, n in runs)
    limits = Limits(8192, 4096, 4, 1 << 20)
    link = Link(Side.PEER_INITIATOR, CAP_CODECS if negotiated else 0, limits)
    op = Open(1, "coded", (LayerSpec("uint8", (len(raw),), len(raw)),), 4096)
    link.send(op)
    used, wire = Encoder().encode(raw, codec)
    meta = ChunkMeta(1, 0, 0, 0, len(raw), chunk_checksum(raw), used)
    if used != CODEC_RAW and not negotiated:
        before = snapshot(link.sender)
        try:
            link.sender.chunk_header(meta, len(wire))
        except LocalProtocolError as exc:
            assert exc.code is ErrorCode.UNSUPPORTED_CODEC
        else:
            raise AssertionError("a coded chunk went out without CAP_CODECS")
        assert snapshot(link.sender) == before
        return
    link.send_chunk(meta, bytes(wire))
    link.send(End(1, 1, digest_of_checksums([meta.checksum])))
    [_, chunk, _] = link.flush([])
    out = bytearray(len(raw))
    Decoder().decode(chunk.meta.codec, chunk.data, len(raw), chunk.meta.checksum, out)
    assert bytes(out) == raw


# --------------------------------------------------- (e) credit, in isolation
@SETTINGS
@given(
    lengths=st.lists(st.integers(1, 64), min_size=1, max_size=30),
    window=st.integers(64, 300),
    data=st.data(),
)
def test_credit_exhaustion(lengths: list[int], window: int, data: st.DataObject) -> None:
    limits = Limits(4096, 64, 4, window)
    link = Link(Side.PEER_INITIATOR, 0, limits)
    layers = tuple(LayerSpec("uint8", (n,), n) for n in lengths)
    link.send(Open(1, "credit", layers, 64))
    starts = chunk_table(layers, 64)
    sent = credited = 0
    for layer, n in enumerate(lengths):
        meta = ChunkMeta(1, starts[layer], layer, 0, n, chunk_checksum(bytes(n)))
        while link.sender.send_credit < n:
            before = snapshot(link.sender)
            try:
                link.sender.chunk_header(meta, n)
            except LocalProtocolError as exc:
                assert exc.code is ErrorCode.FLOW_CONTROL
            assert snapshot(link.sender) == before
            link.flush([])
            owed = sent - credited
            assert owed > 0  # the window is spent on bytes the receiver holds
            grant = data.draw(st.integers(1, owed))
            link.grant(grant)
            credited += grant
            link.flush([])
        link.send_chunk(meta, bytes(n))
        sent += n
        assert link.sender.send_credit == window + credited - sent >= 0
    link.flush([])
    assert link.receiver.recv_window == link.sender.send_credit == window + credited - sent
    try:
        link.sender.send(Have(1, 0))  # and a sender never answers for the receiver
    except LocalProtocolError as exc:
        assert exc.code is ErrorCode.PROTOCOL_ERROR
    else:
        raise AssertionError("HAVE from the sender went out")
