"""The receiving side: a transfer arriving from a peer, reassembled and handed to an engine.

Every stripe's chunks land, by index, either straight in the subscribed engine's arena
(the layer's region is reserved when its first chunk arrives) or, when no engine is
attached yet or its arena is full, in daemon memory bounded by ``staging_bytes``: past
that bound the daemon stops granting credit, so the sender waits instead of the daemon
growing. A layer is handed to the engine only when all its chunks are in and verified,
and the transfer is acknowledged (COMPLETE) only when the whole-transfer digest matches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from ..aio import FramedProtocol, spawn
from ..layout.dedup import DedupError, skipped_bytes
from ..protocol import (
    CODEC_RAW,
    Abort,
    Chunk,
    ChunkMeta,
    Complete,
    End,
    ErrorCode,
    Have,
    Open,
    ProtocolError,
    TransferDigest,
    chunk_checksum,
    chunk_table,
)
from ..store import StoreError
from .dedup import HeldPrefix
from .records import TransferRecord

if TYPE_CHECKING:
    from .engine_api import Subscription
    from .server import Daemon

log = logging.getLogger("kvship.in")


class IncomingTransfer:
    def __init__(self, daemon: Daemon, opened: Open, peer: str) -> None:
        self.daemon = daemon
        self.opened = opened
        self.id = opened.transfer_id
        self.request_id = opened.request_id
        self.layers = opened.layers
        self.starts = chunk_table(opened.layers, opened.chunk_size)
        self.n_stripes = opened.n_stripes
        self.stripe_conns: dict[int, FramedProtocol] = {}
        self.ends: dict[int, End] = {}
        self.digest = TransferDigest(opened.n_chunks)
        self.pending = [self.starts[i + 1] - self.starts[i] for i in range(len(self.layers))]
        # The arena region reserved for each layer in the subscribed engine's arena. Chunks
        # that arrive before a region could be reserved wait in daemon memory (``held``) and
        # are copied into the region before the layer is handed over.
        self.regions: dict[int, int] = {}
        self.held: dict[int, list[tuple[int, bytearray]]] = {}  # layer -> chunks in memory
        self.decoding = 0  # coded chunks being decoded in the codec pool
        self.held_prefix: HeldPrefix | None = None  # what dedup supplies from the store
        self.ready: deque[int] = deque(i for i, n in enumerate(self.pending) if n == 0)
        self.subscriber: Subscription | None = None
        self.state = "receiving"  # receiving | received | delivered | failed
        self.error: tuple[ErrorCode, str] | None = None
        self.changed = asyncio.Event()  # wakes the subscriber's delivery task
        self.last_activity = time.monotonic()
        self.record = TransferRecord(
            self.id,
            "in",
            self.request_id,
            peer,
            opened.total_bytes,
            opened.n_chunks,
            len(opened.layers),
        )

    # ------------------------------------------------------------ peer side
    def add_stripe(self, conn: FramedProtocol, opened: Open) -> None:
        same = (
            opened.request_id == self.request_id
            and opened.layers == self.layers
            and opened.chunk_size == self.opened.chunk_size
            and opened.n_stripes == self.n_stripes
        )
        if not same:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "stripes of one transfer disagree")
        if opened.stripe in self.stripe_conns:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"stripe {opened.stripe} opened twice")
        self.stripe_conns[opened.stripe] = conn

    def negotiate_dedup(self, conn: FramedProtocol) -> None:
        """Answer the sender's manifest with HAVE; the chunks it covers count as arrived
        (checksum slot 0, as the sender counts them) and are filled in at delivery."""
        try:
            self.held_prefix = HeldPrefix.negotiate(
                self.daemon.store_for,
                self.opened.extra["dedup"],
                self.layers,
                self.opened.token_ids,
                self.opened.chunk_size,
            )
        except (DedupError, StoreError) as exc:
            self.fail(ErrorCode.LAYOUT_MISMATCH, f"dedup manifest refused: {exc}")
            return
        held = self.held_prefix
        for layer, chunks in held.skip.items():
            for index in chunks:
                self.digest.add(index, 0)
            self.pending[layer] -= len(chunks)
            if self.pending[layer] == 0:
                self.ready.append(layer)
        self.record.skipped_bytes = skipped_bytes(self.layers, held.skip, held.chunk_size)
        conn.send(Have(self.id, held.blocks, held.states))
        self.changed.set()

    def destination(self, meta: ChunkMeta) -> tuple[memoryview, bool]:
        """Where a chunk's raw bytes go: (buffer, in_arena). The layer's region of the
        engine's arena when there is room, else daemon memory."""
        sub = self.subscriber
        if self.state == "receiving" and sub is not None:
            layer = meta.layer
            offset = self.regions.get(layer)
            if offset is None:
                offset = sub.reserve(self.layers[layer].nbytes)
                if offset is not None:
                    self.regions[layer] = offset
            if offset is not None:
                return sub.view(offset + meta.offset, meta.raw_length), True
        return memoryview(bytearray(meta.raw_length)), False

    def sink(self, meta: ChunkMeta, wire_length: int) -> tuple[memoryview, bool]:
        """Where a chunk's wire bytes land: raw ones at their destination, coded ones in a
        scratch buffer they are decoded from."""
        if meta.codec != CODEC_RAW:
            return memoryview(bytearray(wire_length)), False
        return self.destination(meta)

    def on_chunk(self, conn: FramedProtocol, chunk: Chunk, in_arena: bool) -> None:
        meta, data = chunk.meta, chunk.data
        if self.state != "receiving":  # a failed transfer: bytes are read and dropped
            conn.grant(len(data))
            return
        if meta.codec != CODEC_RAW:
            self.decoding += 1
            spawn(self._decode(conn, meta, data), f"decode-{self.id:x}-{meta.chunk_index}")
            return
        if chunk_checksum(data) != meta.checksum:
            # The connection's bytes can no longer be trusted: close it (the caller does)
            # and make sure no half of this transfer is ever delivered.
            self.fail(ErrorCode.CHECKSUM_MISMATCH, f"chunk {meta.chunk_index} checksum mismatch")
            raise ProtocolError(
                ErrorCode.CHECKSUM_MISMATCH,
                f"transfer {self.id:x} chunk {meta.chunk_index}: checksum mismatch",
            )
        self._accept(conn, meta, data, in_arena, len(data))

    async def _decode(self, conn: FramedProtocol, meta: ChunkMeta, wire: memoryview) -> None:
        """Decode a coded chunk in a worker, verifying its checksum, then accept it."""
        try:
            out, in_arena = self.destination(meta)
            try:
                await self.daemon.codecs.decode(
                    meta.codec, wire, meta.raw_length, meta.checksum, out
                )
            except ProtocolError as exc:
                self.fail(exc.code, f"chunk {meta.chunk_index}: {exc.message}")
                conn.fail(exc)  # like a raw checksum mismatch: this connection lied
                return
        finally:
            self.decoding -= 1
        if self.state != "receiving":
            conn.grant(len(wire))
            return
        self._accept(conn, meta, out, in_arena, len(wire))
        self._maybe_received()

    def _accept(
        self, conn: FramedProtocol, meta: ChunkMeta, data: memoryview, in_arena: bool, wire: int
    ) -> None:
        """A verified chunk is in place: account for it and credit its wire bytes back."""
        n = len(data)
        self.last_activity = time.monotonic()
        self.digest.add(meta.chunk_index, meta.checksum)
        if in_arena:
            conn.grant(wire)
        else:
            self.held.setdefault(meta.layer, []).append((meta.offset, data.obj))  # type: ignore[arg-type]
            self.daemon.hold(conn, n, wire)
            self.daemon.metrics.chunks_staged.inc()
        self.record.bytes_done += n
        self.record.chunks_done += 1
        self.daemon.metrics.bytes_received.inc(n)
        self.daemon.metrics.chunks_received.inc()
        self.pending[meta.layer] -= 1
        if self.pending[meta.layer] == 0:
            self.ready.append(meta.layer)
            self.changed.set()

    def on_end(self, conn: FramedProtocol, end: End) -> None:
        stripe = next((s for s, c in self.stripe_conns.items() if c is conn), None)
        if stripe is None or stripe in self.ends:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "END on a connection with no stripe")
        self.ends[stripe] = end
        self._maybe_received()

    def _maybe_received(self) -> None:
        """Every stripe ended and every chunk is decoded: check the digest, acknowledge."""
        if len(self.ends) < self.n_stripes or self.state != "receiving" or self.decoding:
            return
        if not self.digest.complete:
            self.fail(ErrorCode.PROTOCOL_ERROR, "every stripe ended but chunks are missing")
            return
        digest = self.digest.value()
        if any(e.digest != digest for e in self.ends.values()):
            self.fail(ErrorCode.DIGEST_MISMATCH, "whole-transfer digest does not match")
            return
        self.state = "received"
        self.record.state = "received"
        self._to_sender(Complete(self.id, self.opened.total_bytes, digest))
        self.changed.set()
        self.daemon.transfer_received(self)

    def _to_sender(self, frame: Complete | Abort) -> None:
        conns = [self.stripe_conns.get(0), *self.stripe_conns.values()]
        for conn in conns:
            if conn is not None and conn.is_open:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    conn.send(frame)
                    return

    def on_stripe_lost(self, conn: FramedProtocol, error: BaseException | None) -> None:
        if self.state == "receiving" and conn in self.stripe_conns.values():
            self.fail(
                ErrorCode.PEER_UNREACHABLE,
                f"a stripe's connection closed: {error}",
                tell_sender=False,
            )

    # -------------------------------------------------------------- endings
    def fail(self, code: ErrorCode, message: str, *, tell_sender: bool = True) -> None:
        if self.state in ("failed", "delivered"):
            return
        log.warning(
            "incoming transfer %x (%s) failed: %s %s", self.id, self.request_id, code.name, message
        )
        if tell_sender and self.state == "receiving":
            self._to_sender(Abort(self.id, int(code), message))
        for conn in self.stripe_conns.values():
            conn.conn.forget(self.id)  # chunks already in flight get dropped quietly
        self.state = "failed"
        self.error = (code, message)
        if self.held_prefix is not None:
            self.held_prefix.release()
        self.free_held()
        self.record.finish("failed", f"{code.name}: {message}")
        self.changed.set()
        self.daemon.transfer_finished(self.record, self)

    def delivered(self) -> None:
        if self.held_prefix is not None:
            self.held_prefix.release()
        self.state = "delivered"
        self.record.finish("complete")
        self.daemon.transfer_finished(self.record, self)

    def free_held(self) -> None:
        for layer in list(self.held):
            self.release_layer(layer)

    def release_layer(self, layer: int) -> None:
        chunks = self.held.pop(layer, [])
        self.daemon.unhold(sum(len(buf) for _, buf in chunks))
