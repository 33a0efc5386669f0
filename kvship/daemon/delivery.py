"""Delivery: one incoming transfer handed to one engine, layer by layer, as layers complete.

A :class:`Subscription` claims the transfer of a request from the registry, sends the engine
the layout (OPEN), then each complete layer: by reference into the engine's shared arena
(LAYER_READY) when it fits, else inline (CHUNK frames), then END and COMPLETE. It works the
transfer only through the transfer's delivery API, and it always ends by telling the engine
(COMPLETE or ABORT) and finishing the transfer, whatever goes wrong.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ..aio import FramedProtocol
from ..protocol import (
    CAP_SHM,
    Abort,
    ChunkMeta,
    Complete,
    End,
    ErrorCode,
    LayerReady,
    Open,
    Subscribe,
    chunk_checksum,
)
from ..staging import Arena, RingAllocator
from .incoming import Destination, IncomingTransfer
from .records import TransferState

log = logging.getLogger("kvship.engine")

ATTACH_TIMEOUT_S = 10.0  # an engine that never shares its arena gets its layers inline

Claim = Callable[[str, Destination, float], Awaitable[IncomingTransfer | None]]


class EngineArena:
    """The shared-memory arena of one engine connection, once the engine attached it.

    An arena serves one direction: the engine's puts (it allocates) or this daemon's
    deliveries (the daemon allocates). The first use decides; mixing would overlap regions.
    """

    def __init__(self) -> None:
        self.arena: Arena | None = None
        self.allocator: RingAllocator | None = None
        self.owner: str | None = None  # "engine" | "daemon"
        self.attached = asyncio.Event()
        self.shm = False  # the connection negotiated CAP_SHM

    def negotiated(self, conn: FramedProtocol) -> None:
        self.shm = bool(conn.conn.negotiated.capabilities & CAP_SHM)

    def attach(self, arena: Arena) -> None:
        self.arena = arena
        self.allocator = RingAllocator(arena.size)
        self.attached.set()

    def close(self) -> None:
        if self.arena is not None:
            self.arena.close()


class Subscription:
    """Delivers one incoming transfer to one engine; a :class:`Destination` for it."""

    def __init__(
        self,
        arena: EngineArena,
        conn: FramedProtocol,
        tid: int,
        request: Subscribe,
        claim: Claim,
        default_timeout_s: float,
    ) -> None:
        self.arena = arena
        self.conn = conn
        self.tid = tid
        self.request = request
        self._claim = claim
        self._default_timeout_s = default_timeout_s
        self.transfer: IncomingTransfer | None = None
        self._arena_ready = False
        self.inline_chunks = 0  # CHUNK frames sent to the engine (counted by its END)
        self.task: asyncio.Task[None] | None = None

    # ------------------------------------------------------- Destination
    @property
    def active(self) -> bool:
        return self.task is not None and not self.task.done()

    @property
    def allocator(self) -> RingAllocator | None:
        """The arena's allocator, once the engine attached it for this delivery."""
        return self.arena.allocator if self._arena_ready else None

    def fits(self, nbytes: int) -> bool:
        """Layers go through the arena only if two fit: the engine holds one while the
        next is placed, so a bigger layer could wait forever; those go inline."""
        return self.allocator is not None and 0 < nbytes <= self.allocator.capacity // 2

    def reserve(self, nbytes: int) -> int | None:
        if not self.fits(nbytes):
            return None
        assert self.allocator is not None
        return self.allocator.allocate(nbytes)

    @property
    def attached(self) -> bool:
        return self.conn.is_open and self.arena.arena is not None

    def view(self, offset: int, length: int) -> memoryview:
        arena = self.arena.arena
        assert arena is not None
        if not self.conn.is_open:  # its arena is unmapped with it
            raise ConnectionResetError("the receiving engine went away")
        return arena.view(offset, length)

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    # ----------------------------------------------------------- running
    async def run(self) -> None:
        timeout = self.request.timeout_ms / 1000 or self._default_timeout_s
        transfer = await self._claim(self.request.request_id, self, timeout)
        if transfer is None:  # transfer id 0: this delivery never opened (SPEC §9.3)
            message = f"no transfer of {self.request.request_id!r} within {timeout:g} s"
            if self.conn.is_open:
                self.conn.send(Abort(0, int(ErrorCode.NOT_FOUND), message))
            return
        self.transfer = transfer
        try:
            await self._deliver(transfer)
        except (asyncio.CancelledError, ConnectionError) as exc:
            # Part of it may sit in this engine's arena: it cannot be handed to anyone else.
            transfer.fail(ErrorCode.CANCELLED, "the receiving engine went away")
            if isinstance(exc, asyncio.CancelledError):
                raise
        except Exception as exc:
            log.exception(
                "delivery of %s to the engine failed",
                self.request.request_id,
                extra=transfer.log_fields(cause=f"delivery {type(exc).__name__}"),
            )
            message = f"delivery failed: {type(exc).__name__}: {exc}"
            transfer.fail(ErrorCode.INTERNAL_ERROR, message)
            self._abort(ErrorCode.INTERNAL_ERROR, message)

    def _abort(self, code: ErrorCode, message: str) -> None:
        if self.conn.is_open:
            self.conn.send(Abort(self.tid, int(code), message))

    async def _use_arena(self, transfer: IncomingTransfer) -> None:
        """Wait for the engine's arena, when there is one to wait for: only a connection
        with CAP_SHM and a layout with bytes in it gets one (the client skips the attach
        for an all-empty layout)."""
        arena = self.arena
        if not arena.shm or not any(spec.nbytes for spec in transfer.layers):
            return
        try:
            await asyncio.wait_for(arena.attached.wait(), ATTACH_TIMEOUT_S)
        except TimeoutError:
            log.warning(
                "engine did not attach its arena within %g s: %s arrives inline",
                ATTACH_TIMEOUT_S,
                self.request.request_id,
                extra=transfer.log_fields(cause="arena not attached"),
            )
            return
        if arena.owner != "engine":
            arena.owner = "daemon"
            self._arena_ready = True

    async def _deliver(self, transfer: IncomingTransfer) -> None:
        conn, opened = self.conn, transfer.opened
        conn.send(
            Open(
                self.tid,
                opened.request_id,
                opened.layers,
                opened.chunk_size,
                opened.token_ids,
                priority=opened.priority,
                extra=opened.extra,
            )
        )
        await self._use_arena(transfer)
        delivered = 0
        while True:
            # Deliver whatever can go now, not strictly in order: a layer waiting for
            # arena space must not hold back layers that already sit in their regions.
            progress = True
            while progress and transfer.state is not TransferState.FAILED:
                progress = False
                for layer in transfer.ready_layers():
                    if await self._deliver_layer(transfer, layer):
                        transfer.layer_delivered(layer)
                        delivered += 1
                        progress = True
            # Ready layers none of which could go now (arena space held by incomplete
            # layers): only finishing one frees it, so the budget may lend memory for that.
            transfer.set_delivery_blocked(bool(transfer.ready_layers()))
            if transfer.state is TransferState.FAILED:
                assert transfer.error is not None
                code, message = transfer.error
                self._abort(code, message)
                return
            if transfer.state is TransferState.RECEIVED and delivered == len(transfer.layers):
                # END closes the transfer in the engine's connection state (the connection
                # is reused), COMPLETE says it all arrived verified.
                digest = transfer.delivery_digest()
                conn.send(End(self.tid, self.inline_chunks, digest))
                conn.send(Complete(self.tid, opened.total_bytes, digest))
                transfer.mark_delivered()
                return
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "delivery of %s waits: %s, %d/%d layers delivered",
                    self.request.request_id,
                    transfer.state,
                    delivered,
                    len(transfer.layers),
                    extra=transfer.log_fields(),
                )
            await transfer.wait_changed()

    async def _deliver_layer(self, transfer: IncomingTransfer, layer: int) -> bool:
        """Hand one complete layer to the engine; False when arena space must free first."""
        nbytes = transfer.layers[layer].nbytes
        offset = transfer.take_region(layer)
        if offset is None and self.fits(nbytes):
            offset = self.reserve(nbytes)
            if offset is None:
                return False
        if offset is not None or nbytes == 0:
            if nbytes:
                assert offset is not None
                view = self.view(offset, nbytes)
                for chunk_offset, data in transfer.held_chunks(layer):  # came before the region
                    view[chunk_offset : chunk_offset + len(data)] = data
                await transfer.fill_from_store(layer, view)
            self.conn.send(LayerReady(self.tid, layer, offset or 0, nbytes))
            return True
        # Inline: no arena, or a layer too large for it.
        chunks: list[tuple[int, bytearray | memoryview]] = list(transfer.held_chunks(layer))
        size = transfer.opened.chunk_size
        if transfer.dedup and nbytes:
            whole = memoryview(bytearray(nbytes))  # the store's prefix + the wire's rest
            for chunk_offset, buf in chunks:
                whole[chunk_offset : chunk_offset + len(buf)] = buf
            await transfer.fill_from_store(layer, whole)
            chunks = [(o, whole[o : o + size]) for o in range(0, nbytes, size)]
        first = transfer.starts[layer]
        for chunk_offset, buf in chunks:
            meta = ChunkMeta(
                self.tid,
                first + chunk_offset // size,
                layer,
                chunk_offset,
                len(buf),
                chunk_checksum(buf),
            )
            await self.conn.send_chunk(meta, memoryview(buf))
            self.inline_chunks += 1
        return True
