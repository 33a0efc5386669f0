"""One engine connection to the local daemon, with its shared-memory arena when on a Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Callable

from ..aio import FramedProtocol, open_connection
from ..errors import DaemonUnavailable
from ..protocol import (
    CAP_SHM,
    ROLE_ENGINE,
    ChunkMeta,
    Frame,
    GoAway,
    Hello,
    HelloAck,
    Release,
    ShmAttach,
    ShmAttached,
)
from ..staging import Arena, RingAllocator, pin, unpin

DEFAULT_SOCKET = "/run/kvship/kvshipd.sock"


def default_address() -> str:
    return os.environ.get("KVSHIP_ADDRESS", DEFAULT_SOCKET)


def is_unix(address: str) -> bool:
    return address.startswith("/") or address.startswith("unix:")


class EngineConnection:
    """Routes frames to one consumer (a Sender or Receiver) and owns the arena."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._tids = itertools.count(1)
        # Called with this connection when its transfer ended cleanly (the client's pool).
        self.park: Callable[[EngineConnection], None] | None = None
        self.proto: FramedProtocol | None = None
        self.arena: Arena | None = None
        self.allocator: RingAllocator | None = None
        self.pinned = False
        self.frames: asyncio.Queue[Frame | BaseException] = asyncio.Queue()
        self.failure: BaseException | None = None  # set when the transfer was aborted
        self.space = asyncio.Event()
        self.sink: Callable[[ChunkMeta, int], memoryview] | None = None
        self._attached: asyncio.Future[None] | None = None

    @classmethod
    async def open(
        cls, address: str, *, arena_bytes: int, use_shm: bool | None, timeout: float
    ) -> EngineConnection:
        self = cls()
        shm = is_unix(address) if use_shm is None else use_shm and is_unix(address)
        hello = Hello(ROLE_ENGINE, f"engine-{os.getpid()}", capabilities=CAP_SHM if shm else 0)
        try:
            self.proto = await open_connection(
                address, hello, self._on_frame, self._on_close, timeout=timeout
            )
        except (OSError, TimeoutError, ValueError) as exc:
            raise DaemonUnavailable(f"cannot reach kvshipd at {address}: {exc}") from exc
        self.proto.conn.payload_sink = self._sink
        if arena_bytes > 0:
            await self.attach(arena_bytes, timeout)
        return self

    @property
    def shm(self) -> bool:
        return self.proto is not None and bool(self.proto.conn.negotiated.capabilities & CAP_SHM)

    async def attach(self, size: int, timeout: float = 10.0) -> None:
        """Share a staging arena of ``size`` bytes with the daemon (Unix socket only)."""
        if not self.shm or self.arena is not None:
            return
        assert self.proto is not None
        self.arena = Arena.create(size)
        self.pinned = pin(self.arena.buffer)
        self._attached = asyncio.get_running_loop().create_future()
        try:
            self.proto.send(ShmAttach(size, self.arena.path))
            await asyncio.wait_for(self._attached, timeout)
        finally:
            self.arena.unlink()  # both sides have it mapped, or the attach failed
        self.allocator = RingAllocator(size)

    def _sink(self, meta: ChunkMeta, nbytes: int) -> memoryview:
        if self.sink is not None:
            return self.sink(meta, nbytes)
        return memoryview(bytearray(nbytes))

    def _on_frame(self, proto: FramedProtocol, frame: Frame) -> None:
        if isinstance(frame, HelloAck):
            return  # open_connection() consumes it through the handshake future
        if isinstance(frame, ShmAttached) and self._attached is not None:
            if not self._attached.done():
                self._attached.set_result(None)
            return
        if isinstance(frame, Release) and self.allocator is not None:
            self.allocator.release(frame.arena_offset, frame.length)
            self.space.set()
            return
        self.frames.put_nowait(frame)

    def _on_close(self, proto: FramedProtocol, error: BaseException | None) -> None:
        reason = error if error is not None else ConnectionError("daemon closed the connection")
        if self._attached is not None and not self._attached.done():
            self._attached.set_exception(DaemonUnavailable(f"arena attach failed: {reason}"))
        self.space.set()
        self.frames.put_nowait(
            reason if isinstance(reason, BaseException) else ConnectionError(str(reason))
        )

    async def next_frame(self, timeout: float | None) -> Frame:
        item = await asyncio.wait_for(self.frames.get(), timeout)
        if isinstance(item, BaseException):
            self.frames.put_nowait(item)  # every later wait sees the same end
            raise item
        if isinstance(item, GoAway):
            raise ConnectionError(f"daemon closed the connection: {item.message}")
        return item

    async def allocate(self, nbytes: int) -> int:
        """An arena region, waiting for the daemon to release space when full."""
        assert self.allocator is not None
        while True:
            if self.failure is not None:
                raise self.failure
            offset = self.allocator.allocate(nbytes)
            if offset is not None:
                return offset
            if self.proto is None or not self.proto.is_open:
                raise ConnectionError("connection to the daemon closed")
            self.space.clear()
            await self.space.wait()

    def next_tid(self) -> int:
        """A transfer id not used before on this connection (connections are reused)."""
        return next(self._tids)

    @property
    def reusable(self) -> bool:
        return (
            self.proto is not None
            and self.proto.is_open
            and self.failure is None
            and self.frames.empty()
            and self.loop is asyncio.get_running_loop()
        )

    def done(self, clean: bool) -> None:
        """The transfer on this connection ended: back to the client's pool if it ended
        cleanly (the arena and the socket are kept warm), else closed."""
        self.sink = None
        if clean and self.park is not None and self.reusable:
            self.park(self)
        else:
            self.close()

    def fail(self, error: BaseException) -> None:
        """The transfer is over with ``error``: wake whoever waits for arena space."""
        self.failure = error
        self.space.set()

    def close(self) -> None:
        if self.proto is not None:
            self.proto.close()
        if self.arena is not None:
            if self.pinned:
                with contextlib.suppress(Exception):
                    unpin(self.arena.buffer)
            self.arena.close()
