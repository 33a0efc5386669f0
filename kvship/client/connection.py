"""One engine connection to the local daemon, with its shared-memory arena when on a Unix socket.

Every way this connection can fail surfaces as a :mod:`kvship.errors` exception: a
dropped, reset or refused connection as :class:`~kvship.errors.DaemonConnectionLost`
(or :class:`~kvship.errors.DaemonUnavailable` while connecting), a wait past its
deadline as ``TransferError(TIMEOUT)``. Senders and receivers only ever see those.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Callable, Sequence

from ..aio import FramedProtocol, open_connection
from ..errors import DaemonConnectionLost, DaemonUnavailable, KvshipError, TransferError
from ..protocol import (
    CAP_SHM,
    CAP_SKIP,
    ROLE_ENGINE,
    ChunkMeta,
    ErrorCode,
    Frame,
    GoAway,
    Hello,
    HelloAck,
    Release,
    ShmAttach,
    ShmAttached,
)
from ..protocol.errors import code_name
from ..staging import Arena, RingAllocator, StagingCopy, pin, unpin

DEFAULT_SOCKET = "/run/kvship/kvshipd.sock"


def default_address() -> str:
    return os.environ.get("KVSHIP_ADDRESS", DEFAULT_SOCKET)


def is_unix(address: str) -> bool:
    return address.startswith("/") or address.startswith("unix:")


def _arena_pinned(size: int, socket_path: str) -> tuple[Arena, bool]:
    """A new arena, faulted in and pinned where a GPU is: ~0.5 s per GiB, so it runs in a
    worker thread, never on the engine's loop. It is shared with the engine socket's
    group, so a daemon running as another user (systemd's User=kvship) can map it."""
    try:
        group: int | None = os.stat(socket_path).st_gid
    except OSError:
        group = None
    arena = Arena.create(size, group=group)
    try:
        return arena, pin(arena.buffer)
    except BaseException:
        arena.close()
        raise


async def _make_arena(size: int, socket_path: str) -> tuple[Arena, bool]:
    work = asyncio.get_running_loop().run_in_executor(None, _arena_pinned, size, socket_path)
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:  # the worker goes on: close what it makes
        work.add_done_callback(_close_made_arena)
        raise
    except OSError as exc:
        raise KvshipError(f"cannot create a {size} B staging arena: {exc}") from exc


def _close_made_arena(work: asyncio.Future[tuple[Arena, bool]]) -> None:
    if not work.cancelled() and work.exception() is None:
        arena, pinned = work.result()
        if pinned:
            with contextlib.suppress(Exception):
                unpin(arena.buffer)
        arena.close()


class EngineConnection:
    """Routes frames to one consumer (a Sender or Receiver) and owns the arena."""

    def __init__(self, address: str = "") -> None:
        self.address = address
        self.loop = asyncio.get_running_loop()
        self._tids = itertools.count(1)
        # Called with this connection when its transfer ended cleanly (the client's pool).
        self.park: Callable[[EngineConnection], None] | None = None
        # Called once when this connection is closed (the client's set of live ones).
        self.forget: Callable[[EngineConnection], None] | None = None
        self.proto: FramedProtocol | None = None
        self.arena: Arena | None = None
        self.allocator: RingAllocator | None = None
        self.pinned = False
        # Copies into or out of the arena still running: it stays mapped until they end.
        self.copies: set[StagingCopy] = set()
        self._retiring: asyncio.Future[None] | None = None  # held: unmaps after them
        # Frames for the consumer; None marks the end of the connection.
        self.frames: asyncio.Queue[Frame | None] = asyncio.Queue()
        self.failure: BaseException | None = None  # set when the transfer was aborted
        self.space = asyncio.Event()
        self.sink: Callable[[ChunkMeta, int], memoryview] | None = None
        self._attached: asyncio.Future[None] | None = None
        self._closed = False
        self._close_reason: str | None = None  # why this side closed it, if it did
        self._lost_cause: BaseException | None = None  # what the transport reported
        self._goaway: GoAway | None = None

    @classmethod
    async def open(
        cls, address: str, *, arena_bytes: int, use_shm: bool | None, timeout: float
    ) -> EngineConnection:
        """Connect and shake hands, then share an arena of ``arena_bytes`` (if > 0 and on
        a Unix socket). Raises :class:`DaemonUnavailable` when the daemon is not there."""
        self = cls(address)
        shm = is_unix(address) if use_shm is None else use_shm and is_unix(address)
        hello = Hello(
            ROLE_ENGINE, f"engine-{os.getpid()}", capabilities=(CAP_SHM if shm else 0) | CAP_SKIP
        )
        try:
            self.proto = await open_connection(
                address, hello, self._on_frame, self._on_close, timeout=timeout
            )
        except (OSError, ValueError) as exc:  # TimeoutError and ConnectionError included
            reason = str(exc) or f"no handshake within {timeout:g} s (the daemon is not answering)"
            raise DaemonUnavailable(f"cannot reach kvshipd at {address}: {reason}") from exc
        self.proto.conn.payload_sink = self._sink
        if arena_bytes > 0:
            try:
                await self.attach(arena_bytes, timeout)
            except BaseException:
                self.close("the arena attach failed")
                raise
        return self

    @property
    def shm(self) -> bool:
        return self.proto is not None and bool(self.proto.conn.negotiated.capabilities & CAP_SHM)

    @property
    def is_open(self) -> bool:
        return not self._closed and self.proto is not None and self.proto.is_open

    async def attach(self, size: int, timeout: float = 10.0) -> None:
        """Share a staging arena of ``size`` bytes with the daemon (Unix socket only)."""
        if not self.shm or self.arena is not None:
            return
        self.arena, self.pinned = await _make_arena(size, self.address.removeprefix("unix:"))
        self._attached = asyncio.get_running_loop().create_future()
        try:
            self.send(ShmAttach(size, self.arena.path))
            await asyncio.wait_for(self._attached, timeout)
        except TimeoutError as exc:
            raise TransferError(
                ErrorCode.TIMEOUT, f"kvshipd did not map the staging arena within {timeout} s"
            ) from exc
        finally:
            self.arena.unlink()  # both sides have it mapped, or the attach failed
        self.allocator = RingAllocator(size)

    # ------------------------------------------------------------ failures
    def lost(self, cause: BaseException | None = None) -> DaemonConnectionLost:
        """A fresh exception saying why this connection is over (raise it)."""
        cause = cause or self._lost_cause
        if self._close_reason is not None:
            why = self._close_reason
        elif self._goaway is not None:
            why = f"the daemon closed it (GOAWAY {code_name(self._goaway.code)}: "
            why += f"{self._goaway.message})"
        elif cause is not None:
            why = f"{type(cause).__name__}: {cause}"
        else:
            why = "the daemon closed it"
        error = DaemonConnectionLost(f"connection to kvshipd at {self.address} lost: {why}")
        error.__cause__ = cause
        return error

    # ------------------------------------------------------------- sending
    def send(self, frame: Frame) -> None:
        """Queue a control frame; :class:`DaemonConnectionLost` if the connection is gone."""
        proto = self.proto
        if proto is None or not self.is_open:
            raise self.lost()
        try:
            proto.send(frame)
        except (OSError, RuntimeError) as exc:  # RuntimeError: the sans-IO side closed
            if isinstance(exc, RuntimeError) and proto.is_open:
                raise
            raise self.lost(exc) from exc

    async def send_chunk(self, meta: ChunkMeta, data: memoryview) -> None:
        """Send one inline chunk (waits for credit and for the kernel to take it)."""
        proto = self.proto
        if proto is None or not self.is_open:
            raise self.lost()
        try:
            await proto.send_chunk(meta, data)
        except (OSError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and proto.is_open:
                raise
            raise self.lost(exc) from exc

    def grant(self, nbytes: int) -> None:
        """Return flow-control credit for ``nbytes`` consumed (nothing once closed)."""
        if self.proto is not None and self.is_open:
            with contextlib.suppress(OSError):
                self.proto.grant(nbytes)

    # ----------------------------------------------------------- receiving
    def _sink(self, meta: ChunkMeta, nbytes: int) -> tuple[memoryview, object]:
        """The connection's payload sink: the consumer's buffer (no tag: the Receiver
        tracks where its chunks landed itself), else a spare one."""
        if self.sink is not None:
            return self.sink(meta, nbytes), None
        return memoryview(bytearray(nbytes)), None

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
        if isinstance(frame, GoAway):
            self._goaway = frame  # the daemon closes the connection next
            self.space.set()
            self.frames.put_nowait(None)
            return
        self.frames.put_nowait(frame)

    def _on_close(self, proto: FramedProtocol, error: BaseException | None) -> None:
        self._lost_cause = error
        if self._attached is not None and not self._attached.done():
            self._attached.set_exception(self.lost())
        self.space.set()
        self.frames.put_nowait(None)

    async def next_frame(self, timeout: float | None, waiting: str = "") -> Frame:
        """The next frame for this connection's transfer.

        Raises :class:`DaemonConnectionLost` once the connection is over, and
        ``TransferError(TIMEOUT)`` when nothing came for ``timeout`` seconds
        (``waiting`` says what for, in the message)."""
        try:
            item = await asyncio.wait_for(self.frames.get(), timeout)
        except TimeoutError as exc:
            what = waiting or "from kvshipd"
            raise TransferError(ErrorCode.TIMEOUT, f"nothing {what} for {timeout} s") from exc
        if item is None:
            self.frames.put_nowait(None)  # every later wait sees the same end
            raise self.lost()
        return item

    async def allocate(self, lengths: Sequence[int]) -> int:
        """Arena regions of ``lengths`` bytes back to back (the offset of the first),
        waiting for the daemon to release space when the ring has no room for them."""
        assert self.allocator is not None
        while True:
            if self.failure is not None:
                raise self.failure.with_traceback(None)
            offset = self.allocator.allocate_run(lengths)
            if offset is not None:
                return offset
            if not self.is_open or self._goaway is not None:
                raise self.lost()
            self.space.clear()
            await self.space.wait()

    def track(self, copy: StagingCopy) -> StagingCopy:
        """Keep the arena mapped until ``copy`` (which reads or writes it) is over."""
        self.copies = {running for running in self.copies if not running.done()}
        if not copy.done():
            self.copies.add(copy)
        return copy

    def next_tid(self) -> int:
        """A transfer id not used before on this connection (connections are reused)."""
        return next(self._tids)

    @property
    def reusable(self) -> bool:
        return (
            self.is_open
            and self._goaway is None
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

    def close(self, reason: str | None = None) -> None:
        """Close the socket and unmap the arena (idempotent). ``reason``: what a transfer
        still using the connection is told."""
        if self._closed:
            return
        self._closed = True
        self._close_reason = self._close_reason or reason or "this client closed it"
        self.sink = None
        self.space.set()
        if self.proto is not None:
            self.proto.close()
        running = [copy for copy in self.copies if not copy.done()]
        self.copies.clear()
        if running:  # a DMA into unmapped (or unpinned) memory is undefined: wait for it
            self._retiring = asyncio.ensure_future(self._retire_arena(running))
        else:
            self._unmap_arena()
        if self.forget is not None:
            forget, self.forget = self.forget, None
            forget(self)

    async def _retire_arena(self, running: list[StagingCopy]) -> None:
        for copy in running:
            with contextlib.suppress(Exception):  # a failed copy touches nothing more
                await copy.wait()
        self._unmap_arena()

    def _unmap_arena(self) -> None:
        if self.arena is not None:
            if self.pinned:
                with contextlib.suppress(Exception):
                    unpin(self.arena.buffer)
                self.pinned = False
            self.arena.close()
