"""The prefill side: stream one request's KV to a remote daemon, layer by layer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import KvshipError, TransferError, error_for
from ..layout import spec_of
from ..protocol import (
    Abort,
    ChunkMeta,
    Complete,
    End,
    ErrorCode,
    LayerSpec,
    Open,
    ShmChunk,
    chunk_checksum,
    chunk_table,
    digest_of_checksums,
)
from ..staging import copy_to_host, is_device_array
from .connection import EngineConnection


@dataclass(frozen=True)
class SendResult:
    request_id: str
    total_bytes: int
    digest: int
    seconds: float  # from open to the far daemon's acknowledgement


class Sender:
    """Returned by :meth:`kvship.Client.send`. ``put`` each layer, then ``finish``."""

    def __init__(
        self,
        conn: EngineConnection,
        request_id: str,
        layout: Sequence[LayerSpec],
        peer: str,
        token_ids: Sequence[int],
        chunk_bytes: int,
        priority: int,
        *,
        extra: dict[str, Any] | None = None,
        chunk_multiple: int = 1,
    ) -> None:
        self._conn = conn
        self._tid = conn.next_tid()
        self.request_id = request_id
        self.layout = tuple(layout)
        assert conn.proto is not None
        size = min(chunk_bytes, conn.proto.conn.limits.max_chunk)
        if chunk_multiple > size:
            raise KvshipError(f"a block group of {chunk_multiple} B exceeds the chunk size {size}")
        self.chunk_bytes = size - size % chunk_multiple  # dedup skips whole blocks
        self._starts = chunk_table(self.layout, self.chunk_bytes)
        self._checksums = [0] * self._starts[-1]
        self._put = [False] * len(self.layout)
        self._started = time.perf_counter()
        self._finished = False
        self._outcome: asyncio.Task[Complete] | None = None
        opened = Open(
            self._tid,
            request_id,
            self.layout,
            self.chunk_bytes,
            tuple(int(t) for t in token_ids),
            priority=priority,
            peer=peer,
            extra=extra or {},
        )
        assert conn.proto is not None
        conn.proto.send(opened)
        self._outcome = asyncio.create_task(self._wait_outcome())

    async def _wait_outcome(self) -> Complete:
        while True:
            frame = await self._conn.next_frame(None)
            if isinstance(frame, Complete):
                return frame
            if isinstance(frame, Abort):
                error = error_for(frame.code, frame.message)
                self._conn.fail(error)
                raise error

    def _check_failed(self) -> None:
        if self._outcome is not None and self._outcome.done() and not self._outcome.cancelled():
            exc = self._outcome.exception()
            if exc is not None:
                raise exc

    async def put(self, layer: int, array: Any) -> None:
        """Stage layer ``layer`` (numpy, or CuPy on a GPU) and hand it to the daemon.

        Returns once the bytes are staged (copied into the shared arena, or written to
        the socket), not when they reach the far side; it waits only when the staging
        area is full, which bounds the engine's memory.
        """
        self._check_failed()
        if not 0 <= layer < len(self.layout):
            raise IndexError(f"layer {layer} outside the {len(self.layout)}-layer layout")
        if self._put[layer]:
            raise KvshipError(f"layer {layer} was already put")
        expect, got = self.layout[layer], spec_of(array)
        if (got.dtype, got.nbytes) != (expect.dtype, expect.nbytes):
            raise ValueError(
                f"layer {layer} is {got.dtype} {got.shape} ({got.nbytes} B), the layout says "
                f"{expect.dtype} {expect.shape} ({expect.nbytes} B)"
            )
        self._put[layer] = True
        try:
            if self._conn.allocator is not None:
                await self._put_shm(layer, array)
            else:
                await self._put_inline(layer, array)
        except ConnectionError as exc:
            self._check_failed()  # the daemon's ABORT says more than the closed socket
            raise TransferError(
                ErrorCode.PEER_UNREACHABLE, f"daemon connection lost: {exc}"
            ) from exc

    def _chunks(self, layer: int) -> range:
        return range(self._starts[layer], self._starts[layer + 1])

    async def _put_shm(self, layer: int, array: Any) -> None:
        conn, proto = self._conn, self._conn.proto
        assert conn.arena is not None and proto is not None
        device = is_device_array(array)
        src = array if device else np.ascontiguousarray(array)
        flat = src.reshape(-1).view(np.uint8)  # CuPy's reshape makes it contiguous too
        size = self.chunk_bytes
        for index in self._chunks(layer):
            offset = (index - self._starts[layer]) * size
            length = min(size, self.layout[layer].nbytes - offset)
            slot = await conn.allocate(length)
            dst = conn.arena.view(slot, length)
            if device:  # pragma: no cover - GPU only
                copy_to_host(flat[offset : offset + length], dst)
            else:
                dst[:] = flat[offset : offset + length].data
            checksum = chunk_checksum(dst)
            self._checksums[index] = checksum
            meta = ChunkMeta(self._tid, index, layer, offset, length, checksum)
            proto.send(ShmChunk(meta, slot))

    async def _put_inline(self, layer: int, array: Any) -> None:
        proto = self._conn.proto
        assert proto is not None
        if is_device_array(array):  # pragma: no cover - GPU only
            host = memoryview(bytearray(self.layout[layer].nbytes))
            copy_to_host(array, host)
            data = host
        else:
            data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        size = self.chunk_bytes
        for index in self._chunks(layer):
            offset = (index - self._starts[layer]) * size
            piece = data[offset : offset + size]
            checksum = chunk_checksum(piece)
            self._checksums[index] = checksum
            meta = ChunkMeta(self._tid, index, layer, offset, len(piece), checksum)
            await proto.send_chunk(meta, piece)

    async def finish(self, timeout: float | None = None) -> SendResult:
        """Wait until the far daemon holds every byte (COMPLETE), or raise why it failed."""
        missing = [i for i, done in enumerate(self._put) if not done]
        if missing:
            raise KvshipError(f"finish() before layers {missing[:8]} were put")
        assert self._conn.proto is not None and self._outcome is not None
        digest = digest_of_checksums(self._checksums)
        if not self._finished:
            self._finished = True
            self._check_failed()
            self._conn.proto.send(End(self._tid, len(self._checksums), digest))
        try:
            done = await asyncio.wait_for(asyncio.shield(self._outcome), timeout)
        except TimeoutError as exc:  # the transfer goes on: finish() may be awaited again
            raise TransferError(
                ErrorCode.TIMEOUT, f"no acknowledgement within {timeout} s"
            ) from exc
        except ConnectionError as exc:
            self._conn.done(clean=False)
            raise TransferError(
                ErrorCode.PEER_UNREACHABLE, f"daemon connection lost: {exc}"
            ) from exc
        except BaseException:
            if self._outcome.done():
                self._conn.done(clean=False)
            raise
        if done.digest != digest:
            self._conn.done(clean=False)
            raise error_for(ErrorCode.DIGEST_MISMATCH, "acknowledged digest differs from sent")
        self._conn.done(clean=True)
        return SendResult(
            self.request_id, done.total_bytes, digest, time.perf_counter() - self._started
        )

    async def abort(self) -> None:
        """Cancel the transfer; the far side drops what it received."""
        if self._conn.proto is not None and self._conn.proto.is_open:
            self._conn.proto.send(Abort(self._tid, ErrorCode.CANCELLED, "cancelled by engine"))
        if self._outcome is not None:
            self._outcome.cancel()
        self._conn.done(clean=False)
