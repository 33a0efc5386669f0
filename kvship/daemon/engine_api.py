"""The local engine API: what a kvship.Client on this host (or another) asks of its daemon.

An engine connection carries sends (OPEN with a destination peer, then chunks, then
END; the daemon answers COMPLETE or ABORT) and receives (SUBSCRIBE; the daemon answers
OPEN with the layout, then whole verified layers, then COMPLETE or ABORT). On the Unix
socket the engine attaches a shared-memory arena and chunks travel by reference.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import TYPE_CHECKING

from ..aio import FramedProtocol, spawn
from ..protocol import (
    CAP_SHM,
    Abort,
    Chunk,
    ChunkMeta,
    Complete,
    End,
    ErrorCode,
    Frame,
    LayerReady,
    Open,
    Ping,
    Pong,
    ProtocolError,
    Release,
    ShmAttach,
    ShmAttached,
    ShmChunk,
    Subscribe,
    chunk_checksum,
)
from ..staging import Arena, RingAllocator

if TYPE_CHECKING:
    from .incoming import IncomingTransfer
    from .outgoing import OutgoingTransfer
    from .server import Daemon

log = logging.getLogger("kvship.engine")


class EngineSession:
    """One engine connection and everything it has going on."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.conn: FramedProtocol | None = None
        self.arena: Arena | None = None
        self.allocator: RingAllocator | None = None  # regions this daemon hands the engine
        # An arena serves one direction: the engine's puts (it allocates) or this daemon's
        # deliveries (we allocate). The first use decides; mixing would overlap regions.
        self.arena_owner: str | None = None
        self.sends: dict[int, OutgoingTransfer] = {}
        self.subs: dict[int, Subscription] = {}
        self.attached = asyncio.Event()
        self._tids = itertools.count(1)  # ids of this daemon's deliveries on the connection

    @property
    def shm(self) -> bool:
        return self.conn is not None and bool(self.conn.conn.negotiated.capabilities & CAP_SHM)

    def on_frame(self, conn: FramedProtocol, frame: Frame) -> None:
        self.conn = conn
        if isinstance(frame, ShmChunk):
            self._on_shm_chunk(conn, frame)
        elif isinstance(frame, Chunk):
            send = self._send_for(frame.meta.transfer_id)
            n = len(frame.data)
            if send is None:
                conn.grant(n)
            else:
                send.add_chunk(frame.meta, frame.data, lambda: conn.grant(n))
        elif isinstance(frame, Open):
            self._on_open(conn, frame)
        elif isinstance(frame, End):
            send = self._send_for(frame.transfer_id)
            if send is not None:
                send.end(frame)
        elif isinstance(frame, Subscribe):
            self._on_subscribe(conn, frame)
        elif isinstance(frame, Release):
            self._on_release(frame)
        elif isinstance(frame, Abort):
            if (send := self.sends.get(frame.transfer_id)) is not None:
                send.fail(ErrorCode.CANCELLED, "cancelled by the engine", tell_engine=False)
            if (sub := self.subs.get(frame.transfer_id)) is not None:
                sub.cancel()
        elif isinstance(frame, ShmAttach):
            self._on_attach(conn, frame)
        elif isinstance(frame, Ping):
            conn.send(Pong(frame.opaque))

    def _send_for(self, engine_tid: int) -> OutgoingTransfer | None:
        send = self.sends.get(engine_tid)
        return None if send is None or send.done.done() else send

    def _on_attach(self, conn: FramedProtocol, frame: ShmAttach) -> None:
        if not self.shm or self.arena is not None:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "SHM_ATTACH without CAP_SHM, or twice")
        try:
            self.arena = Arena.attach(frame.path, frame.size)
        except (OSError, ValueError) as exc:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"cannot map arena: {exc}") from exc
        self.allocator = RingAllocator(frame.size)
        conn.send(ShmAttached(frame.size))
        self.attached.set()

    def _on_shm_chunk(self, conn: FramedProtocol, frame: ShmChunk) -> None:
        if self.arena is None:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "SHM_CHUNK before SHM_ATTACH")
        if self.arena_owner == "daemon":
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "SHM_CHUNK into a receive arena")
        self.arena_owner = "engine"
        length = frame.meta.raw_length
        try:
            data = self.arena.view(frame.arena_offset, length)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, str(exc)) from exc
        offset = frame.arena_offset

        def release() -> None:
            if conn.is_open:
                conn.send(Release(offset, length))

        send = self._send_for(frame.meta.transfer_id)
        if send is None:
            release()
        else:
            send.add_chunk(frame.meta, data, release)

    def _on_open(self, conn: FramedProtocol, frame: Open) -> None:
        if frame.transfer_id in self.sends:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "engine reused a transfer id")
        if self.daemon.draining:
            conn.send(Abort(frame.transfer_id, ErrorCode.SHUTTING_DOWN, "daemon is draining"))
            return
        if not frame.peer:
            conn.send(Abort(frame.transfer_id, ErrorCode.PROTOCOL_ERROR, "OPEN names no peer"))
            return
        send = self.sends[frame.transfer_id] = self.daemon.start_outgoing(conn, frame)
        tid = frame.transfer_id
        send.done.add_done_callback(lambda _: self.sends.pop(tid, None))

    def _on_subscribe(self, conn: FramedProtocol, frame: Subscribe) -> None:
        tid = next(self._tids)
        sub = Subscription(self, conn, tid, frame)
        self.subs[tid] = sub
        sub.task = spawn(sub.run(), name=f"sub-{frame.request_id}")
        sub.task.add_done_callback(lambda _: self.subs.pop(tid, None))

    def _on_release(self, frame: Release) -> None:
        if self.allocator is None or self.arena_owner != "daemon":
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "RELEASE without an arena")
        try:
            self.allocator.release(frame.arena_offset, frame.length)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"RELEASE: {exc}") from None
        for sub in self.subs.values():
            if sub.transfer is not None:
                sub.transfer.changed.set()

    def on_close(self, conn: FramedProtocol, error: BaseException | None) -> None:
        for send in self.sends.values():
            send.fail(ErrorCode.CANCELLED, "engine disconnected", tell_engine=False)
        for sub in self.subs.values():
            sub.cancel()
        if self.arena is not None:
            self.arena.close()


