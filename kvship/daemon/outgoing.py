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
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..aio import FramedProtocol, spawn
from ..layout.dedup import DedupError, Manifest, skipped_bytes, skipped_chunks, tail_cuts
from ..protocol import (
    CAP_DEDUP,
    CAP_DEDUP_TAIL,
    CAP_RESUME,
    CAP_SKIP,
    CODEC_RAW,
    HEADER_SIZE,
    Abort,
    Ack,
    ChunkMeta,
    Complete,
    End,
    ErrorCode,
    Have,
    Hold,
    LocalProtocolError,
    Open,
    Resume,
    Skip,
    chunk_checksum,
    digest_of_checksums,
)
from ..ratelimit import BULK, LATENCY, SchedulerClosed
from .codecpool import CodecPool
from .links import LinkPool
from .logs import transfer_fields
from .metrics import Metrics
from .peers import PeerLink, kernel_rtt_s
from .records import TransferRecord, TransferState

HAVE_TIMEOUT_S = 10.0  # a receiver that never answers the manifest: send everything
RESUME_BACKOFF_MIN_S, RESUME_BACKOFF_MAX_S = 0.1, 5.0  # reconnect waits (jittered x0.5..1.5)
CORRUPT_AT_SOURCE = "its bytes do not match its checksum as the engine staged them"
PRIORITY_LATENCY = 1  # OPEN.priority: 0 = bulk, 1 = latency (served first on a link)

log = logging.getLogger("kvship.out")

Release = Callable[[], None]


def _nothing() -> None:
    pass


def _consume(future: asyncio.Future[Resume]) -> None:
    if not future.cancelled():
        future.exception()


CHUNK_OVERHEAD = HEADER_SIZE + ChunkMeta.FIXED.size  # bytes a CHUNK frame adds to its data


class _End(enum.Enum):
    """The marker that closes a stripe's queue (an enum, so the type checker can narrow)."""

    END = enum.auto()


_END: Final = _End.END
_Queued = tuple[ChunkMeta, memoryview, Release, float]
"""A chunk on a stripe's queue: meta, bytes, release, and when it was queued."""


class EngineHold:
    """The engine memory (its shared arena, or its connection's window) that this daemon's
    sends keep while they wait for the receiver's ACK: resume may need the bytes again.

    At a long RTT that wait caps a link at (engine memory / RTT): a 32 MiB arena carries
    3.4 Gbit/s at 80 ms, whatever the windows say. So past half of it a sent chunk is
    copied into daemon memory and the engine gets its space back at once. Below
    ``copy_min_rtt_s`` of kernel RTT (config ``unacked_copy_min_rtt_s``) the ACK is back
    about as soon as a copy would be made (a 4 MiB copy takes ~1 ms), so there the chunk
    keeps its arena space instead: on loopback the copies cost half the sending daemon's
    CPU for no gain. Shared by an engine's sends."""

    def __init__(self, engine_bytes: int, copy_min_rtt_s: float) -> None:
        self.limit = engine_bytes // 2
        self.copy_min_rtt_s = copy_min_rtt_s
        self.held = 0
        # Chunks in the engine's shared arena are its memory: past the limit they are
        # copied. Inline chunks are this daemon's bytes already, holding only the engine's
        # credit: past the limit the credit goes back and the bytes stay, uncopied.
        self.shared = False

    def resize(self, engine_bytes: int, *, shared: bool = False) -> None:
        """The engine's memory became known (its handshake, then its arena)."""
        self.limit = engine_bytes // 2
        self.shared = shared

    def take(self, nbytes: int, rtt_s: Callable[[], float | None]) -> bool:
        """Hold ``nbytes`` of the engine's memory until the ACK; False: hold none of it
        (copy an arena chunk, give an inline chunk's credit back). ``rtt_s`` (a system
        call) is asked only past the limit, and only for arena chunks."""
        if self.held + nbytes > self.limit:
            if not self.shared:
                return False
            rtt = rtt_s()
            if rtt is None or rtt >= self.copy_min_rtt_s:
                return False
        self.held += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.held -= nbytes


