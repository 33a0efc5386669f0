"""The decode side: a request's KV, handed over layer by layer as it arrives."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from ..errors import IntegrityError, KvshipError, TransferError, error_for
from ..layout import as_array
from ..protocol import (
    Abort,
    Chunk,
    ChunkMeta,
    Complete,
    ErrorCode,
    LayerReady,
    LayerSpec,
    Open,
    Release,
    chunk_checksum,
    chunk_table,
)
from ..staging import StagingCopy, copy_in
from .connection import EngineConnection

Layer = tuple[int, np.ndarray[Any, np.dtype[Any]]]
Targets = Sequence[Any] | Callable[[int, LayerSpec], Any]


class Receiver:
    """One incoming transfer, from :meth:`kvship.Client.receive` once its layout is known.

    ``async for layer, array in receiver`` yields layers in arrival order. On the
    shared-memory path ``array`` is a zero-copy view into the staging arena, valid until
    the next iteration (copy it, or upload it to the GPU, before asking for the next);
    pass ``copy=True`` to :meth:`layers` for arrays you may keep. Each array has its
    layer's shape and :func:`kvship.layout.storage_dtype` (bf16 without ml_dtypes:
    ``uint16``, the raw bits).

    A receiver is iterated once. Leaving the iteration early (``break``, an exception),
    or ``async with`` exiting before the transfer completed, closes its connection (it
    never goes back to the pool with a transfer half read); after a complete transfer
    the connection (and its arena) serves the client's next receive.

    Failures: :class:`~kvship.errors.DaemonConnectionLost` when the local daemon goes
    away, ``TransferError(TIMEOUT)`` when nothing arrived for ``timeout`` seconds, the
    daemon's ABORT as a :class:`~kvship.errors.TransferError` with its code.
    """

    def __init__(self, conn: EngineConnection, opened: Open, timeout: float | None) -> None:
        self._conn = conn
        self.request_id = opened.request_id
        self.layout = opened.layers
        self.token_ids = opened.token_ids
        self.priority = opened.priority  # the sending engine's (0 bulk, 1 latency)
        self.chunk_bytes = opened.chunk_size
        self.timeout = timeout
        self.digest: int | None = None
        self.complete = False
        self._tid = opened.transfer_id
        self._starts = chunk_table(self.layout, opened.chunk_size)
        self._inline: dict[int, np.ndarray[Any, np.dtype[np.uint8]]] = {}
        self._pending = [self._starts[i + 1] - self._starts[i] for i in range(len(self.layout))]
        self._held: tuple[int, int] | None = None  # arena region of the last yielded layer
        self._held_copy: StagingCopy | None = None  # the copy still reading it, if any
        self._releasing: set[asyncio.Task[None]] = set()
        # Inline chunks read straight into their layer's array; those that arrived before
        # this Receiver existed (it needs the layout) sit in spare buffers and get copied.
        self._direct: set[int] = set()
        self._released = False
        self._iter: weakref.ref[AsyncGenerator[Layer, None]] | None = None
        conn.sink = self._sink

    @property
    def total_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.layout)

    def _sink(self, meta: ChunkMeta, nbytes: int) -> memoryview:
        """Inline chunks land straight in their layer's array."""
        if not 0 <= meta.layer < len(self.layout):
            return memoryview(bytearray(nbytes))
        self._direct.add(meta.chunk_index)
        return self._layer_buffer(meta.layer)[meta.offset : meta.offset + nbytes]

    def _layer_buffer(self, layer: int) -> memoryview:
        buf = self._inline.get(layer)
        if buf is None:
            buf = self._inline[layer] = np.empty(self.layout[layer].nbytes, np.uint8)
        return buf.data

    def _release_held(self) -> None:
        """The last layer's arena region goes back to the daemon: now, or once the copy
        out of it has ended (a DMA may still read it)."""
        if self._held is None:
            return
        held, self._held = self._held, None
        copy, self._held_copy = self._held_copy, None
        if copy is None or copy.done():
            self._conn.send(Release(*held))
            return
        task = asyncio.create_task(self._release_after(copy, held))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release_after(self, copy: StagingCopy, held: tuple[int, int]) -> None:
        with contextlib.suppress(Exception):  # the engine learns of a failed copy itself
            await copy.wait()
        if self._conn.is_open:
            with contextlib.suppress(KvshipError):  # closed meanwhile: the arena goes too
                self._conn.send(Release(*held))

    def _release(self, clean: bool) -> None:
        """The connection goes back to the pool (complete) or is closed (anything else)."""
        if not self._released:
            self._released = True
            self._conn.done(clean=clean)

    @property
    def pinned(self) -> bool:
        """Whether the staging arena is page-locked (device copies at full PCIe speed)."""
        return self._conn.pinned

    def layers(self, copy: bool = False) -> AsyncIterator[Layer]:
        """The layers as they arrive: ``(layer index, array)``; see the class docstring."""
        return self._iterate(self._layers(copy))

    def to_device(
        self, targets: Targets, *, stream: Any = None, background: bool = False
    ) -> AsyncIterator[tuple[int, StagingCopy]]:
        """The layers as they arrive, each copied into its target: ``targets[layer]``, or
        ``targets(layer, spec)`` if callable; a CuPy array, a torch CUDA tensor (anything
        with the CUDA array interface or DLPack) or a numpy array, contiguous and of the
        layer's size in bytes.

        Yields ``(layer, copy)`` once the host->device copy is queued (asynchronous, on
        kvship's CUDA stream, after the work queued so far on ``stream``); read the
        target after the copy is done: ``await copy.wait()``, or on the GPU
        ``stream.wait_event(copy.event)``. The layer's arena region goes back to the
        daemon when its copy ends, not before. ``background=True``: copies into numpy
        targets run in a worker thread, off the event loop (the same rules hold)."""
        return self._iterate(self._device_layers(targets, stream, background))

    def _iterate(self, gen: AsyncGenerator[Any, None]) -> AsyncIterator[Any]:
        if self._released:
            raise KvshipError(f"the receiver of {self.request_id!r} is done (iterate it once)")
        if self._iter is not None and self._iter() is not None:
            raise KvshipError(f"the receiver of {self.request_id!r} is already being iterated")
        self._iter = weakref.ref(gen)
        return gen

    async def _layers(self, copy: bool) -> AsyncGenerator[Layer, None]:
        async for layer, view in self._arrivals():
            array = as_array(view, self.layout[layer])
            yield layer, (array.copy() if copy else array)

    async def _device_layers(
        self, targets: Targets, stream: Any, background: bool
    ) -> AsyncGenerator[tuple[int, StagingCopy], None]:
        async for layer, view in self._arrivals():
            spec = self.layout[layer]
            target = targets(layer, spec) if callable(targets) else targets[layer]
            pinned = self._conn.pinned and self._held is not None  # arena, not inline
            copied = self._conn.track(
                copy_in(view, target, pinned=pinned, stream=stream, background=background)
            )
            if self._held is not None:
                self._held_copy = copied
            yield layer, copied

    async def _arrivals(self) -> AsyncGenerator[tuple[int, memoryview], None]:
        """Each layer's bytes as it completes: the arena region (held until the caller
        asks for the next) or the inline buffer."""
        delivered = 0
        try:
            while True:
                self._release_held()  # the caller asked for more: the last view is done
                frame = await self._conn.next_frame(self.timeout, "arrived")
                try:
                    item = self._on_frame(frame)
                except (ValueError, IndexError) as exc:  # a frame that contradicts OPEN
                    raise TransferError(
                        ErrorCode.PROTOCOL_ERROR, f"bad frame from kvshipd: {exc}"
                    ) from exc
                if item is not None:
                    delivered += 1
                    yield item
                elif isinstance(frame, Complete):
                    if delivered != len(self.layout):
                        raise error_for(ErrorCode.PROTOCOL_ERROR, "COMPLETE before every layer")
                    self.digest, self.complete = frame.digest, True
                    return
                elif isinstance(frame, Abort):
                    raise error_for(frame.code, frame.message)
        finally:
            # Complete: the connection (and its arena) serves the next receive. Anything
            # else (error, abandoned iteration): it goes, with whatever was in flight.
            self._release(clean=self.complete)

    def _on_frame(self, frame: object) -> tuple[int, memoryview] | None:
        """The layer ``frame`` completes, and its bytes, if it does."""
        if isinstance(frame, LayerReady):
            spec = self.layout[frame.layer]  # IndexError: a layer OPEN did not announce
            if frame.nbytes != spec.nbytes:
                raise ValueError(f"layer {frame.layer} is {spec.nbytes} B, not {frame.nbytes}")
            if frame.nbytes:
                assert self._conn.arena is not None
                view = self._conn.arena.view(frame.arena_offset, frame.nbytes)
                self._held = (frame.arena_offset, frame.nbytes)
            else:
                view = memoryview(b"")
            return frame.layer, view
        if isinstance(frame, Chunk):
            if chunk_checksum(frame.data) != frame.meta.checksum:
                raise IntegrityError(ErrorCode.CHECKSUM_MISMATCH, "inline chunk corrupted")
            layer = frame.meta.layer
            if frame.meta.chunk_index in self._direct:
                self._direct.discard(frame.meta.chunk_index)
            else:  # landed before the layout was known
                dst = self._layer_buffer(layer)
                dst[frame.meta.offset : frame.meta.offset + len(frame.data)] = frame.data
            self._conn.grant(len(frame.data))  # the bytes sit in our array now
            self._pending[layer] -= 1
            if self._pending[layer] == 0:
                raw = self._inline.pop(layer)
                return layer, raw.data
        return None

    def __aiter__(self) -> AsyncIterator[Layer]:
        return self.layers()

    async def all(self) -> list[np.ndarray[Any, np.dtype[Any]]]:
        """Every layer, as arrays you own, in layer order (waits for the whole transfer)."""
        out: list[Any] = [None] * len(self.layout)
        async for layer, array in self.layers(copy=True):
            out[layer] = array
        return out

    def close(self) -> None:
        """Release the connection now: to the pool after a complete transfer, else closed
        (the daemon drops the rest of the transfer). Prefer ``aclose``/``async with``."""
        self._release(clean=self.complete)

    async def aclose(self) -> None:
        """Stop a running iteration, then :meth:`close`."""
        gen = self._iter() if self._iter is not None else None
        if gen is not None:
            with contextlib.suppress(RuntimeError):  # it is being closed already
                await gen.aclose()
        self.close()

    async def __aenter__(self) -> Receiver:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def open_receiver(
    conn: EngineConnection, request_id: str, timeout: float | None, arena_max: int
) -> Receiver:
    """Wait for the daemon's OPEN (the layout) for ``request_id``, then size the arena.

    The arena holds three of the largest layer (the engine reads one while chunks of
    the next two land over the stripes), at least 64 MiB and at most ``arena_max``;
    layers too large for half of it arrive inline instead. On any failure the
    connection is closed (never pooled).
    """
    wait = None if timeout is None else timeout + 5.0  # the daemon answers NOT_FOUND first
    try:
        frame = await conn.next_frame(wait, f"from kvshipd about {request_id!r}")
        if isinstance(frame, Abort):
            raise error_for(frame.code, frame.message)
        if not isinstance(frame, Open):
            raise TransferError(ErrorCode.PROTOCOL_ERROR, f"expected OPEN, got {frame!r}")
        largest = max((spec.nbytes for spec in frame.layers), default=0)
        if largest and conn.shm and conn.arena is None:
            await conn.attach(min(max(3 * largest, 64 << 20), arena_max))
        return Receiver(conn, frame, timeout)
    except BaseException:
        conn.close("the receive failed")
        raise