class Subscription:
    """Delivers one incoming transfer to one engine, layer by layer."""

    def __init__(self, session: EngineSession, conn: FramedProtocol, tid: int, frame: Subscribe):
        self.session = session
        self.conn = conn
        self.tid = tid
        self.request = frame
        self.transfer: IncomingTransfer | None = None
        self._arena_ready = False
        self.inline_chunks = 0  # CHUNK frames sent to the engine (counted by its END)
        self.task: asyncio.Task[None] | None = None

    @property
    def allocator(self) -> RingAllocator | None:
        """The session's allocator, once the engine attached its arena and this waits."""
        return self.session.allocator if self._arena_ready else None

    def fits(self, nbytes: int) -> bool:
        """Layers go through the arena only if two fit: the engine holds one while the
        next is placed, so a bigger layer could wait forever; those go inline."""
        return self.allocator is not None and 0 < nbytes <= self.allocator.capacity // 2

    def reserve(self, nbytes: int) -> int | None:
        if not self.fits(nbytes):
            return None
        assert self.allocator is not None
        return self.allocator.allocate(nbytes)

    def view(self, offset: int, length: int) -> memoryview:
        assert self.session.arena is not None
        return self.session.arena.view(offset, length)

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def run(self) -> None:
        daemon, conn = self.session.daemon, self.conn
        timeout = self.request.timeout_ms / 1000 or daemon.config.subscribe_timeout_s
        transfer = await daemon.claim(self.request.request_id, self, timeout)
        if transfer is None:
            conn.send(
                Abort(
                    self.tid,
                    ErrorCode.NOT_FOUND,
                    f"no transfer of {self.request.request_id!r} within {timeout:g} s",
                )
            )
            return
        self.transfer = transfer
        try:
            await self._deliver(transfer)
        except (asyncio.CancelledError, ConnectionError) as exc:
            # Part of it may sit in this engine's arena: it cannot be handed to anyone else.
            transfer.fail(ErrorCode.CANCELLED, "the receiving engine went away")
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _deliver(self, transfer: IncomingTransfer) -> None:
        conn, opened = self.conn, transfer.opened
        conn.send(
            Open(
                self.tid,
                opened.request_id,
                opened.layers,
                opened.chunk_size,
                opened.token_ids,
                extra=opened.extra,
            )
        )
        if self.session.shm:
            await asyncio.wait_for(self.session.attached.wait(), 30)
            if self.session.arena_owner != "engine":
                self.session.arena_owner = "daemon"
                self._arena_ready = True
        delivered = 0
        while True:
            # Deliver whatever can go now, not strictly in order: a layer waiting for
            # arena space must not hold back layers that already sit in their regions.
            progress = True
            while progress and transfer.state != "failed":
                progress = False
                for layer in list(transfer.ready):
                    if await self._deliver_layer(transfer, layer):
                        transfer.ready.remove(layer)
                        delivered += 1
                        progress = True
            if transfer.state == "failed":
                assert transfer.error is not None
                code, message = transfer.error
                conn.send(Abort(self.tid, int(code), message))
                return
            if transfer.state == "received" and delivered == len(transfer.layers):
                # END closes the transfer in the engine's connection state (the connection
                # is reused), COMPLETE says it all arrived verified.
                digest = transfer.digest.value()
                conn.send(End(self.tid, self.inline_chunks, digest))
                conn.send(Complete(self.tid, opened.total_bytes, digest))
                transfer.delivered()
                return
            log.debug(
                "delivery of %s waits: %s, %d/%d layers delivered, %d ready",
                self.request.request_id,
                transfer.state,
                delivered,
                len(transfer.layers),
                len(transfer.ready),
            )
            await transfer.changed.wait()
            transfer.changed.clear()

    async def _deliver_layer(self, transfer: IncomingTransfer, layer: int) -> bool:
        """Hand one complete layer to the engine; False when arena space must free first."""
        nbytes = transfer.layers[layer].nbytes
        offset = transfer.regions.get(layer)
        if offset is None and self.fits(nbytes):
            offset = self.reserve(nbytes)
            if offset is None:
                return False
        if offset is not None or nbytes == 0:
            transfer.regions.pop(layer, None)
            if nbytes:
                assert offset is not None
                view = self.view(offset, nbytes)
                for chunk_offset, buf in transfer.held.get(layer, []):  # came before the region
                    view[chunk_offset : chunk_offset + len(buf)] = buf
                _with_held_prefix(transfer, layer, view)
            transfer.release_layer(layer)
            self.conn.send(LayerReady(self.tid, layer, offset or 0, nbytes))
            return True
        # Inline: no arena, or a layer too large for it.
        chunks = sorted(transfer.held.get(layer, []))
        if transfer.held_prefix is not None and nbytes:
            whole = memoryview(bytearray(nbytes))  # the store's prefix + the wire's rest
            for chunk_offset, buf in chunks:
                whole[chunk_offset : chunk_offset + len(buf)] = buf
            _with_held_prefix(transfer, layer, whole)
            size = transfer.opened.chunk_size
            chunks = [(o, whole[o : o + size]) for o in range(0, nbytes, size)]
        chunk_size, first = transfer.opened.chunk_size, transfer.starts[layer]
        for chunk_offset, buf in chunks:
            meta = ChunkMeta(
                self.tid,
                first + chunk_offset // chunk_size,
                layer,
                chunk_offset,
                len(buf),
                chunk_checksum(buf),
            )
            await self.conn.send_chunk(meta, memoryview(buf))
            self.inline_chunks += 1
        transfer.release_layer(layer)
        return True


def _with_held_prefix(transfer: IncomingTransfer, layer: int, view: memoryview) -> None:
    """Dedup: put the stored prefix into the layer, and keep its new blocks for later."""
    held = transfer.held_prefix
    if held is not None:
        held.fill(layer, view)
        held.remember(layer, view)
