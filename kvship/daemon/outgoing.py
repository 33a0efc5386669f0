"""The sending side: one engine's transfer, striped over a peer link's connections.

Chunks come from the engine (in its shared-memory arena, or inline on the socket), are
queued on stripe ``chunk_index % N`` and sent
without a copy; each chunk's memory goes back to the engine (RELEASE or CREDIT) as soon
as the kernel has taken it. The peer answers COMPLETE once it holds every byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..aio import FramedProtocol, spawn
from ..layout.dedup import DedupError, Manifest, skipped_bytes, skipped_chunks
from ..protocol import (
    CAP_DEDUP,
    CODEC_RAW,
    HEADER_SIZE,
    Abort,
    ChunkMeta,
    Complete,
    End,
    ErrorCode,
    Have,
    LocalProtocolError,
    Open,
    digest_of_checksums,
)
from ..ratelimit import BULK, LATENCY, SchedulerClosed
from .codecpool import CodecPool
from .links import LinkPool
from .logs import transfer_fields
from .metrics import Metrics
from .peers import PeerLink
from .records import TransferRecord, TransferState

HAVE_TIMEOUT_S = 10.0  # a receiver that never answers the manifest: send everything
PRIORITY_LATENCY = 1  # OPEN.priority: 0 = bulk, 1 = latency (served first on a link)

log = logging.getLogger("kvship.out")

Release = Callable[[], None]


def _nothing() -> None:
    pass


CHUNK_OVERHEAD = HEADER_SIZE + ChunkMeta.FIXED.size  # bytes a CHUNK frame adds to its data


class _End(enum.Enum):
    """The marker that closes a stripe's queue (an enum, so the type checker can narrow)."""

    END = enum.auto()


_END: Final = _End.END
_Queued = tuple[ChunkMeta, memoryview, Release, float]
"""A chunk on a stripe's queue: meta, bytes, release, and when it was queued."""


@dataclass(frozen=True)
class SendContext:
    """What every outgoing transfer of a daemon shares."""

    links: LinkPool
    codecs: CodecPool
    metrics: Metrics
    on_finished: Callable[[OutgoingTransfer], None]  # the registry's


