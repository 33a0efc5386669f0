"""The receiving side: a transfer arriving from a peer, reassembled and handed to an engine.

Every stripe's chunks land, by index, either straight in the claiming engine's arena (the
layer's region is reserved when its first chunk arrives) or, when no engine is attached yet
or its arena is full, in daemon memory bounded by the staging budget: past that bound the
daemon stops granting credit, so the sender waits instead of the daemon growing. A layer is
handed to the engine only when all its chunks are in and verified, and the transfer is
acknowledged (COMPLETE) only when the whole-transfer digest matches.

The delivery side (:mod:`kvship.daemon.delivery`) uses only the *delivery API* below
(``attach``, ``ready_layers``, ``take_region``, ``held_chunks``, ``layer_delivered``,
``fill_from_store``, ``wait_changed``, ``mark_delivered``, ``fail``); it never edits a
transfer's fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..aio import FramedProtocol, spawn
from ..layout.dedup import DedupError, skipped_bytes
from ..protocol import (
    CAP_DEDUP_TAIL,
    CAP_HOLD,
    CAP_RESUME,
    CODEC_RAW,
    Abort,
    Chunk,
    ChunkMeta,
    Complete,
    End,
    ErrorCode,
    Have,
    Hold,
    LayerSpec,
    Open,
    ProtocolError,
    Resume,
    TransferDigest,
    chunk_checksum,
    chunk_table,
)
from ..store import StoreError
from .budget import StagingBudget
from .codecpool import CodecPool
from .dedup import HeldPrefix, verify_manifest
from .logs import transfer_fields
from .metrics import Metrics
from .records import TransferRecord, TransferState
from .scratch import ScratchPool
from .stores import StoreSet

log = logging.getLogger("kvship.in")


class Destination(Protocol):
    """Where a claimed transfer's layers go: an engine's arena, as a delivery sees it."""

    @property
    def active(self) -> bool:
        """False once the delivery ended (a transfer it left unfinished is an orphan)."""
        ...

    @property
    def attached(self) -> bool:
        """Its arena can take bytes now (False once the engine's connection closed)."""
        ...

    def reserve(self, nbytes: int) -> int | None: ...

    def view(self, offset: int, length: int) -> memoryview: ...


@dataclass(frozen=True)
class ReceiveContext:
    """What every incoming transfer of a daemon shares: its memory bound, its codec
    workers and their receive buffers, its metrics, its block stores, and the registry's
    callbacks."""

    budget: StagingBudget
    codecs: CodecPool
    metrics: Metrics
    stores: StoreSet
    on_received: Callable[[IncomingTransfer], None]
    on_finished: Callable[[IncomingTransfer, bool], None]  # (transfer, was still open)
    scratch: ScratchPool = field(default_factory=ScratchPool)  # coded chunks' wire bytes


class IncomingTransfer:
    def __init__(self, ctx: ReceiveContext, opened: Open, peer: str) -> None:
        self.ctx = ctx
        self.opened = opened
        self.id = opened.transfer_id
        self.request_id = opened.request_id
        self.layers: tuple[LayerSpec, ...] = opened.layers
        self.starts = chunk_table(opened.layers, opened.chunk_size)
        self.n_stripes = opened.n_stripes
        self.stripe_conns: dict[int, FramedProtocol] = {}
        self.ends: dict[int, End] = {}
        self.digest = TransferDigest(opened.n_chunks)
        # Checksums of the chunks filled in from the block store (dedup), so the engine's
        # digest covers what it got (SPEC §8), never the peer link's 0 slots.
        self.filled_checksums: dict[int, int] = {}
        self.pending = [self.starts[i + 1] - self.starts[i] for i in range(len(self.layers))]
        # The arena region reserved for each layer in the claiming engine's arena. Chunks
        # that arrive before a region could be reserved wait in daemon memory (``held``) and
        # are copied into the region before the layer is handed over.
        self.regions: dict[int, int] = {}
        self.held: dict[int, list[tuple[int, bytearray]]] = {}  # layer -> chunks in memory
        self.decoding = 0  # coded chunks being decoded in the codec pool
        self.negotiating = False  # the dedup manifest is being checked (worker thread)
        self.held_prefix: HeldPrefix | None = None  # what dedup supplies from the store
        self._skipped: set[int] = set()  # chunk indices HAVE declared held
        self.ready: deque[int] = deque(i for i, n in enumerate(self.pending) if n == 0)
        self.delivery_blocked = False  # ready layers, none of which its delivery could place
        self.destination_of: Destination | None = None
        self.error: tuple[ErrorCode, str] | None = None
        self.changed = asyncio.Event()  # wakes the delivery
        self._delivered_any = False
        self.last_activity = time.monotonic()
        self.stall_reported = False  # a "nothing moves" warning went out for it
        self.sender_paused = False  # HOLD sent: its sender waits until told to go on
        self.completion: Complete | None = None  # the COMPLETE sent (a resume repeats it)
        self.resumes = 0  # times the sender re-opened it on new connections
        self.resumed = False  # from then on chunks land in daemon memory, never an arena
        self._corrupt_once: set[int] = set()  # chunks that arrived corrupt (resend asked)
        self.record = TransferRecord(
            self.id,
            "in",
            self.request_id,
            peer,
            opened.total_bytes,
            opened.n_chunks,
            len(opened.layers),
        )

    @property
    def state(self) -> TransferState:
        return self.record.state

    def log_fields(self, **more: object) -> dict[str, object]:
        """``extra=`` of this transfer's log lines (ids as /v1/transfers shows them)."""
        return transfer_fields(self.id, self.request_id, self.record.peer, direction="in", **more)

    # ------------------------------------------------------------ peer side
    def add_stripe(self, conn: FramedProtocol, opened: Open) -> None:
        same = (
            opened.request_id == self.request_id
            and opened.layers == self.layers
            and opened.chunk_size == self.opened.chunk_size
            and opened.n_stripes == self.n_stripes
            and opened.token_ids == self.opened.token_ids
            and opened.extra == self.opened.extra
        )
        if not same:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "stripes of one transfer disagree")
        if opened.stripe in self.stripe_conns:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"stripe {opened.stripe} opened twice")
        self.stripe_conns[opened.stripe] = conn

    def resume(self, conn: FramedProtocol, opened: Open) -> None:
        """The sender re-opens the transfer on a new connection (SPEC §7.7): the stripe
        moves there (its old connection's late frames are dropped), the stripe count may
        change, and the sender learns which chunks are held here (RESUME)."""
        same = (
            opened.request_id == self.request_id
            and opened.layers == self.layers
            and opened.chunk_size == self.opened.chunk_size
            and opened.token_ids == self.opened.token_ids
        )
        if not same:  # one of the two OPENs was altered on the way: nothing to resume
            message = "a resuming OPEN disagrees with the first one (one of them was altered)"
            with contextlib.suppress(ConnectionError, RuntimeError):
                conn.send(Abort(self.id, int(ErrorCode.PROTOCOL_ERROR), message))
            self.fail(ErrorCode.PROTOCOL_ERROR, message, tell_sender=False)
            return
        self.resumed = True
        self.n_stripes = opened.n_stripes
        for stripe in [s for s in self.stripe_conns if s >= self.n_stripes or s == opened.stripe]:
            old = self.stripe_conns.pop(stripe)
            if old is not conn:
                # The sender left it: close it, so no late chunk of it can still be landing
                # in an engine's arena once this transfer's layers are handed over.
                old.fail(ProtocolError(ErrorCode.CANCELLED, "superseded by a resumed stripe"))
        for stripe in [s for s in self.ends if s >= self.n_stripes or s == opened.stripe]:
            del self.ends[stripe]  # the sender ENDs every new stripe again
        self.stripe_conns[opened.stripe] = conn
        if opened.stripe == 0:
            self.resumes += 1
            self.ctx.metrics.transfers_resumed.inc()
        self.last_activity = time.monotonic()
        held = self.digest.held() | self._skipped
        conn.send(Resume.of(self.id, self.opened.n_chunks, held))

    @property
    def suspended(self) -> bool:
        """Arriving, but every stripe's connection is gone (waiting for a resume)."""
        return self.state is TransferState.OPEN and not self.stripe_conns

    def start_dedup(self, conn: FramedProtocol) -> None:
        """The sender's manifest: checked in a worker (it hashes the whole prompt), then
        answered with HAVE. Chunks are not expected before HAVE (the sender waits for it)."""
        self.negotiating = True
        spawn(self._negotiate_dedup(conn), f"dedup-{self.id:x}")

    async def _negotiate_dedup(self, conn: FramedProtocol) -> None:
        opened = self.opened
        try:
            verified = await asyncio.to_thread(
                verify_manifest, opened.extra["dedup"], self.layers, opened.token_ids,
                opened.chunk_size,
            )  # fmt: skip
            if self.state is not TransferState.OPEN:
                return
            manifest = verified.manifest
            store = self.ctx.stores.for_transfer(manifest.layout, manifest.tp_rank)
            tails = bool(conn.conn.negotiated.capabilities & CAP_DEDUP_TAIL)
            held = HeldPrefix.hold(store, verified, self.layers, opened.chunk_size, tails)
        except (DedupError, StoreError) as exc:
            self.fail(ErrorCode.LAYOUT_MISMATCH, f"dedup manifest refused: {exc}")
            return
        except Exception as exc:  # a bug: the sender must hear of it, not wait for HAVE
            log.exception("dedup negotiation of %x failed", self.id)
            self.fail(ErrorCode.INTERNAL_ERROR, f"dedup negotiation failed: {exc!r}")
            return
        finally:
            self.negotiating = False
        if self.state is not TransferState.OPEN:
            held.release()
            return
        if self.record.chunks_done or self.decoding:
            # The sender gave up waiting and sends everything: skip nothing, on both sides.
            held.release()
            self._have(conn, Have(self.id, 0, False))
            self._maybe_received()
            return
        self.held_prefix = held
        self._skipped = {index for chunks in held.skip.values() for index in chunks}
        for layer, chunks in held.skip.items():
            for index in chunks:
                self.digest.add(index, 0)
            self.pending[layer] -= len(chunks)
            if self.pending[layer] == 0:
                self.ready.append(layer)
        self.record.skipped_bytes = skipped_bytes(
            self.layers, held.skip, held.chunk_size, held.tails
        )
        self._have(conn, Have(self.id, held.blocks, held.states))
        self.changed.set()
        self._maybe_received()

    def _have(self, conn: FramedProtocol, frame: Have) -> None:
        """Answer the manifest, if its connection is still there (a resumable transfer
        outlives it: the sender then sends what the receiver lacks, per RESUME)."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            conn.send(frame)

    def destination(self, meta: ChunkMeta) -> tuple[memoryview, bool]:
        """Where a chunk's raw bytes go: (buffer, in_arena). The layer's region of the
        engine's arena when there is room, else daemon memory."""
        dest = self.destination_of
        # An engine that left has unmapped its arena: its layers' bytes go to daemon
        # memory (its delivery fails the transfer); the peer connection is never at fault.
        # Once resumed, chunks land in daemon memory: a second copy of a chunk (one per
        # connection) must never write into an arena region an engine may be reading.
        if (
            self.state is TransferState.OPEN
            and dest is not None
            and dest.attached
            and not self.resumed
        ):
            layer = meta.layer
            offset = self.regions.get(layer)
            if offset is None:
                offset = dest.reserve(self.layers[layer].nbytes)
                if offset is not None:
                    self.regions[layer] = offset
            if offset is not None:
                return dest.view(offset + meta.offset, meta.raw_length), True
        return memoryview(bytearray(meta.raw_length)), False

    def sink(self, meta: ChunkMeta, wire_length: int) -> tuple[memoryview, bool]:
        """Where a chunk's wire bytes land: raw ones at their destination, coded ones in a
        pooled scratch buffer they are decoded from. (buffer, in_arena) is what the peer
        connection's payload sink returns; ``in_arena`` comes back as the chunk's tag."""
        if meta.codec != CODEC_RAW:
            return self.ctx.scratch.take(wire_length), False
        return self.destination(meta)

    def on_chunk(self, conn: FramedProtocol, chunk: Chunk, in_arena: bool) -> None:
        meta, data = chunk.meta, chunk.view
        if self.state is not TransferState.OPEN:  # failed: bytes are read and dropped
            self._drop(conn, meta, data)
            return
        if self.digest.has(meta.chunk_index) and _resumable(conn):
            self._drop(conn, meta, data)  # a resumed sender's second copy: held already
            self.ctx.metrics.chunks_duplicate.inc()
            self._ack(conn, meta.chunk_index)
            return
        if meta.chunk_index in self._skipped:  # HAVE said it is held: a sender that gave up
            self._drop(conn, meta, data)  # waiting sends it anyway; only this transfer is wrong
            self.fail(
                ErrorCode.PROTOCOL_ERROR,
                f"chunk {meta.chunk_index} arrived though HAVE declared it held (SPEC §7.6.5)",
            )
            return
        if not self._placed_as_expected(meta):
            self._drop(conn, meta, data)
            return
        if meta.codec != CODEC_RAW:
            self.decoding += 1
            spawn(self._decode(conn, meta, data), f"decode-{self.id:x}-{meta.chunk_index}")
            return
        if chunk_checksum(data) != meta.checksum:
            self._corrupt(conn, meta, len(data))
            return
        self._accept(conn, meta, data, in_arena, len(data))

    def _drop(self, conn: FramedProtocol, meta: ChunkMeta, data: memoryview) -> None:
        """A chunk not taken: its credit goes back, a coded one's buffer to the pool."""
        conn.grant(len(data))
        if meta.codec != CODEC_RAW:
            self.ctx.scratch.give(data)

    def _placed_as_expected(self, meta: ChunkMeta) -> bool:
        """A chunk is whole unless HAVE made it the tail of a straddling chunk, which must
        start exactly where the held prefix ends (SPEC §7.6.5). Else only this transfer is
        wrong: it fails, the connection stays."""
        index = meta.chunk_index
        start = (index - self.starts[meta.layer]) * self.opened.chunk_size
        held = self.held_prefix
        cut = held.tails.get(index, 0) if held is not None else 0
        if meta.offset == start + cut:
            return True
        want = f"its tail from {start + cut}" if cut else "whole"
        self.fail(
            ErrorCode.PROTOCOL_ERROR,
            f"chunk {index} starts at {meta.offset} of its layer, HAVE made it {want} "
            "(SPEC §7.6.5)",
        )
        return False

    def _corrupt(self, conn: FramedProtocol, meta: ChunkMeta, wire: int) -> None:
        """A chunk whose bytes do not match its checksum is never accepted. Without resume
        it fails its transfer, never the connection (SPEC §7.4): the frame's length
        delimited it, so the connection's other transfers are intact, and the bytes may be
        a corrupt engine's that the sending daemon forwarded unchecked. With resume the
        first corruption of a chunk closes the connection instead (§7.7), so the sender
        sends it again; nothing corrupt is ever delivered either way."""
        conn.grant(wire)
        self.ctx.metrics.chunks_corrupt.inc()
        index = meta.chunk_index
        if _resumable(conn) and index not in self._corrupt_once:
            # Most likely the link (the sender holds the chunk until ACKed): close this
            # connection, the sender resumes and sends it again. The same chunk corrupt a
            # second time is the sender's own bytes: then the transfer fails.
            self._corrupt_once.add(index)
            conn.fail(ProtocolError(ErrorCode.CHECKSUM_MISMATCH, f"chunk {index} arrived corrupt"))
            return
        self.fail(ErrorCode.CHECKSUM_MISMATCH, f"chunk {index} checksum mismatch")

    async def _decode(self, conn: FramedProtocol, meta: ChunkMeta, wire: memoryview) -> None:
        """Decode a coded chunk in a worker, verifying its checksum, then accept it. Once
        the worker is done with the wire bytes their buffer goes back to the pool (not on
        cancellation: the worker may still be reading it)."""
        n_wire = len(wire)
        try:
            out, in_arena = self.destination(meta)
            try:
                await self.ctx.codecs.decode(meta.codec, wire, meta.raw_length, meta.checksum, out)
            except ProtocolError as exc:
                self.ctx.scratch.give(wire)
                if exc.code == ErrorCode.CHECKSUM_MISMATCH:  # decoded, but not to its bytes
                    self._corrupt(conn, meta, n_wire)
                    return
                self.fail(exc.code, f"chunk {meta.chunk_index}: {exc.message}")
                conn.fail(exc)  # a coded stream that does not decode: the sender is broken
                return
            self.ctx.scratch.give(wire)
        finally:
            self.decoding -= 1
        if self.state is not TransferState.OPEN or self.digest.has(meta.chunk_index):
            conn.grant(n_wire)  # failed meanwhile, or a copy that overtook it is in
            return
        self._accept(conn, meta, out, in_arena, n_wire)
        self._maybe_received()

    def _accept(
        self, conn: FramedProtocol, meta: ChunkMeta, data: memoryview, in_arena: bool, wire: int
    ) -> None:
        """A verified chunk is in place: account for it and credit its wire bytes back."""
        n = len(data)
        metrics = self.ctx.metrics
        self.last_activity = time.monotonic()
        self.digest.add(meta.chunk_index, meta.checksum)
        if _resumable(conn):
            self._ack(conn, meta.chunk_index)  # queued first: it leaves with the credit
        if in_arena:
            conn.grant(wire)
        else:
            # Outside an arena, sink() and destination() put chunks in a scratch bytearray.
            scratch = data.obj
            assert isinstance(scratch, bytearray), type(scratch)
            self.held.setdefault(meta.layer, []).append((meta.offset, scratch))
            self.ctx.budget.hold(conn, n, wire, owner=self)
            metrics.chunks_staged.inc()
        self.record.bytes_done += n
        self.record.chunks_done += 1
        metrics.bytes_received.inc(n)
        metrics.chunks_received.inc()
        self.pending[meta.layer] -= 1
        if self.pending[meta.layer] == 0:
            self.ready.append(meta.layer)
            self.changed.set()
            self.ctx.budget.reconsider()  # the next layer may need other connections

    def _ack(self, conn: FramedProtocol, index: int) -> None:
        """ACK ``index`` to the sender: the connection batches the turn's ACKs and sends
        them in one write with the CREDIT of the same chunks."""
        if conn.is_open:
            conn.ack(self.id, index)

    def on_end(self, conn: FramedProtocol, end: End) -> None:
        stripe = next((s for s, c in self.stripe_conns.items() if c is conn), None)
        if stripe is None and conn.conn.is_forgotten(self.id):
            return  # a stripe that moved to a new connection (resume): its END is void
        if stripe is None or stripe in self.ends:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "END on a connection with no stripe")
        self.ends[stripe] = end
        self._maybe_received()

    def _maybe_received(self) -> None:
        """Every stripe ended and every chunk is decoded: check the digest, acknowledge."""
        if (
            len(self.ends) < self.n_stripes
            or self.state is not TransferState.OPEN
            or self.decoding
            or self.negotiating
        ):
            return
        if not self.digest.complete:
            self.fail(ErrorCode.PROTOCOL_ERROR, "every stripe ended but chunks are missing")
            return
        digest = self.digest.value()
        if any(e.digest != digest for e in self.ends.values()):
            self.fail(ErrorCode.DIGEST_MISMATCH, "whole-transfer digest does not match")
            return
        self.record.state = TransferState.RECEIVED
        self.last_activity = time.monotonic()
        self.completion = Complete(self.id, self.opened.total_bytes, digest)
        self._to_sender(self.completion)
        self.changed.set()
        self.ctx.on_received(self)

    def _to_sender(self, frame: Complete | Abort) -> None:
        conns = [self.stripe_conns.get(0), *self.stripe_conns.values()]
        for conn in conns:
            if conn is not None and conn.is_open:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    conn.send(frame)
                    return

    def on_stripe_lost(self, conn: FramedProtocol, error: BaseException | None) -> None:
        if self.state is not TransferState.OPEN or conn not in self.stripe_conns.values():
            return
        if _resumable(conn):  # the sender comes back and resumes (or the reaper fails it)
            for stripe in [s for s, c in self.stripe_conns.items() if c is conn]:
                del self.stripe_conns[stripe]
            self.last_activity = time.monotonic()
            log.info(
                "incoming transfer from %s: a stripe's connection closed (%s); waiting for "
                "the sender to resume",
                self.record.peer,
                error,
                extra=self.log_fields(cause=f"stripe lost {self.record.peer}"),
            )
            return
        self.fail(
            ErrorCode.PEER_UNREACHABLE, f"a stripe's connection closed: {error}", tell_sender=False
        )

    def finishing_connections(self) -> set[object]:
        """The connections carrying the missing chunks of this transfer's first
        incomplete layer, when an engine waits for it (else none: an unclaimed transfer
        stays inside the staging bound). A layer holding a region of the engine's arena
        comes first: completed, it is delivered and frees the arena space that layers
        complete in daemon memory are waiting for."""
        dest = self.destination_of
        if self.state is not TransferState.OPEN or dest is None or not dest.attached:
            return set()
        incomplete = [i for i, n in enumerate(self.pending) if n > 0]
        if not incomplete:
            return set()
        layer = next((i for i in incomplete if i in self.regions), incomplete[0])
        stripes = {
            index % self.n_stripes
            for index in range(self.starts[layer], self.starts[layer + 1])
            if not self.digest.has(index) and index not in self._skipped
        }
        return {self.stripe_conns[s] for s in stripes if s in self.stripe_conns}

    def pause_sender(self, conn: FramedProtocol) -> bool:
        """HOLD this transfer at its sender (SPEC §7.8): its chunks fill staging while a
        transfer an engine waits for needs the connections' credit. False where the
        link cannot (no ``CAP_HOLD``)."""
        if self.sender_paused:
            return True
        if not conn.conn.negotiated.capabilities & CAP_HOLD or not conn.is_open:
            return False
        with contextlib.suppress(ConnectionError, RuntimeError):
            conn.send(Hold(self.id, True))
            self.sender_paused = True
            self.ctx.metrics.holds_sent.inc()
        return self.sender_paused

    def needs_memory_to_finish(self) -> bool:
        """No layer of it can be handed over now (none is complete, or its delivery found
        no arena space for any that is): a delivery frees nothing until one completes, so
        its next chunks may go past the staging bound (the budget's rule). Otherwise its
        engine's reading frees the room they wait for."""
        return not self.ready or self.delivery_blocked

    def set_delivery_blocked(self, blocked: bool) -> None:
        """The delivery's verdict after a pass over the ready layers: none could go. If
        incomplete layers hold arena regions, only finishing one frees space, so its credit
        may flow past the bound; if the arena is full of layers the engine has not released
        yet, its reading frees the space and nothing more is lent."""
        blocked = blocked and bool(self.regions)
        newly = blocked and not self.delivery_blocked
        self.delivery_blocked = blocked
        if newly:
            self.ctx.budget.reconsider()

    def resume_sender(self) -> None:
        """Tell a paused sender to go on (room again, or an engine claimed it)."""
        if not self.sender_paused or self.state is not TransferState.OPEN:
            return
        for conn in self.stripe_conns.values():
            if conn.is_open:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    conn.send(Hold(self.id, False))
                    self.sender_paused = False
                    return

    # ------------------------------------------------------- delivery API
    @property
    def claimable(self) -> bool:
        """Nobody claimed it, and it has not failed or been delivered."""
        return self.destination_of is None and not self.state.finished

    @property
    def being_delivered(self) -> bool:
        """A live delivery holds it (the reaper leaves it alone)."""
        return self.destination_of is not None and self.destination_of.active

    def attach(self, destination: Destination) -> None:
        """An engine claimed the transfer: chunks from now on may land in its arena."""
        self.destination_of = destination
        self.last_activity = time.monotonic()
        self.changed.set()
        self.resume_sender()  # its engine reads it now: never paused any more
        self.ctx.budget.reconsider()  # its first incomplete layer's credit flows now

    def ready_layers(self) -> list[int]:
        """Layers whose every chunk is in (or comes from the store), not yet delivered."""
        return list(self.ready)

    def take_region(self, layer: int) -> int | None:
        """The arena region chunks of ``layer`` were placed in, if any (now the caller's)."""
        return self.regions.pop(layer, None)

    def held_chunks(self, layer: int) -> list[tuple[int, bytearray]]:
        """(offset, bytes) of the chunks of ``layer`` that wait in daemon memory."""
        return sorted(self.held.get(layer, []), key=lambda item: item[0])

    @property
    def dedup(self) -> bool:
        return self.held_prefix is not None

    async def fill_from_store(self, layer: int, view: memoryview) -> None:
        """Dedup: put the stored prefix into the layer's buffer, and keep its new blocks
        for the next request with this prefix."""
        held = self.held_prefix
        if held is None:
            return
        await held.restore(layer, view)
        size, first, nbytes = self.opened.chunk_size, self.starts[layer], len(view)
        tail = held.tail_of(layer)
        for index in [*held.skip.get(layer, ()), *([] if tail is None else [tail])]:
            offset = (index - first) * size
            chunk = view[offset : min(offset + size, nbytes)]
            self.filled_checksums[index] = chunk_checksum(chunk)

    def progress(self) -> str:
        """Where it stands, for a stall report: layers in, engine, arena regions."""
        done = sum(n == 0 for n in self.pending)
        engine = "an engine claimed it" if self.destination_of is not None else "unclaimed"
        held = sum(len(buf) for chunks in self.held.values() for _, buf in chunks)
        return (
            f"{done}/{len(self.layers)} layers complete, {engine}, {len(self.regions)} "
            f"arena regions, {held / (1 << 20):.1f} MiB in daemon memory"
        )

    def delivery_digest(self) -> int:
        """The digest the engine gets: over every chunk's checksum as delivered."""
        return self.digest.value(self.filled_checksums)

    def layer_delivered(self, layer: int) -> None:
        """The engine has ``layer``: its daemon-memory chunks are freed."""
        self.ready.remove(layer)
        self.delivery_blocked = False
        self.last_activity = time.monotonic()
        self._release_layer(layer)
        if not self._delivered_any:
            self._delivered_any = True
            seconds = max(0.0, time.time() - self.record.started)
            self.ctx.metrics.first_layer_seconds.observe(seconds)

    async def wait_changed(self) -> None:
        await self.changed.wait()
        self.changed.clear()

    def wake(self) -> None:
        self.changed.set()

    def mark_delivered(self) -> None:
        if self.held_prefix is not None:
            self.held_prefix.release()
        self.record.finish(TransferState.COMPLETE)
        if log.isEnabledFor(logging.DEBUG):  # thousands a minute on a busy daemon
            record = self.record
            log.debug(
                "incoming transfer delivered: %d B (%d from the store) in %.3f s",
                record.total_bytes,
                record.skipped_bytes,
                (record.finished or time.time()) - record.started,
                extra=self.log_fields(),
            )
        self.ctx.on_finished(self, False)

    # -------------------------------------------------------------- endings
    def fail(self, code: ErrorCode, message: str, *, tell_sender: bool = True) -> None:
        if self.state.finished:
            return
        was_open = self.state is TransferState.OPEN
        # One line per (code, peer) per interval: a sender that goes away fails every
        # transfer it had going at once.
        peer = self.record.peer
        log.warning(
            "incoming transfer from %s failed: %s %s",
            peer,
            code.name,
            message,
            extra=self.log_fields(code=code.name, cause=f"{code.name} {peer}"),
        )
        if tell_sender and was_open:
            self._to_sender(Abort(self.id, int(code), message))
        for conn in self.stripe_conns.values():
            conn.conn.forget(self.id)  # chunks already in flight get dropped quietly
        self.error = (code, message)
        if self.held_prefix is not None:
            self.held_prefix.release()
        for layer in list(self.held):
            self._release_layer(layer)
        self.record.finish(TransferState.FAILED, f"{code.name}: {message}")
        self.changed.set()
        self.ctx.on_finished(self, was_open)

    def _release_layer(self, layer: int) -> None:
        chunks = self.held.pop(layer, [])
        self.ctx.budget.unhold(sum(len(buf) for _, buf in chunks))


def _resumable(conn: FramedProtocol) -> bool:
    return bool(conn.conn.negotiated.capabilities & CAP_RESUME)
