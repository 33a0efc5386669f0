"""Copies between engine memory and the staging arena: started now, finished later.

A device copy is one ``cudaMemcpyAsync`` on kvship's side stream, ordered after the
engine's stream by an event, so neither the engine's kernels nor its event loop wait for
it; the returned :class:`StagingCopy` says when it is over. CUDA runs a copy to or from
pageable memory (an arena whose pinning failed) synchronously on the calling thread, so
such a copy runs in kvship's copy thread instead. A host copy (numpy) is a memcpy, done
at once or, with ``background=True``, in a worker thread (numpy releases the GIL).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .device import DeviceBuffer, cuda_stream, cupy, device_buffer, side_stream

HostBytes = np.ndarray[Any, np.dtype[np.uint8]]
Source = HostBytes | DeviceBuffer

_copy_thread: ThreadPoolExecutor | None = None


def _thread() -> ThreadPoolExecutor:
    """One thread for every blocking CUDA wait: copies on the side stream end in order."""
    global _copy_thread
    if _copy_thread is None:
        _copy_thread = ThreadPoolExecutor(1, thread_name_prefix="kvship-copy")
    return _copy_thread


class StagingCopy:
    """One copy in flight. ``done()`` polls; ``await wait()`` returns once the bytes are
    all there (raising what the copy raised). ``event``: the CUDA event recorded after a
    device copy (None otherwise), for an engine stream to wait on
    (``stream.wait_event(copy.event)``) without blocking the host."""

    __slots__ = ("_event", "_future", "_keep", "_parts", "nbytes")

    def __init__(
        self,
        nbytes: int,
        *,
        future: asyncio.Future[None] | None = None,
        event: Any = None,
        keep: Any = None,
        parts: Sequence[StagingCopy] = (),
    ) -> None:
        self.nbytes = nbytes
        self._future = future
        self._event = event
        self._keep = keep  # the memory the copy reads or writes, alive until it is over
        self._parts = tuple(parts)

    @classmethod
    def joined(cls, copies: Sequence[StagingCopy]) -> StagingCopy:
        """One handle for several copies (the groups of one layer): done when all are;
        its event is the last one's (device copies of a layer share one stream)."""
        if len(copies) == 1:
            return copies[0]
        event = copies[-1].event if copies else None
        return cls(sum(copy.nbytes for copy in copies), event=event, parts=copies)

    @property
    def event(self) -> Any:
        return self._event

    def done(self) -> bool:
        if self._parts:
            return all(part.done() for part in self._parts)
        if self._future is not None:
            return self._future.done()
        if self._event is not None:
            return bool(self._event.done)  # pragma: no cover - GPU only
        return True

    def error(self) -> BaseException | None:
        """What a copy that is over raised, if anything."""
        for part in self._parts:
            error = part.error()
            if error is not None:
                return error
        future = self._future
        if future is None or not future.done():
            return None
        return asyncio.CancelledError() if future.cancelled() else future.exception()

    async def wait(self) -> None:
        for part in self._parts:
            await part.wait()
        if self._future is not None:
            await asyncio.shield(self._future)  # a running copy cannot be called off
        elif self._event is not None and not self._parts and not self._event.done:
            await asyncio.get_running_loop().run_in_executor(  # pragma: no cover - GPU
                _thread(), self._event.synchronize
            )
        self._keep = None


def source_of(array: Any) -> Source:
    """The bytes of ``array`` to stage: a device buffer, or a flat uint8 host array."""
    buffer = device_buffer(array)
    if buffer is not None:
        return buffer
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def copy_out(
    source: Source,
    offset: int,
    dst: memoryview,
    *,
    pinned: bool,
    stream: Any = None,
    background: bool = False,
) -> StagingCopy:
    """Copy ``source[offset : offset + len(dst)]`` into ``dst`` (an arena region)."""
    nbytes = len(dst)
    if isinstance(source, DeviceBuffer):
        if offset < 0 or offset + nbytes > source.nbytes:
            raise ValueError(f"bytes {offset}+{nbytes} outside a {source.nbytes} B array")
        return _device_copy(  # pragma: no cover - GPU only
            _host_address(dst),
            source.ptr + offset,
            nbytes,
            cupy.cuda.runtime.memcpyDeviceToHost,
            source.device,
            stream,
            pinned,
            keep=source,
        )
    piece = source[offset : offset + nbytes]
    if len(piece) != nbytes:
        raise ValueError(f"bytes {offset}+{nbytes} outside a {len(source)} B array")
    host = np.frombuffer(dst, np.uint8)
    if background:
        loop = asyncio.get_running_loop()
        return StagingCopy(nbytes, future=loop.run_in_executor(None, np.copyto, host, piece))
    np.copyto(host, piece)
    return StagingCopy(nbytes)


def copy_in(
    src: memoryview, target: Any, *, pinned: bool, stream: Any = None, background: bool = False
) -> StagingCopy:
    """Copy the staged bytes ``src`` into ``target`` (a device array, or a numpy array),
    which must be contiguous and exactly ``len(src)`` bytes. ``background``: a host copy
    runs in a worker thread (a device copy is asynchronous anyway)."""
    buffer = device_buffer(target)
    if buffer is None:
        if not isinstance(target, np.ndarray) or not target.flags.c_contiguous:
            raise ValueError("the target must be a contiguous numpy or GPU array")
        if target.nbytes != len(src):
            raise ValueError(f"the target is {target.nbytes} B, the layer {len(src)} B")
        host, staged = target.reshape(-1).view(np.uint8), np.frombuffer(src, np.uint8)
        if background:
            loop = asyncio.get_running_loop()
            work = loop.run_in_executor(None, np.copyto, host, staged)
            return StagingCopy(len(src), future=work, keep=src)
        np.copyto(host, staged)
        return StagingCopy(len(src))
    if buffer.nbytes != len(src):
        raise ValueError(f"the target is {buffer.nbytes} B, the layer {len(src)} B")
    return _device_copy(  # pragma: no cover - GPU only
        buffer.ptr,
        _host_address(src),
        len(src),
        cupy.cuda.runtime.memcpyHostToDevice,
        buffer.device,
        stream,
        pinned,
        keep=(buffer, src),
    )


def _host_address(view: memoryview) -> int:
    return int(np.frombuffer(view, np.uint8).ctypes.data)


def _device_copy(  # pragma: no cover - GPU only
    dst: int,
    src: int,
    nbytes: int,
    kind: int,
    device: int,
    stream: Any,
    pinned: bool,
    keep: Any,
) -> StagingCopy:
    """One async copy on the side stream, after whatever ``stream`` has queued so far."""
    with cupy.cuda.Device(device):
        side = side_stream(device)
        engine = cuda_stream(stream)
        if engine.ptr != side.ptr:
            side.wait_event(engine.record())
        if not pinned:  # CUDA would block this thread for the whole copy
            loop = asyncio.get_running_loop()
            work = loop.run_in_executor(
                _thread(), _blocking_copy, dst, src, nbytes, kind, device, side
            )
            return StagingCopy(nbytes, future=work, keep=keep)
        cupy.cuda.runtime.memcpyAsync(dst, src, nbytes, kind, side.ptr)
        done = cupy.cuda.Event(block=False, disable_timing=True)
        done.record(side)
        return StagingCopy(nbytes, event=done, keep=keep)


def _blocking_copy(  # pragma: no cover - GPU only
    dst: int, src: int, nbytes: int, kind: int, device: int, side: Any
) -> None:
    with cupy.cuda.Device(device):
        cupy.cuda.runtime.memcpyAsync(dst, src, nbytes, kind, side.ptr)
        side.synchronize()