class OutgoingTransfer:
    def __init__(
        self, ctx: SendContext, engine: FramedProtocol, opened: Open, transfer_id: int
    ) -> None:
        self.ctx = ctx
        self.engine = engine
        self.engine_tid = opened.transfer_id
        self.opened = opened
        self.id = transfer_id
        self.n_stripes = ctx.links.settings.connections
        self.queues: list[asyncio.Queue[_Queued | _End]] = [
            asyncio.Queue() for _ in range(self.n_stripes)
        ]
        self.checksums = [0] * opened.n_chunks
        self.seen = bytearray(opened.n_chunks)
        self.queued_bytes = 0  # staged in the engine's arena, waiting for a stripe
        self.priority = LATENCY if opened.priority == PRIORITY_LATENCY else BULK
        self.chunks_in = 0
        self.per_stripe = [0] * self.n_stripes
        self.sent_on_stripe = [0] * self.n_stripes
        self.skip: set[int] = set()  # chunks the receiver already holds (dedup)
        self.have: asyncio.Future[Have] = asyncio.get_running_loop().create_future()
        self.link: PeerLink | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.done: asyncio.Future[TransferState] = asyncio.get_running_loop().create_future()
        self.record = TransferRecord(
            transfer_id,
            "out",
            opened.request_id,
            opened.peer,
            opened.total_bytes,
            opened.n_chunks,
            len(opened.layers),
        )

    # ----------------------------------------------------------- engine side
    def log_fields(self, **more: object) -> dict[str, object]:
        """``extra=`` of this transfer's log lines (ids as /v1/transfers shows them)."""
        return transfer_fields(
            self.id, self.opened.request_id, self.opened.peer, direction="out", **more
        )

    def start(self) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "transfer started: %d B in %d layers to %s",
                self.opened.total_bytes,
                len(self.opened.layers),
                self.opened.peer,
                extra=self.log_fields(),
            )
        self.tasks.append(spawn(self._run(), name=f"out-{self.id:x}"))

    def add_chunk(self, meta: ChunkMeta, data: memoryview, release: Release) -> None:
        """A chunk from the engine: queue it on its stripe (verified when sent)."""
        if self.done.done():
            release()
            return
        if self.seen[meta.chunk_index]:
            release()
            self.fail(ErrorCode.PROTOCOL_ERROR, f"chunk {meta.chunk_index} sent twice")
            return
        self.seen[meta.chunk_index] = 1
        self.checksums[meta.chunk_index] = meta.checksum
        self.chunks_in += 1
        stripe = meta.chunk_index % self.n_stripes
        self.per_stripe[stripe] += 1
        peer_meta = dataclasses.replace(meta, transfer_id=self.id)
        self.queued_bytes += len(data)
        self.queues[stripe].put_nowait((peer_meta, data, release, time.monotonic()))

    def end(self, engine_end: End) -> None:
        """The engine sent its last chunk."""
        if self.chunks_in != self.opened.n_chunks:
            self.fail(
                ErrorCode.PROTOCOL_ERROR,
                f"END after {self.chunks_in} of {self.opened.n_chunks} chunks",
            )
            return
        if engine_end.digest != self._digest():
            self.fail(ErrorCode.DIGEST_MISMATCH, "engine digest does not match its chunks")
            return
        for q in self.queues:
            q.put_nowait(_END)

    def _digest(self) -> int:
        return digest_of_checksums(self.checksums)

    def _peer_digest(self) -> int:
        """The digest the receiver checks: skipped (deduplicated) chunks count as 0."""
        if not self.skip:
            return self._digest()
        return digest_of_checksums(
            [0 if i in self.skip else c for i, c in enumerate(self.checksums)]
        )

    async def _negotiate_dedup(self, conns: list[FramedProtocol]) -> None:
        """Wait for the receiver's HAVE (one round trip; the engine keeps staging meanwhile)
        and work out which chunks it already holds."""
        manifest = self.opened.extra.get("dedup")
        if manifest is None or not conns[0].conn.negotiated.capabilities & CAP_DEDUP:
            return
        asked = time.monotonic()
        try:
            plan = Manifest.from_extra(manifest)
            have = await asyncio.wait_for(asyncio.shield(self.have), HAVE_TIMEOUT_S)
        except (DedupError, TimeoutError):
            return  # no dedup: everything travels
        self.ctx.metrics.have_rtt_seconds.observe(time.monotonic() - asked)
        if have.blocks > len(plan.keys):
            self.fail(
                ErrorCode.PROTOCOL_ERROR,
                f"HAVE says {have.blocks} blocks held, the manifest has {len(plan.keys)} keys",
            )
            return
        skip = skipped_chunks(
            plan.layout, self.opened.layers, self.opened.chunk_size, have.blocks, have.states
        )
        self.skip = {i for chunks in skip.values() for i in chunks}
        self.record.skipped_bytes = skipped_bytes(self.opened.layers, skip, self.opened.chunk_size)

    @property
    def queued_chunks(self) -> int:
        return sum(q.qsize() for q in self.queues)

    def on_have(self, frame: Have) -> None:
        if not self.have.done():
            self.have.set_result(frame)

    # -------------------------------------------------------------- peer side
    async def _run(self) -> None:
        try:
            self.link = await self.ctx.links.get(self.opened.peer)
        except Exception as exc:
            self.fail(ErrorCode.PEER_UNREACHABLE, f"cannot reach {self.opened.peer}: {exc}")
            return
        if self.done.done():
            return
        conns = self.link.conns
        peer_max = conns[0].conn.limits.max_chunk
        if self.opened.chunk_size > peer_max:
            self.fail(
                ErrorCode.FRAME_TOO_LARGE,
                f"chunk_size {self.opened.chunk_size} above {self.opened.peer}'s max_chunk "
                f"{peer_max}",
                tell_peer=False,
            )
            return
        self.link.transfers[self.id] = self
        try:
            for stripe, conn in enumerate(conns):
                conn.send(
                    dataclasses.replace(
                        self.opened,
                        transfer_id=self.id,
                        n_stripes=len(conns),
                        stripe=stripe,
                        peer="",
                    )
                )
        except LocalProtocolError as exc:  # e.g. the link already carries max_transfers
            self.fail(exc.code, f"cannot open on the link to {self.opened.peer}: {exc.message}")
            return
        await self._negotiate_dedup(conns)
        if self.done.done():
            return
        self.tasks.extend(
            spawn(self._stripe(i, conn), name=f"out-{self.id:x}-{i}")
            for i, conn in enumerate(conns)
        )

    async def _stripe(self, index: int, conn: FramedProtocol) -> None:
        queue, metrics, link = self.queues[index], self.ctx.metrics, self.link
        assert link is not None
        sent_bytes = metrics.bytes_sent.labels(self.opened.peer)
        wire_bytes = metrics.wire_bytes_sent.labels(self.opened.peer)
        queue_wait = metrics.queue_wait_seconds
        while True:
            item = await queue.get()
            if item is _END:
                conn.send(End(self.id, self.sent_on_stripe[index], self._peer_digest()))
                return
            meta, data, release, queued_at = item
            self.queued_bytes -= len(data)
            waited = time.monotonic() - queued_at
            link.figures.waited(waited)
            queue_wait.observe(waited)
            if meta.chunk_index in self.skip:  # the receiver holds it already
                release()
                continue
            # Not verified here: the receiving daemon checks every chunk, and a corrupt
            # one fails only its transfer there (SPEC §7.4), so a corrupt engine costs
            # its own transfer, never the link.
            raw_length, wire = len(data), data
            codec = link.codec_for(self.opened.layers[meta.layer].dtype)
            if codec != CODEC_RAW:
                used, coded = await self.ctx.codecs.encode(data, codec)
                if used != CODEC_RAW:
                    release()  # the coded copy is what travels: the engine gets its slot back
                    release = _nothing
                    meta, wire = dataclasses.replace(meta, codec=used), memoryview(coded)
            try:
                await link.scheduler.acquire(self.id, len(wire) + CHUNK_OVERHEAD, self.priority)
                await conn.send_chunk(meta, wire)
            except (ConnectionError, SchedulerClosed) as exc:
                release()
                self.fail(ErrorCode.PEER_UNREACHABLE, f"stripe {index} lost: {exc}")
                return
            release()
            self.sent_on_stripe[index] += 1
            link.note_sent(raw_length, len(wire) + CHUNK_OVERHEAD)
            self.record.bytes_done += raw_length
            self.record.chunks_done += 1
            sent_bytes.inc(raw_length)
            wire_bytes.inc(len(wire) + CHUNK_OVERHEAD)
            metrics.chunks_sent.inc()

    def on_complete(self, frame: Complete) -> None:
        if self.done.done():
            return
        if frame.digest != self._peer_digest() or frame.total_bytes != self.opened.total_bytes:
            self.fail(ErrorCode.DIGEST_MISMATCH, "peer acknowledged different bytes")
            return
        with contextlib.suppress(ConnectionError):  # the engine's digest covers every chunk
            self.engine.send(Complete(self.engine_tid, frame.total_bytes, self._digest()))
        self._finish(TransferState.COMPLETE)
        if log.isEnabledFor(logging.DEBUG):  # thousands a minute on a busy daemon
            record = self.record
            log.debug(
                "transfer complete: %d B (%d skipped) in %.3f s",
                frame.total_bytes,
                record.skipped_bytes,
                (record.finished or time.time()) - record.started,
                extra=self.log_fields(),
            )

    def on_peer_abort(self, frame: Abort) -> None:
        code = ErrorCode(frame.code) if frame.code in set(ErrorCode) else ErrorCode.INTERNAL_ERROR
        self.fail(code, f"peer aborted: {frame.message}", tell_peer=False)

    # ------------------------------------------------------------- endings
    def fail(
        self, code: ErrorCode, message: str, *, tell_peer: bool = True, tell_engine: bool = True
    ) -> None:
        if self.done.done():
            return
        # One line per (code, peer) per interval: a peer that goes away fails every
        # transfer on its link at once, and the next ones until it is back.
        log.warning(
            "transfer to %s failed: %s %s",
            self.opened.peer,
            code.name,
            message,
            extra=self.log_fields(code=code.name, cause=f"{code.name} {self.opened.peer}"),
        )
        if tell_engine:
            with contextlib.suppress(ConnectionError):
                self.engine.send(Abort(self.engine_tid, int(code), message))
        if tell_peer and self.link is not None and self.link.transfers.get(self.id) is self:
            # Every stripe: each connection's receiver tracks the transfer on its own.
            for conn in self.link.conns:
                if conn.is_open:
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        conn.send(Abort(self.id, int(code), message))
        self._finish(TransferState.FAILED, f"{code.name}: {message}")

    def _finish(self, state: TransferState, error: str = "") -> None:
        self.record.finish(state, error)
        self.done.set_result(state)
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        for q in self.queues:  # hand back whatever is still queued
            while not q.empty():
                item = q.get_nowait()
                if item is not _END:
                    item[2]()
        if self.link is not None:
            self.link.transfers.pop(self.id, None)
            # The peer answers on one stripe only (SPEC §7.4): every other stripe's core
            # must stop counting this transfer too, or aborts would use up max_transfers.
            for conn in self.link.conns:
                conn.conn.forget(self.id)
        self.ctx.on_finished(self)
