"""FramedProtocol: an asyncio BufferedProtocol that feeds a sans-IO Connection.

Receiving: ``get_buffer`` returns the Connection's ``read_buffer()``: a chunk's data goes
straight to where it belongs (its arena slot); anything else is read in bulk, many small
frames per system call, and handed to the handler one frame at a time.
Sending: chunk data is written from the caller's memoryview without a copy (header and
data in one writev; the control frames of one loop turn in one write); uvloop keeps a
reference until the kernel took it, so :meth:`send_chunk` waits for the write buffer to
drain before returning, and only then may the caller reuse the memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

from ..addresses import split_hostport
from ..protocol import (
    Ack,
    AuthChallenge,
    ChunkMeta,
    Connection,
    Credit,
    ErrorCode,
    Frame,
    GoAway,
    Hello,
    HelloAck,
    LocalProtocolError,
    ProtocolError,
    Role,
    pad_header,
)
from ..protocol.auth import PeerKey
from ..protocol.errors import code_name

log = logging.getLogger("kvship.wire")

PAD_PIECE = 64 * 1024  # the largest PAD frame send_padding writes
_ZEROS = memoryview(bytes(PAD_PIECE))

FrameHandler = Callable[["FramedProtocol", Frame], None]
CloseHandler = Callable[["FramedProtocol", BaseException | None], None]


@runtime_checkable
class StreamTransport(Protocol):
    """What FramedProtocol needs of its transport: asyncio's stream transports and uvloop's
    (which are not subclasses of ``asyncio.Transport``) both have it."""

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...
    def is_closing(self) -> bool: ...
    def close(self) -> None: ...
    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None: ...
    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...


class GrantPolicy(Protocol):
    """Decides how much credit a grant really returns: a receive window that grows or
    shrinks (daemon.window) adds to it or keeps some back."""

    def adjust(self, consumed: int) -> int:
        """The credit to send for ``consumed`` bytes just consumed (>= 0)."""
        ...

    def close(self) -> None:
        """The connection is gone: give back what the window borrowed."""
        ...


class FramedProtocol(asyncio.BufferedProtocol):
    def __init__(
        self,
        conn: Connection,
        on_frame: FrameHandler,
        on_close: CloseHandler | None = None,
        on_error: Callable[[ProtocolError], None] | None = None,
    ) -> None:
        self.conn = conn
        self.on_frame = on_frame
        self.on_close = on_close
        self.on_error = on_error
        self.transport: StreamTransport | None = None
        self.error: BaseException | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._drained = asyncio.Event()
        self._drained.set()
        self._credit = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._pending_grant = 0
        self.grant_policy: GrantPolicy | None = None  # None: credit back = bytes consumed
        # Control frames queued this loop turn, written together (one syscall) at its end
        # or before anything else is written, so their order on the wire is kept; the
        # turn's ACKs (per transfer) and credit join them as one ACK and one CREDIT frame.
        self._corked: list[bytes] = []
        self._acks: dict[int, list[int]] = {}
        self._flush_scheduled = False
        self.peername: str = "?"
        # When the last whole frame arrived: a link whose peer answers nothing (a flipped
        # length bit has its reader waiting for a body that never comes) is found by it.
        self.last_frame_at = asyncio.get_running_loop().time()
        self.handshake: asyncio.Future[HelloAck | Hello | GoAway] = (
            asyncio.get_running_loop().create_future()
        )
        # Only an initiator awaits this; an acceptor whose peer vanished mid-handshake
        # must not log "exception never retrieved" on top of the specific error.
        self.handshake.add_done_callback(_consume)

    # ----------------------------------------------------------- asyncio API
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, StreamTransport):
            raise TypeError(f"FramedProtocol needs a stream transport, got {transport!r}")
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        peer = transport.get_extra_info("peername")
        self.peername = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        # Pause as soon as anything is left unsent: "resumed" then means "drained", which
        # is when memory handed to write() may be reused.
        transport.set_write_buffer_limits(high=0, low=0)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.conn.closed or self.conn.pending:
            return memoryview(bytearray(65536))  # discard what arrives after a failure
        return self.conn.read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        """Hand each frame of the read to the handler before the bytes after it are
        parsed (one read may hold many small frames)."""
        if self.conn.closed:
            return
        try:
            frames = self.conn.buffer_updated(nbytes)
            while True:
                for frame in frames:
                    self._on_frame(frame)
                if not self.conn.pending or self.conn.closed:
                    return
                if self.transport is None or self.transport.is_closing():
                    return  # closed by a handler: the rest of the read is not wanted
                frames = self.conn.next_frames()
        except ProtocolError as exc:
            self.fail(exc)

    def _on_frame(self, frame: Frame) -> None:
        self.last_frame_at = asyncio.get_running_loop().time()
        if isinstance(frame, Credit):
            self._credit.set()
        if isinstance(frame, Hello | HelloAck | GoAway) and not self.handshake.done():
            self.handshake.set_result(frame)
        if isinstance(frame, AuthChallenge):  # an initiator proving its key (SPEC §6.4)
            self.write(self.conn.prove())
            return
        try:
            self.on_frame(self, frame)
        except ProtocolError as exc:
            self.fail(exc)
        except Exception as exc:
            log.exception("handler failed on %s from %s", type(frame).__name__, self.peername)
            self.fail(ProtocolError(ErrorCode.INTERNAL_ERROR, f"handler failed: {exc!r}"))
        if isinstance(frame, GoAway):
            self.close()  # SPEC §5.10: the receiver closes on receipt (the core is CLOSED)

    def eof_received(self) -> bool:
        self._flush_corked()  # answers to the last frames leave before the close
        if self.conn.pending:  # a handler closed it mid-read: the rest is not wanted
            return False
        try:
            self.conn.receive_eof()
        except ProtocolError as exc:
            self.fail(exc)
        return False

    def pause_writing(self) -> None:
        self._drained.clear()

    def resume_writing(self) -> None:
        self._drained.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.error is None and exc is not None:
            self.error = exc
        self._drained.set()
        self._credit.set()
        if self.grant_policy is not None:
            self.grant_policy.close()
            self.grant_policy = None
        if not self.handshake.done():
            self.handshake.set_exception(
                ConnectionError(f"connection to {self.peername} closed during the handshake")
            )
        if not self.closed.done():
            self.closed.set_result(self.error)
        if self.on_close is not None:
            self.on_close(self, self.error)

    # --------------------------------------------------------------- sending
    @property
    def is_open(self) -> bool:
        return (
            self.transport is not None
            and not self.transport.is_closing()
            and not (self.conn.closed)
        )

    def _check_writable(self) -> StreamTransport:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError(f"connection to {self.peername} is closed")
        return self.transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        transport = self._check_writable()
        queued = self._take_corked()
        if queued:
            transport.writelines([*queued, data])
        else:
            transport.write(data)

    def send(self, frame: Frame) -> None:
        """Queue a control frame (fire and forget: control frames are small). Frames sent
        in one loop turn leave in one write at its end: a burst of RELEASEs or SHM_CHUNKs
        costs one system call, not one each."""
        self._check_writable()
        self._corked.append(self.conn.send(frame))
        self._schedule_flush()

    def ack(self, transfer_id: int, chunk_index: int) -> None:
        """Acknowledge a held chunk (SPEC §5.20): one ACK frame per transfer and loop turn,
        in the same write as the turn's CREDIT, so a received chunk costs the receiver one
        system call for both rather than two."""
        self._acks.setdefault(transfer_id, []).append(chunk_index)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_corked)

    def _take_corked(self) -> list[bytes]:
        """Everything queued, as bytes in wire order: control frames, then the ACKs and
        credit of this turn (only while the connection is open: a failed one's GOAWAY
        is its last frame)."""
        corked, self._corked = self._corked, []
        acks, self._acks = self._acks, {}
        pending, self._pending_grant = self._pending_grant, 0
        if self.conn.closed:
            return corked
        for tid, chunks in acks.items():
            with contextlib.suppress(LocalProtocolError):  # an ACK the state forbids now
                corked.append(self.conn.send(Ack(tid, tuple(chunks))))
        if pending:
            corked.append(self.conn.grant(pending))
        return corked

    def _flush_corked(self) -> None:
        self._flush_scheduled = False
        queued = self._take_corked()
        if queued and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(queued)

    def send_padding(self, nbytes: int) -> None:
        """One PAD frame of ``nbytes`` (at most PAD_PIECE) for the peer to drop (SPEC
        §5.23): traffic that opens a new connection's congestion window."""
        transport = self._check_writable()
        transport.writelines([*self._take_corked(), pad_header(nbytes), _ZEROS[:nbytes]])

    async def drain(self) -> None:
        """Wait until everything written so far has been handed to the kernel."""
        await self._drained.wait()
        if not self.is_open and self.transport is not None and self.transport.is_closing():
            raise ConnectionError(f"connection to {self.peername} closed: {self.error}")

    async def send_chunk(self, meta: ChunkMeta, data: memoryview) -> None:
        """Send one chunk, waiting for credit; returns once ``data`` may be reused."""
        async with self._send_lock:
            while self.conn.send_credit < len(data):
                if not self.is_open:
                    raise ConnectionError(f"connection to {self.peername} closed: {self.error}")
                self._credit.clear()
                await self._credit.wait()
            transport = self._check_writable()
            header = self.conn.chunk_header(meta, len(data))
            transport.writelines([*self._take_corked(), header, data])  # one writev
            await self.drain()

    def grant(self, nbytes: int) -> None:
        """Return ``nbytes`` of credit to the peer, coalesced into few CREDIT frames.

        Grants made while one batch of received data is processed go out together at the
        end of this loop iteration (or at once past an eighth of the window, with whatever
        else is queued), so a busy receiver sends one CREDIT per burst rather than one per
        chunk.
        """
        if self.grant_policy is not None:
            nbytes = self.grant_policy.adjust(nbytes)
        self._pending_grant += nbytes
        if self._pending_grant >= self.conn.limits.initial_window // 8:
            self._flush_corked()
        elif self._pending_grant:
            self._schedule_flush()

    def fail(self, error: ProtocolError) -> None:
        """Close this connection because of ``error`` (after telling the peer why)."""
        if self.error is None:
            self.error = error
        if self.on_error is not None:
            self.on_error(error)
        # A refused handshake repeats as long as the peer's key is wrong: one line per
        # remote host and code per interval (logs.RepeatFilter). Other errors are one-offs
        # worth a line per connection.
        host = self.peername.rsplit(":", 1)[0]
        repeat = host if error.code is ErrorCode.AUTH_FAILED else self.peername
        log.warning(
            "closing connection %s: %s",
            self.peername,
            error,
            extra={"peer": self.peername, "cause": f"{repeat} {error.code.name}"},
        )
        goaway = self.conn.close(error)  # CLOSED from now on; b"" if a GOAWAY went out
        if self.transport is not None and not self.transport.is_closing():
            self._flush_corked()
            if goaway:
                with contextlib.suppress(Exception):
                    self.transport.write(goaway)
            self.transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self._flush_corked()  # what was sent before the close still leaves
            self.transport.close()


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def open_connection(
    address: str,
    hello: Hello,
    on_frame: FrameHandler,
    on_close: CloseHandler | None = None,
    *,
    timeout: float = 10.0,
    key: PeerKey | None = None,
    tls: ssl.SSLContext | None = None,
) -> FramedProtocol:
    """Connect to ``host:port``, ``[v6]:port`` or a Unix socket path, and shake hands:
    proving ``key`` where given (and requiring the far end to prove it too), over TLS
    where ``tls`` is given (its certificate must name ``host``)."""
    loop = asyncio.get_running_loop()
    conn = Connection(role=Role.of_hello(hello.role, True), initiator=True, key=key)

    def factory() -> FramedProtocol:
        return FramedProtocol(conn, on_frame, on_close)

    async def connect() -> FramedProtocol:
        if address.startswith("/") or address.startswith("unix:"):
            path = address.removeprefix("unix:")
            _, proto = await loop.create_unix_connection(factory, path)
        else:
            host, port = split_hostport(address)
            _, proto = await loop.create_connection(
                factory, host, port, ssl=tls, server_hostname=host if tls else None
            )
        proto.write(conn.initiate(hello))
        reply = await proto.handshake
        if isinstance(reply, GoAway):
            raise ConnectionRefusedError(
                f"{address} refused the handshake: {code_name(reply.code)}: {reply.message}"
            )
        if not isinstance(reply, HelloAck):
            raise ConnectionError(f"{address} answered the handshake with {reply!r}")
        return proto

    return await asyncio.wait_for(connect(), timeout)
