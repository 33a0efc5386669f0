"""One connection of the kit to the implementation under test: raw bytes out, frames in.

Every read is bounded in time; frames the target sends are decoded and checked with
:mod:`.wire` (a malformed frame from the target fails the check that got it). CREDIT
frames are counted into :attr:`Link.credit` as they arrive; :meth:`Link.next` skips them
unless asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections import deque
from dataclasses import dataclass, field

from . import wire
from .wire import Fields, WireError

_HOSTPORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^/\[\]]+):(\d+)$")


class CheckFailed(Exception):
    """The implementation did something the SPEC does not allow (the check fails)."""


class CheckSkipped(Exception):
    """The check does not apply to this target (a capability it does not offer, ...)."""


def is_unix(address: str) -> bool:
    """``host:port`` / ``[v6]:port`` is TCP; anything else is a Unix socket path."""
    return _HOSTPORT.match(address) is None


@dataclass
class Frame:
    """A frame the target sent: its §4 name (None for an unknown type) and fields."""

    ftype: int
    flags: int
    body: bytes
    name: str | None
    fields: Fields = field(default_factory=dict)

    def describe(self) -> str:
        if self.name == "GOAWAY":
            code = wire.error_name(self.fields["code"])
            return f"GOAWAY {code} ({self.fields['message']!r})"
        if self.name == "ABORT":
            code = wire.error_name(self.fields["code"])
            tid = self.fields["transfer_id"]
            return f"ABORT {code} of transfer {tid:#x} ({self.fields['message']!r})"
        return self.name or f"frame type 0x{self.ftype:02x}"


def describe_all(frames: list[Frame]) -> str:
    return ", ".join(f.describe() for f in frames) or "no frame"


class Link:
    """An open connection (TCP or Unix socket) to the target."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        address: str,
        timeout: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.address = address
        self.timeout = timeout
        self.ack: Fields | None = None
        self.credit = 0  # chunk bytes we may still send (ours to track, §10)
        self.credit_received = 0  # sum of every CREDIT increment received
        self.received: list[Frame] = []  # everything read, in order
        self.eof = False
        self._stash: deque[Frame] = deque()

    @classmethod
    async def open(cls, address: str, timeout: float) -> Link:
        try:
            if is_unix(address):
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(address, limit=1 << 20), timeout
                )
            else:
                m = _HOSTPORT.match(address)
                assert m is not None
                host = m.group(1).strip("[]")
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, int(m.group(2)), limit=1 << 20), timeout
                )
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, TimeoutError) as exc:
            raise CheckFailed(f"cannot connect to {address}: {exc!r}") from exc
        return cls(reader, writer, address, timeout)

    # ------------------------------------------------------------------ writing
    async def send(self, data: bytes) -> None:
        """Write bytes; a target that already closed is not an error here (its GOAWAY,
        if any, is still read by the caller)."""
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), self.timeout)
        except TimeoutError:  # an OSError too: the target stopped reading
            raise
        except (ConnectionError, OSError):
            pass

    async def send_frame(self, name: str, fields: Fields | None = None, flags: int = 0) -> None:
        await self.send(wire.encode(name, fields, flags))

    def half_close(self) -> None:
        if self.writer.can_write_eof():
            with contextlib.suppress(OSError):
                self.writer.write_eof()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    # ------------------------------------------------------------------ reading
    async def _read(self, timeout: float) -> Frame | None:
        """The next frame off the socket; None at EOF or reset; TimeoutError if none came."""
        if self.eof:
            return None
        try:
            head = await asyncio.wait_for(self.reader.readexactly(wire.HEADER_SIZE), timeout)
            length, ftype, flags, reserved = wire.HEADER.unpack(head)
            body = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        except TimeoutError:  # an OSError too: not an EOF
            raise
        except asyncio.IncompleteReadError as exc:
            self.eof = True
            if exc.partial:
                raise CheckFailed(
                    f"the target closed inside a frame ({len(exc.partial)} B of it)"
                ) from None
            return None
        except (ConnectionError, OSError):
            self.eof = True
            return None
        if reserved:
            raise CheckFailed(f"the target sent frame 0x{ftype:02x} with reserved header bits")
        name = wire.TYPE_NAMES.get(ftype)
        frame = Frame(ftype, flags, body, name)
        if name is not None:
            try:
                frame.fields = wire.decode_body(name, body)
            except WireError as exc:
                raise CheckFailed(f"the target sent a malformed {name}: {exc}") from None
        self.received.append(frame)
        if name == "CREDIT":
            self.credit += frame.fields["increment"]
            self.credit_received += frame.fields["increment"]
        return frame

    async def next(self, timeout: float | None = None, *, credits: bool = False) -> Frame | None:
        """The next frame (CREDIT skipped unless ``credits``); None at EOF.
        TimeoutError if nothing came within ``timeout`` (default: the link's)."""
        if self._stash:
            return self._stash.popleft()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError
            frame = await self._read(left)
            if frame is None or credits or frame.name != "CREDIT":
                return frame

    def unread(self, frame: Frame) -> None:
        """Put ``frame`` back: the next :meth:`next` returns it again."""
        if self.received and self.received[-1] is frame:
            self.received.pop()
        self._stash.appendleft(frame)

    async def wait_credit(self, nbytes: int, timeout: float | None = None) -> bool:
        """Read CREDIT until ``nbytes`` are covered (other frames are kept for :meth:`next`);
        False if the window stayed short for ``timeout`` seconds or the link closed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        while self.credit < nbytes:
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                frame = await self._read(left)
            except TimeoutError:
                return False
            if frame is None:
                return False
            if frame.name != "CREDIT":
                self._stash.append(frame)
        return True

    async def until_closed(self, timeout: float | None = None) -> list[Frame]:
        """Every frame up to the target's close (TimeoutError if it keeps it open)."""
        frames = list(self._stash)
        self._stash.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError
            frame = await self._read(left)
            if frame is None:
                return frames
            frames.append(frame)

    # --------------------------------------------------------------- handshake
    async def handshake(self, hello: Fields) -> Fields:
        """MAGIC + HELLO, then the target's HELLO_ACK (CheckFailed on anything else)."""
        await self.send(wire.MAGIC + wire.encode("HELLO", hello))
        try:
            frame = await self.next(credits=True)
        except TimeoutError:
            raise CheckFailed("no HELLO_ACK within the timeout") from None
        if frame is None:
            raise CheckFailed("the target closed the connection instead of answering HELLO")
        if frame.name != "HELLO_ACK":
            raise CheckFailed(f"expected HELLO_ACK, got {frame.describe()}")
        self.ack = frame.fields
        self.credit = frame.fields["initial_window"]
        return frame.fields

    @property
    def limits(self) -> Fields:
        assert self.ack is not None, "handshake first"
        return self.ack

    def has(self, cap: int) -> bool:
        return self.ack is not None and bool(self.ack["capabilities"] & cap)