@dataclass(frozen=True)
class SendContext:
    """What every outgoing transfer of a daemon shares."""

    links: LinkPool
    codecs: CodecPool
    metrics: Metrics
    on_finished: Callable[[OutgoingTransfer], None]  # the registry's


class OutgoingTransfer:
    def __init__(
        self,
        ctx: SendContext,
        engine: FramedProtocol,
        opened: Open,
        transfer_id: int,
        hold: EngineHold,
    ) -> None:
        self.ctx = ctx
        self.engine = engine
        self.hold = hold
        self.engine_tid = opened.transfer_id
        self.opened = opened
        self.id = transfer_id
        self.n_stripes = ctx.links.connections_to(opened.peer)  # as its link has now
        self.queues: list[asyncio.Queue[_Queued | _End]] = [
            asyncio.Queue() for _ in range(self.n_stripes)
        ]
        self.checksums = [0] * opened.n_chunks
        self.seen = bytearray(opened.n_chunks)
        self.queued_bytes = 0  # staged in the engine's arena, waiting for a stripe
        self.priority = LATENCY if opened.priority == PRIORITY_LATENCY else BULK
        self.chunks_in = 0
        self.sent_on_stripe = [0] * self.n_stripes
        self.skip: set[int] = set()  # chunks the receiver already holds (dedup)
        self.omittable = False  # the engine was told it may leave ``skip`` out (SKIP)
        # CAP_DEDUP_TAIL: chunk -> bytes at its start the receiver holds; only the rest
        # travels, under its own checksum (which END's digest needs: tails_ready).
        self.tails: dict[int, int] = {}
        self.tail_checksums: dict[int, int] = {}
        self.tails_ready = asyncio.Event()
        self.tails_ready.set()
        self.have: asyncio.Future[tuple[Have, int]] = asyncio.get_running_loop().create_future()
        self.link: PeerLink | None = None
        self.tasks: list[asyncio.Task[None]] = []
        # Resume (SPEC §7.7, when the link has CAP_RESUME): a sent chunk's memory is held
        # until the receiver ACKs it, so chunks lost with a connection can go again.
        self.resumable = False
        self.unacked: dict[int, _Queued] = {}
        self.inflight: dict[int, _Queued] = {}  # per stripe: the chunk being sent
        self.acked_early: set[int] = set()  # ACKed while still being sent
        self.ended = False  # the engine's END arrived (and checked out)
        self.resuming: asyncio.Future[Resume] | None = None  # the receiver's RESUME
        self.resumes = 0
        self.acked_any = False  # an ACK came: the receiver holds part of it
        # HOLD (SPEC §7.8, CAP_HOLD): the receiver's staging is full of this transfer and
        # nobody there claimed it yet; its stripes wait, the link's other transfers go on.
        self.go = asyncio.Event()
        self.go.set()
        self.restart = False  # the receiver did not know it: re-open it as new
        self.unknown_aborts = 0  # ABORT(UNKNOWN_TRANSFER) answers to resuming OPENs
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
        peer_meta = dataclasses.replace(meta, transfer_id=self.id)
        self.queued_bytes += len(data)
        self.queues[stripe].put_nowait((peer_meta, data, release, time.monotonic()))

    def end(self, engine_end: End) -> None:
        """The engine sent its last chunk (and left out only chunks SKIP named: their
        checksums count as 0 in its digest, as here)."""
        omitted = self.opened.n_chunks - self.chunks_in
        if omitted and not (
            self.omittable
            and all(self.seen[i] for i in range(len(self.seen)) if i not in self.skip)
        ):
            self.fail(
                ErrorCode.PROTOCOL_ERROR,
                f"END after {self.chunks_in} of {self.opened.n_chunks} chunks",
            )
            return
        if engine_end.digest != self._digest():
            self.fail(ErrorCode.DIGEST_MISMATCH, "engine digest does not match its chunks")
            return
        self.ended = True
        for q in self.queues:
            q.put_nowait(_END)

    def _digest(self) -> int:
        return digest_of_checksums(self.checksums)

    def _peer_digest(self) -> int:
        """The digest the receiver checks: skipped (deduplicated) chunks count as 0."""
        if not self.skip and not self.tails:
            return self._digest()
        tails = self.tail_checksums
        return digest_of_checksums(
            [0 if i in self.skip else tails.get(i, c) for i, c in enumerate(self.checksums)]
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
            have, caps = await asyncio.wait_for(asyncio.shield(self.have), HAVE_TIMEOUT_S)
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
        self._tell_engine_to_omit()
        if caps & CAP_DEDUP_TAIL:
            self.tails = tail_cuts(
                plan.layout, self.opened.layers, self.opened.chunk_size, have.blocks
            )
            if self.tails:
                self.tails_ready.clear()
        self.record.skipped_bytes = skipped_bytes(
            self.opened.layers, skip, self.opened.chunk_size, self.tails
        )

    def _tell_engine_to_omit(self) -> None:
        """SKIP to an engine that can take it: the chunks it has yet to stage that the
        receiver holds, so it neither copies nor hashes them (SPEC §9.1.1)."""
        if not self.engine.conn.negotiated.capabilities & CAP_SKIP or self.ended:
            return
        unstaged = tuple(sorted(i for i in self.skip if not self.seen[i]))
        if unstaged and self.engine.is_open:
            self.omittable = True
            self.engine.send(Skip(self.engine_tid, unstaged))

    def _tail(
        self, meta: ChunkMeta, data: memoryview, cut: int
    ) -> tuple[ChunkMeta, memoryview] | None:
        """The part of a straddling chunk the receiver lacks, under its own checksum. The
        whole chunk is checked against the engine's checksum first: the receiver can only
        check the new one, so corrupt engine bytes must be caught here (None: failed)."""
        if chunk_checksum(data) != meta.checksum:
            self.fail(
                ErrorCode.CHECKSUM_MISMATCH,
                f"chunk {meta.chunk_index} does not match the engine's checksum",
            )
            return None
        tail = data[cut:]
        checksum = chunk_checksum(tail)
        self.tail_checksums[meta.chunk_index] = checksum
        if len(self.tail_checksums) == len(self.tails):
            self.tails_ready.set()
        meta = dataclasses.replace(
            meta, offset=meta.offset + cut, raw_length=len(tail), checksum=checksum
        )
        return meta, tail

    @property
    def queued_chunks(self) -> int:
        return sum(q.qsize() for q in self.queues)

    def on_have(self, frame: Have, conn: FramedProtocol) -> None:
        if not self.have.done():  # HAVE's connection says whether tails are in use
            self.have.set_result((frame, conn.conn.negotiated.capabilities))

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
        if len(conns) != self.n_stripes:  # a link that opened more than it started with
            self._restripe(Resume.of(self.id, self.opened.n_chunks, set()), len(conns))
        self.link.transfers[self.id] = self
        self.resumable = bool(conns[0].conn.negotiated.capabilities & CAP_RESUME)
        try:
            if self.link.dead:
                raise ConnectionError(f"the link to {self.opened.peer} was lost")
            self._open(conns, resume=False)
        except LocalProtocolError as exc:  # e.g. the link already carries max_transfers
            self.fail(exc.code, f"cannot open on the link to {self.opened.peer}: {exc.message}")
            return
        except ConnectionError as exc:  # lost between connecting and opening
            if self.link.transfers.pop(self.id, None) is not None and not self.on_link_lost(
                str(exc)
            ):
                self.fail(ErrorCode.PEER_UNREACHABLE, str(exc), tell_peer=False)
            return
        await self._negotiate_dedup(conns)
        if self.done.done():
            return
        self._start_stripes(conns)

    def _open(self, conns: list[FramedProtocol], *, resume: bool) -> None:
        for stripe, conn in enumerate(conns):
            conn.send(
                dataclasses.replace(
                    self.opened,
                    transfer_id=self.id,
                    n_stripes=len(conns),
                    stripe=stripe,
                    peer="",
                    resume=resume,
                )
            )

    def _start_stripes(self, conns: list[FramedProtocol]) -> None:
        self.tasks.extend(
            spawn(self._stripe(i, conn), name=f"out-{self.id:x}-{i}")
            for i, conn in enumerate(conns)
        )

    async def _stripe(self, index: int, conn: FramedProtocol) -> None:
        queue = self.queues[index]
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    if not self.tails_ready.is_set():  # END's digest has every tail's
                        await self.tails_ready.wait()
                    try:
                        conn.send(End(self.id, self.sent_on_stripe[index], self._peer_digest()))
                    except ConnectionError as exc:  # a resume ENDs it again on the new link
                        if not self.resumable:
                            self.fail(ErrorCode.PEER_UNREACHABLE, f"stripe {index} lost: {exc}")
                    return
                self.queued_bytes -= len(item[1])
                self.inflight[index] = item
                if not await self._send_one(index, conn, item):
                    return  # the link failed under it: a resume sends it again
                del self.inflight[index]
        except asyncio.CancelledError:
            held = self.inflight.pop(index, None)
            if held is not None:
                if self.resumable and not self.done.done():
                    self.unacked[held[0].chunk_index] = held
                else:
                    held[2]()
            raise

    async def _send_one(self, index: int, conn: FramedProtocol, item: _Queued) -> bool:
        """Send one chunk (or skip it); False if the link failed under it, which then
        waits in ``unacked`` for a resume (or the transfer failed)."""
        metrics, link = self.ctx.metrics, self.link
        assert link is not None
        meta, data, release, queued_at = item
        waited = time.monotonic() - queued_at
        link.figures.waited(waited)
        metrics.queue_wait_seconds.observe(waited)
        if meta.chunk_index in self.skip:  # the receiver holds it already
            release()
            return True
        # A chunk queued again after a resume may already be as it travels (coded, or cut
        # to its tail): it goes as it is, never coded or cut twice.
        prepared = meta.codec != CODEC_RAW or meta.offset % self.opened.chunk_size != 0
        cut = None if prepared else self.tails.get(meta.chunk_index)
        if cut is not None:
            tail = self._tail(meta, data, cut)
            if tail is None:
                release()
                return False
            meta, data = tail
        if not self.go.is_set():
            await self.go.wait()
        # Not verified here: the receiving daemon checks every chunk, and a corrupt
        # one fails only its transfer there (SPEC §7.4), so a corrupt engine costs
        # its own transfer, never the link.
        raw_length, wire = meta.raw_length, data
        codec = link.codec_for(self.opened.layers[meta.layer].dtype)
        if codec != CODEC_RAW and not prepared:
            used, coded = await self.ctx.codecs.encode(data, codec)
            if used != CODEC_RAW:
                release()  # the coded copy is what travels: the engine gets its slot back
                release = _nothing
                meta, wire = dataclasses.replace(meta, codec=used), coded
        sent = (meta, wire, release, queued_at)
        self.inflight[index] = sent  # what a resume must send again from now on
        try:
            await link.scheduler.acquire(self.id, len(wire) + CHUNK_OVERHEAD, self.priority)
            await conn.send_chunk(meta, wire)
        except (ConnectionError, SchedulerClosed) as exc:
            del self.inflight[index]
            if self.resumable:
                self.unacked[meta.chunk_index] = sent
            else:
                release()
                self.fail(ErrorCode.PEER_UNREACHABLE, f"stripe {index} lost: {exc}")
            return False
        if self.resumable and meta.chunk_index not in self.acked_early:
            self.unacked[meta.chunk_index] = self._held(sent, conn)  # freed by its ACK
        else:
            self.acked_early.discard(meta.chunk_index)
            release()
        self.sent_on_stripe[index] += 1
        link.note_sent(raw_length, len(wire) + CHUNK_OVERHEAD)
        self.record.bytes_done += raw_length
        self.record.chunks_done += 1
        metrics.bytes_sent.labels(self.opened.peer).inc(raw_length)
        metrics.wire_bytes_sent.labels(self.opened.peer).inc(len(wire) + CHUNK_OVERHEAD)
        metrics.chunks_sent.inc()
        return True

    def _held(self, sent: _Queued, conn: FramedProtocol) -> _Queued:
        """How a sent chunk waits for its ACK: holding the engine's memory (or credit) while
        the engine has room to stage the next ones (see EngineHold), else on this daemon's
        own: a copy of an arena chunk, the very bytes of an inline one."""
        meta, wire, release, queued_at = sent
        if release is _nothing:  # coded: the daemon's bytes already
            return sent
        nbytes = len(wire)
        if self.hold.take(nbytes, lambda: kernel_rtt_s(conn)):
            hold = self.hold

            def give_back() -> None:
                hold.give(nbytes)
                release()

            return meta, wire, give_back, queued_at
        if self.hold.shared:  # the engine's memory: copy it before giving it back
            wire = memoryview(bytearray(wire))
            self.ctx.metrics.unacked_copied_bytes.inc(nbytes)
        release()  # inline: the bytes are this daemon's already; the engine's credit goes
        return meta, wire, _nothing, queued_at

    # --------------------------------------------------------------- resume
    def on_ack(self, frame: Ack) -> None:
        self.acked_any = True
        for index in frame.chunks:
            item = self.unacked.pop(index, None)
            if item is not None:
                item[2]()
            elif any(sending[0].chunk_index == index for sending in self.inflight.values()):
                # The ACK overtook send_chunk's wait for the write buffer to drain (TLS
                # buffers more): free it as soon as that returns, not never.
                self.acked_early.add(index)

    def on_hold(self, frame: Hold) -> None:
        if frame.hold:
            self.go.clear()
            self.ctx.metrics.transfers_held.inc()
        else:
            self.go.set()

    def on_resume(self, frame: Resume) -> None:
        if self.resuming is not None and not self.resuming.done():
            self.resuming.set_result(frame)

    def on_link_lost(self, reason: str) -> bool:
        """Every connection of the link is gone: resume on a new link (SPEC §7.7)."""
        if not self.resumable or self.done.done():
            return False
        if self.resuming is not None:  # lost again while resuming: try the next link now
            if not self.resuming.done():
                self.resuming.set_exception(ConnectionError(reason))
            return True
        current = asyncio.current_task()
        stripes = [task for task in self.tasks if task is not current]
        for task in stripes:
            task.cancel()
        self.link = None
        self._await_resume()
        self.tasks = [spawn(self._resume(stripes, reason), name=f"resume-{self.id:x}")]
        return True

    def _await_resume(self) -> None:
        """A fresh future for the receiver's RESUME (a loss while waiting fails it)."""
        self.resuming = asyncio.get_running_loop().create_future()
        self.resuming.add_done_callback(_consume)

    async def _resume(self, stripes: list[asyncio.Task[None]], reason: str) -> None:
        """Reconnect with capped exponential backoff and jitter, re-open the transfer with
        the resume flag, learn what the receiver holds, send the rest."""
        await asyncio.gather(*stripes, return_exceptions=True)  # their chunks are back
        settings = self.ctx.links.settings
        deadline = time.monotonic() + settings.resume_timeout_s
        delay = RESUME_BACKOFF_MIN_S
        log.info(
            "transfer to %s lost its link (%s): resuming",
            self.opened.peer,
            reason,
            extra=self.log_fields(cause=f"resuming {self.opened.peer}"),
        )
        while not self.done.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.fail(
                    ErrorCode.PEER_UNREACHABLE,
                    f"link lost, not resumed within {settings.resume_timeout_s:g} s: {reason}",
                )
                return
            link = None
            try:
                link = await asyncio.wait_for(self.ctx.links.get(self.opened.peer), remaining)
                if not link.conns[0].conn.negotiated.capabilities & CAP_RESUME:
                    self.fail(ErrorCode.PEER_UNREACHABLE, f"{self.opened.peer} cannot resume")
                    return
                assert self.resuming is not None
                if self.resuming.done():  # a loss reported while connecting: a fresh wait
                    self._await_resume()
                self.link = link
                link.transfers[self.id] = self
                self.unknown_aborts = 0
                self._open(link.conns, resume=True)
                wait = min(remaining, settings.connect_timeout_s)
                answer = await asyncio.wait_for(asyncio.shield(self.resuming), wait)
                if self.restart:  # the receiver never saw it: a fresh OPEN, as new
                    self._open(link.conns, resume=False)
                    self.restart = False
            except LocalProtocolError as exc:
                self.fail(exc.code, f"cannot resume on {self.opened.peer}: {exc.message}")
                return
            except Exception as exc:  # connect refused, link lost again, no answer: retry
                reason = f"{type(exc).__name__}: {exc}"
                if link is not None:
                    link.transfers.pop(self.id, None)
                self.link = None
                self._await_resume()
                pause = min(delay * random.uniform(0.5, 1.5), max(0.0, remaining))
                await asyncio.sleep(pause)
                delay = min(2 * delay, RESUME_BACKOFF_MAX_S)
                continue
            if answer.n_chunks != self.opened.n_chunks:
                self.fail(ErrorCode.PROTOCOL_ERROR, "RESUME for another number of chunks")
                return
            self.resuming = None
            bad = self._corrupt_unacked(answer)
            if bad is not None:  # the receiver saw it corrupt: the engine's bytes are
                self.fail(ErrorCode.CHECKSUM_MISMATCH, f"chunk {bad}: {CORRUPT_AT_SOURCE}")
                return
            self._restripe(answer, len(link.conns))
            self.resumes += 1
            self._start_stripes(link.conns)
            log.info(
                "transfer to %s resumed (%d times): %d chunks to send again",
                self.opened.peer,
                self.resumes,
                self.queued_chunks,
                extra=self.log_fields(),
            )
            return

    def _corrupt_unacked(self, held: Resume) -> int | None:
        """A chunk to send again whose bytes do not match their checksum (a corrupt
        engine's; the sending daemon forwards unchecked, SPEC §7.4): resending cannot
        help. Only those the receiver lacks, and only raw ones: a coded copy would need
        decoding, and for it the receiver's second look decides (the same chunk corrupt
        twice fails it)."""
        for index, (meta, data, _, _) in self.unacked.items():
            if held.holds(index) or meta.codec != CODEC_RAW:
                continue
            if chunk_checksum(data) != meta.checksum:
                return index
        return None

    def _restripe(self, held: Resume, n_stripes: int) -> None:
        """Queue again, over the new link's stripes, every chunk the receiver lacks: the
        unacknowledged ones first sent on the lost link, and those never sent."""
        pending: list[_Queued] = []
        for queue in self.queues:
            while not queue.empty():
                item = queue.get_nowait()
                if item is not _END:
                    self.queued_bytes -= len(item[1])
                    pending.append(item)
        unacked, self.unacked = self.unacked, {}
        resent = 0
        for index, item in unacked.items():
            if held.holds(index):
                item[2]()
            else:
                pending.append(item)
                resent += 1
        self.ctx.metrics.chunks_resent.inc(resent)
        self.go.set()  # a HOLD ended with its link: the receiver says so again if it must
        self.n_stripes = n_stripes
        self.queues = [asyncio.Queue() for _ in range(n_stripes)]
        self.sent_on_stripe = [0] * n_stripes
        for item in sorted(pending, key=lambda it: it[0].chunk_index):
            meta = item[0]
            if held.holds(meta.chunk_index):
                item[2]()
                continue
            self.queued_bytes += len(item[1])
            self.queues[meta.chunk_index % n_stripes].put_nowait(item)
        if self.ended:
            for queue in self.queues:
                queue.put_nowait(_END)

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
        if (
            code is ErrorCode.UNKNOWN_TRANSFER
            and self.resuming is not None
            and not self.resuming.done()
            and not self.acked_any
        ):
            # The receiver never saw it (lost with the first connections), and every byte
            # is still here: start it over instead of resuming, once every stripe's
            # resuming OPEN got its ABORT (so no late one can hit the new OPEN).
            self.unknown_aborts += 1
            if self.link is not None and self.unknown_aborts >= len(self.link.conns):
                self.resuming.set_result(Resume.of(self.id, self.opened.n_chunks, set()))
                self.restart = True
            return
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
        unacked, self.unacked = self.unacked, {}
        for item in unacked.values():
            item[2]()
        if self.link is not None:
            self.link.transfers.pop(self.id, None)
            # The peer answers on one stripe only (SPEC §7.4): every other stripe's core
            # must stop counting this transfer too, or aborts would use up max_transfers.
            for conn in self.link.conns:
                conn.conn.forget(self.id)
        self.ctx.on_finished(self)
