"""The decode side: a request's KV, handed over layer by layer as it arrives."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from ..errors import IntegrityError, TransferError, error_for
from ..layout import as_array
from ..protocol import (
    Abort,
    Chunk,
    ChunkMeta,
    Complete,
    ErrorCode,
    LayerReady,
    Open,
    Release,
    chunk_checksum,
    chunk_table,
)
from .connection import EngineConnection


class Receiver:
    """Returned by :meth:`kvship.Client.receive` once the transfer is known.

    ``async for layer, array in receiver`` yields layers in arrival order. On the
    shared-memory path ``array`` is a zero-copy view into the staging arena, valid until
    the next iteration (copy it, or upload it to the GPU, before asking for the next);
    pass ``copy=True`` to :meth:`layers` for arrays you may keep.
    """

    def __init__(self, conn: EngineConnection, opened: Open, timeout: float | None) -> None:
        self._conn = conn
        self.request_id = opened.request_id
        self.layout = opened.layers
        self.token_ids = opened.token_ids
        self.chunk_bytes = opened.chunk_size
        self.timeout = timeout
        self.digest: int | None = None
        self.complete = False
        self._tid = opened.transfer_id
        self._starts = chunk_table(self.layout, opened.chunk_size)
        self._inline: dict[int, np.ndarray] = {}
        self._pending = [self._starts[i + 1] - self._starts[i] for i in range(len(self.layout))]
        self._held: tuple[int, int] | None = None  # arena region of the last yielded layer
        # Inline chunks read straight into their layer's array; those that arrived before
        # this Receiver existed (it needs the layout) sit in spare buffers and get copied.
        self._direct: set[int] = set()
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
        return memoryview(buf)

    def _release_held(self) -> None:
        if self._held is not None:
            proto = self._conn.proto
            if proto is not None and proto.is_open:
                proto.send(Release(*self._held))
            self._held = None

    async def layers(self, copy: bool = False) -> AsyncIterator[tuple[int, np.ndarray]]:
        delivered = 0
        try:
            while True:
                self._release_held()  # the caller asked for more: the last view is done
                try:
                    frame = await self._conn.next_frame(self.timeout)
                except TimeoutError as exc:
                    raise TransferError(
                        ErrorCode.TIMEOUT, f"nothing arrived for {self.timeout} s"
                    ) from exc
                except ConnectionError as exc:
                    raise TransferError(ErrorCode.PEER_UNREACHABLE, str(exc)) from exc
                if isinstance(frame, LayerReady):
                    spec = self.layout[frame.layer]
                    if frame.nbytes:
                        assert self._conn.arena is not None
                        view = self._conn.arena.view(frame.arena_offset, frame.nbytes)
                        self._held = (frame.arena_offset, frame.nbytes)
                    else:
                        view = memoryview(b"")
                    array = as_array(view, spec)
                    delivered += 1
                    yield frame.layer, (array.copy() if copy else array)
                elif isinstance(frame, Chunk):
                    if chunk_checksum(frame.data) != frame.meta.checksum:
                        raise IntegrityError(ErrorCode.CHECKSUM_MISMATCH, "inline chunk corrupted")
                    layer = frame.meta.layer
                    if frame.meta.chunk_index in self._direct:
                        self._direct.discard(frame.meta.chunk_index)
                    else:  # landed before the layout was known
                        dst = self._layer_buffer(layer)
                        dst[frame.meta.offset : frame.meta.offset + len(frame.data)] = frame.data
                    if self._conn.proto is not None:
                        self._conn.proto.grant(len(frame.data))  # the bytes sit in our array now
                    self._pending[layer] -= 1
                    if self._pending[layer] == 0:
                        raw = self._inline.pop(layer)
                        delivered += 1
                        yield layer, as_array(memoryview(raw), self.layout[layer])
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
            self._conn.done(clean=self.complete)

    def __aiter__(self) -> AsyncIterator[tuple[int, np.ndarray]]:
        return self.layers()

    async def all(self) -> list[np.ndarray]:
        """Every layer, as arrays you own, in layer order (waits for the whole transfer)."""
        out: list[Any] = [None] * len(self.layout)
        async for layer, array in self.layers(copy=True):
            out[layer] = array
        return out

    def close(self) -> None:
        self._conn.done(clean=self.complete)


async def open_receiver(
    conn: EngineConnection, request_id: str, timeout: float | None, arena_max: int
) -> Receiver:
    """Wait for the daemon's OPEN (the layout) for ``request_id``, then size the arena.

    The arena holds three of the largest layer (the engine reads one while chunks of
    the next two land over the stripes), at least 64 MiB and at most ``arena_max``;
    layers too large for half of it arrive inline instead.
    """
    wait = None if timeout is None else timeout + 5.0  # the daemon answers NOT_FOUND first
    try:
        frame = await conn.next_frame(wait)
    except TimeoutError as exc:
        raise TransferError(ErrorCode.TIMEOUT, f"daemon silent for {wait} s") from exc
    if isinstance(frame, Abort):
        conn.close()
        raise error_for(frame.code, frame.message)
    if not isinstance(frame, Open):
        conn.close()
        raise TransferError(ErrorCode.PROTOCOL_ERROR, f"expected OPEN, got {frame!r}")
    largest = max(spec.nbytes for spec in frame.layers)
    if largest and conn.shm and conn.arena is None:
        await conn.attach(min(max(3 * largest, 64 << 20), arena_max))
    return Receiver(conn, frame, timeout)
