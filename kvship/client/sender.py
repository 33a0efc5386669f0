"""The prefill side: stream one request's KV to a remote daemon, layer by layer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from ..errors import KvshipError, TransferError, error_for
from ..layout import spec_of, storage_dtype
from ..protocol import (
    Abort,
    ChunkMeta,
    Complete,
    End,
    ErrorCode,
    LayerSpec,
    Open,
    ShmChunk,
    Skip,
    chunk_checksum,
    chunk_table,
    digest_of_checksums,
)
from ..staging import DeviceBuffer, Source, StagingCopy, copy_out, source_of
from .connection import EngineConnection
from .outbox import Outbox, StagedGroup


@dataclass(frozen=True)
class SendResult:
    request_id: str
    total_bytes: int
    digest: int
    seconds: float  # from open to the far daemon's acknowledgement


class Sender:
    """One outgoing transfer, from :meth:`kvship.Client.send`: ``put`` each layer, then
    ``finish``.

    Use it as an async context manager (``async with client.send(...) as sender``):
    leaving the block by an exception, or without a successful :meth:`finish`, aborts
    the transfer (the far daemon drops what it got) and closes its connection.

    Every failure is a :class:`kvship.errors.KvshipError`: the daemon's ABORT as a
    :class:`~kvship.errors.TransferError` with its code (``PeerUnreachable`` when the far
    daemon is lost), the local daemon going away as
    :class:`~kvship.errors.DaemonConnectionLost`. Once a transfer failed, every later
    ``put``/``finish`` raises the same error.
    """

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
        # Chunks the receiver holds already (the daemon's SKIP, after dedup's HAVE): not
        # staged, not hashed; their checksums stay 0 in END's digest, as at the daemon.
        self._omit: set[int] = set()
        self.omitted = 0  # chunks left out for that
        self._outbox = Outbox(self._send_group, self._failed)
        self._started = time.perf_counter()
        self._ended = False  # END sent
        self._released = False  # the connection went back to the pool or was closed
        self._error: KvshipError | None = None  # why the transfer is over, if it failed
        self.result: SendResult | None = None
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
        conn.send(opened)
        self._outcome: asyncio.Task[Complete] = asyncio.create_task(self._wait_outcome())
        self._outcome.add_done_callback(_retrieve)

    async def _wait_outcome(self) -> Complete:
        while True:
            frame = await self._conn.next_frame(None)
            if isinstance(frame, Complete):
                return frame
            if isinstance(frame, Skip) and frame.transfer_id == self._tid:
                self._omit.update(frame.chunks)
            if isinstance(frame, Abort):
                error = error_for(frame.code, frame.message)
                self._conn.fail(error)
                raise error

    # ------------------------------------------------------------ failures
    def _outcome_error(self) -> KvshipError | None:
        if self._outcome.done() and not self._outcome.cancelled():
            exc = self._outcome.exception()
            if exc is not None:
                return _typed(exc, self._conn)
        return None

    def _check_failed(self) -> None:
        if self._error is None:
            self._error = self._outcome_error()
            if self._error is not None:
                self._release(clean=False)
        if self._error is not None:
            raise self._error.with_traceback(None)  # raised again: no growing traceback

    def _failed(self, exc: BaseException) -> KvshipError:
        """The transfer is over because of ``exc``: remember the most telling error (the
        daemon's ABORT says more than the closed socket), release the connection."""
        error = self._outcome_error() or _typed(exc, self._conn)
        self._error = self._error or error
        self._release(clean=False)
        return self._error

    def _release(self, clean: bool) -> None:
        if not self._released:
            self._released = True
            if not clean:
                self._outcome.cancel()
                self._outbox.cancel()
            self._conn.done(clean)

    # ------------------------------------------------------------- sending
    @property
    def held_by_receiver(self) -> frozenset[int]:
        """Chunk indices the daemon said the receiver holds already (SKIP, after dedup's
        HAVE): ``put`` neither stages nor hashes them (``omitted`` counts those left out)."""
        return frozenset(self._omit)

    @property
    def pinned(self) -> bool:
        """Whether the staging arena is page-locked (device copies at full PCIe speed)."""
        return self._conn.pinned

    async def put(
        self, layer: int, array: Any, *, stream: Any = None, background: bool = False
    ) -> StagingCopy:
        """Stage layer ``layer`` and hand it to the daemon; returns the copy's handle.

        A GPU array (CuPy, a torch CUDA tensor, anything with the CUDA array interface or
        DLPack) leaves by one asynchronous copy into the pinned arena, on kvship's own
        CUDA stream, after the work queued so far on ``stream`` (default: CuPy's current
        stream; for torch pass ``torch.cuda.current_stream()``). ``put`` returns once the
        copy is queued; its chunks go to the daemon as it ends. The array must stay
        unchanged until the returned copy is done: ``copy.done()``, ``await
        copy.wait()``, or, on the GPU, ``stream.wait_event(copy.event)``.

        A host array (numpy) is copied before ``put`` returns, so it may be reused at
        once; with ``background=True`` the copy runs in a worker thread instead (the GPU
        rule holds then). A layer whose dtype numpy lacks (bfloat16 without ml_dtypes)
        may be given as its same-width unsigned stand-in (uint16 for bf16:
        :func:`kvship.layout.storage_dtype`).

        ``put`` waits only when the staging area is full, which bounds the engine's
        memory: the arena (``Client(arena_bytes=...)``) should hold the layers an engine
        wants in flight at once.
        """
        self._check_failed()
        if self.result is not None:
            raise KvshipError("put() after finish()")
        if not 0 <= layer < len(self.layout):
            raise IndexError(f"layer {layer} outside the {len(self.layout)}-layer layout")
        if self._put[layer]:
            raise KvshipError(f"layer {layer} was already put")
        expect, got = self.layout[layer], spec_of(array)
        dtype_ok = got.dtype in (expect.dtype, storage_dtype(expect.dtype).name)
        if not dtype_ok or got.nbytes != expect.nbytes:
            raise ValueError(
                f"layer {layer} is {got.dtype} {got.shape} ({got.nbytes} B), the layout says "
                f"{expect.dtype} {expect.shape} ({expect.nbytes} B)"
            )
        source = source_of(array)
        self._put[layer] = True
        try:
            if self._conn.allocator is not None:
                return await self._put_shm(layer, source, stream, background)
            return await self._put_inline(layer, source)
        except (KvshipError, OSError) as exc:  # OSError: a last guard, the conn maps them
            raise self._failed(exc) from exc

    def _chunks(self, layer: int) -> range:
        return range(self._starts[layer], self._starts[layer + 1])

    def _lengths(self, layer: int) -> list[int]:
        nbytes, size = self.layout[layer].nbytes, self.chunk_bytes
        return [min(size, nbytes - i * size) for i in range(len(self._chunks(layer)))]

    async def _put_shm(
        self, layer: int, source: Source, stream: Any, background: bool
    ) -> StagingCopy:
        """Stage the layer in groups of chunks, one copy each: one chunk per group for a
        copy made now (the daemon starts on the first chunk while the next is copied),
        as many as half the arena holds for a copy that runs on (from a GPU: one DMA).
        Chunks the daemon said the receiver holds (SKIP) are left out."""
        conn = self._conn
        assert conn.arena is not None and conn.allocator is not None
        lengths = self._lengths(layer)
        later = background or isinstance(source, DeviceBuffer)
        per_group = max(1, conn.allocator.capacity // 2 // self.chunk_bytes) if later else 1
        first, start = self._starts[layer], 0
        copies = []
        while start < len(lengths):
            if first + start in self._omit:  # the receiver holds it: not staged at all
                self.omitted += 1
                start += 1
                continue
            stop = start + 1
            while stop < min(len(lengths), start + per_group) and first + stop not in self._omit:
                stop += 1
            run, offset = tuple(lengths[start:stop]), start * self.chunk_bytes
            slot = await conn.allocate(run)
            self._check_failed()  # a copy of an earlier group may have failed meanwhile
            dst = conn.arena.view(slot, sum(run))
            copy = conn.track(
                copy_out(
                    source, offset, dst, pinned=conn.pinned, stream=stream, background=background
                )
            )
            self._outbox.push(StagedGroup(layer, first + start, offset, slot, run, copy))
            copies.append(copy)
            start = stop
        return StagingCopy.joined(copies)

    def _send_group(self, group: StagedGroup) -> None:
        """The outbox's callback: the group's bytes are in the arena; the daemon gets them."""
        conn = self._conn
        assert conn.arena is not None
        offset, slot = group.offset, group.slot
        for i, length in enumerate(group.lengths):
            checksum = chunk_checksum(conn.arena.view(slot, length))
            self._checksums[group.first + i] = checksum
            meta = ChunkMeta(self._tid, group.first + i, group.layer, offset, length, checksum)
            conn.send(ShmChunk(meta, slot))
            offset += length
            slot += length

    async def _put_inline(self, layer: int, source: Source) -> StagingCopy:
        """No arena (a TCP engine connection): chunks go over the socket from the array
        itself, or, for a GPU array, from a host copy of it."""
        data: memoryview
        if isinstance(source, DeviceBuffer):
            data = memoryview(bytearray(source.nbytes))
            await copy_out(source, 0, data, pinned=False).wait()
        else:
            data = source.data
        size = self.chunk_bytes
        for index in self._chunks(layer):
            if index in self._omit:  # the receiver holds it
                self.omitted += 1
                continue
            offset = (index - self._starts[layer]) * size
            piece = data[offset : offset + size]
            checksum = chunk_checksum(piece)
            self._checksums[index] = checksum
            meta = ChunkMeta(self._tid, index, layer, offset, len(piece), checksum)
            await self._conn.send_chunk(meta, piece)
        return StagingCopy(len(data))

    async def finish(self, timeout: float | None = None) -> SendResult:
        """Wait until the far daemon holds every byte (COMPLETE), or raise why it failed.

        ``TransferError(TIMEOUT)`` when no acknowledgement came within ``timeout``
        seconds: the transfer goes on, and ``finish`` may be awaited again."""
        if self.result is not None:
            return self.result
        self._check_failed()
        missing = [i for i, done in enumerate(self._put) if not done]
        if missing:
            raise KvshipError(f"finish() before layers {missing[:8]} were put")
        try:
            await self._outbox.drain()  # every chunk at the daemon, its checksum known
        except BaseException as exc:
            raise self._failed(exc) from exc
        digest = digest_of_checksums(self._checksums)
        try:
            if not self._ended:
                self._ended = True
                sent = len(self._checksums) - self.omitted
                self._conn.send(End(self._tid, sent, digest))
            done = await asyncio.wait_for(asyncio.shield(self._outcome), timeout)
        except TimeoutError as exc:  # the transfer goes on: finish() may be awaited again
            if self._outcome.done():  # pragma: no cover - it ended just then
                raise self._failed(exc) from exc
            raise TransferError(
                ErrorCode.TIMEOUT, f"no acknowledgement within {timeout} s"
            ) from exc
        except (KvshipError, OSError) as exc:
            raise self._failed(exc) from exc
        if done.digest != digest:
            error = error_for(ErrorCode.DIGEST_MISMATCH, "acknowledged digest differs from sent")
            raise self._failed(error)
        self._release(clean=True)
        self.result = SendResult(
            self.request_id, done.total_bytes, digest, time.perf_counter() - self._started
        )
        return self.result

    async def abort(self) -> None:
        """Cancel the transfer (the far side drops what it received) and close its
        connection. Nothing happens once the transfer finished or already failed."""
        if self._released:
            return
        self._error = self._error or TransferError(ErrorCode.CANCELLED, "aborted by the engine")
        if self._conn.is_open:
            with contextlib.suppress(KvshipError):  # the daemon is gone: nothing to tell
                self._conn.send(Abort(self._tid, ErrorCode.CANCELLED, "cancelled by engine"))
        self._release(clean=False)

    async def __aenter__(self) -> Sender:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.result is None:
            await self.abort()


def _typed(exc: BaseException, conn: EngineConnection) -> KvshipError:
    """``exc`` as the kvship error a caller sees (a guard: the connection maps its own)."""
    if isinstance(exc, KvshipError):
        return exc
    if isinstance(exc, TimeoutError):
        error: KvshipError = TransferError(ErrorCode.TIMEOUT, str(exc) or "timed out")
    elif isinstance(exc, OSError):
        error = conn.lost(exc)
    else:
        error = TransferError(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark the outcome's exception retrieved: a caller may never ask for it."""
    if not task.cancelled():
        task.exception()
