"""The sans-IO kvship connection: bytes in, frames (events) out; frames in, bytes out.

No sockets, no asyncio, no threads: the IO layer feeds bytes with :meth:`receive_data`,
or, for zero-copy receives, asks :meth:`read_buffer` where the next bytes should land
and reports them with :meth:`buffer_updated`. A CHUNK's data lands in whatever buffer
the ``payload_sink`` callback hands out (an arena slot, say), so a chunk crosses user
space without being copied by the protocol layer.

The machine enforces everything a peer could get wrong: preface, version negotiation,
frame-size limits, frame order, transfer bookkeeping per stripe, chunk geometry and
flow-control credit. Any violation raises :class:`ProtocolError` and the connection is
dead from then on (``closed`` is True); :meth:`goaway_for` gives the bytes to send.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto

from .errors import ErrorCode, ProtocolError
from .frames import (
    CAP_CODECS,
    CAP_STRIPING,
    CODEC_RAW,
    DECODERS,
    FLAG_IGNORABLE,
    HANDSHAKE_MAX_BODY,
    HEADER,
    HEADER_SIZE,
    KNOWN_CAPS,
    KNOWN_CODECS,
    MAGIC,
    MAX_WINDOW,
    MIN_VERSION,
    PROTOCOL_VERSION,
    Abort,
    Chunk,
    ChunkMeta,
    Credit,
    End,
    Frame,
    FrameType,
    GoAway,
    Hello,
    HelloAck,
    Open,
    ShmChunk,
    chunk_table,
)

KIB = 1024
MIB = 1024 * KIB
MAX_CHUNKS = 1 << 20  # per transfer: bounds the receiver's per-chunk bookkeeping (~9 MiB)
FORGOTTEN_MAX = 1024  # ended transfers whose late chunks are still dropped quietly


@dataclass(frozen=True, slots=True)
class Limits:
    """What this side accepts; the acceptor announces its limits in HELLO_ACK."""

    max_frame: int = 16 * MIB + 64  # body bytes, any frame
    max_chunk: int = 4 * MIB  # raw bytes of one chunk
    max_transfers: int = 64  # transfers open at once on one connection
    initial_window: int = 16 * MIB  # chunk bytes the peer may send before a CREDIT


class State(Enum):
    AWAIT_PREFACE = auto()  # acceptor: waiting for MAGIC
    AWAIT_HELLO = auto()  # acceptor: waiting for HELLO
    AWAIT_ACCEPT = auto()  # acceptor: HELLO seen, the application has not answered yet
    AWAIT_ACK = auto()  # initiator: HELLO sent, waiting for HELLO_ACK
    OPEN = auto()
    CLOSED = auto()


class _Read(Enum):
    PREFACE = auto()
    HEADER = auto()
    BODY = auto()
    CHUNK_META = auto()
    CHUNK_DATA = auto()


@dataclass(slots=True)
class _Incoming:
    """Per-connection view of a transfer the peer opened here (one stripe of it)."""

    open: Open
    starts: list[int]
    chunks_seen: int = 0


PayloadSink = Callable[[ChunkMeta, int], memoryview]
"""Returns a writable buffer of exactly ``wire_length`` bytes for a chunk's data."""


def _default_sink(meta: ChunkMeta, wire_length: int) -> memoryview:
    return memoryview(bytearray(wire_length))


@dataclass(slots=True)
class _Negotiated:
    version: int = 0
    capabilities: int = 0
    peer_limits: Limits = field(default_factory=Limits)
    peer_name: str = ""
    peer_role: int = 0


class Connection:
    """One kvship connection, either end. See the module docstring."""

    def __init__(
        self,
        *,
        initiator: bool,
        limits: Limits | None = None,
        payload_sink: PayloadSink | None = None,
    ) -> None:
        self.initiator = initiator
        self.limits = limits or Limits()
        self.payload_sink: PayloadSink = payload_sink or _default_sink
        self.state = State.AWAIT_ACK if initiator else State.AWAIT_PREFACE
        self.negotiated = _Negotiated()
        self.send_credit = 0  # chunk bytes we may still send
        self.recv_window = 0  # chunk bytes the peer may still send us
        self._incoming: dict[int, _Incoming] = {}
        # Transfers this side ended on its own (ABORT sent): chunks the peer had already
        # put on the wire keep arriving for a while and are dropped, not a protocol error.
        self._forgotten: OrderedDict[int, None] = OrderedDict()
        self._read = _Read.HEADER if initiator else _Read.PREFACE
        self._scratch = memoryview(bytearray(ChunkMeta.FIXED.size))
        self._buf: memoryview = self._scratch[: len(MAGIC) if not initiator else HEADER_SIZE]
        self._filled = 0
        self._frame_type = 0
        self._frame_flags = 0
        self._body_length = 0
        self._chunk_meta: ChunkMeta | None = None
        self._started = False
        self._hello: Hello | None = None  # what initiate() offered, to check the ACK against

    # ------------------------------------------------------------------ state
    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def open_transfers(self) -> int:
        return len(self._incoming)

    def _fail(self, code: ErrorCode, message: str) -> ProtocolError:
        self.state = State.CLOSED
        return ProtocolError(code, message)

    # ------------------------------------------------------------- handshake
    def initiate(self, hello: Hello) -> bytes:
        """The connecting side's first bytes: the preface and HELLO."""
        if not self.initiator or self._started:
            raise RuntimeError("initiate() is for a fresh initiator connection")
        self._started = True
        self._hello = hello
        return MAGIC + hello.encode()

    def accept(self, node_name: str = "", capabilities: int = KNOWN_CAPS) -> bytes:
        """Answer the HELLO the peer sent (after the application checked it)."""
        if self.state is not State.AWAIT_ACCEPT:
            raise RuntimeError(f"accept() in state {self.state.name}")
        neg = self.negotiated
        neg.capabilities &= capabilities
        neg.peer_limits = self.limits  # both ends enforce the acceptor's limits
        self.state = State.OPEN
        self.recv_window = self.limits.initial_window
        self.send_credit = self.limits.initial_window
        ack = HelloAck(
            neg.version,
            neg.capabilities,
            self.limits.initial_window,
            self.limits.max_frame,
            self.limits.max_chunk,
            self.limits.max_transfers,
            node_name,
        )
        return ack.encode()

    def _on_hello(self, hello: Hello) -> None:
        version = min(PROTOCOL_VERSION, hello.max_version)
        if version < max(MIN_VERSION, hello.min_version):
            raise self._fail(
                ErrorCode.UNSUPPORTED_VERSION,
                f"peer speaks versions {hello.min_version}..{hello.max_version}, "
                f"this side {MIN_VERSION}..{PROTOCOL_VERSION}",
            )
        neg = self.negotiated
        neg.version = version
        neg.capabilities = hello.capabilities & KNOWN_CAPS
        neg.peer_name = hello.node_name
        neg.peer_role = hello.role
        self.state = State.AWAIT_ACCEPT

    def _on_hello_ack(self, ack: HelloAck) -> None:
        lo, hi, offered = MIN_VERSION, PROTOCOL_VERSION, KNOWN_CAPS
        if self._hello is not None:  # the ACK may only pick from what our HELLO offered
            lo, hi = max(lo, self._hello.min_version), min(hi, self._hello.max_version)
            offered &= self._hello.capabilities
        if not lo <= ack.version <= hi:
            raise self._fail(
                ErrorCode.UNSUPPORTED_VERSION, f"peer chose version {ack.version}, not offered"
            )
        neg = self.negotiated
        neg.version = ack.version
        neg.capabilities = ack.capabilities & offered
        neg.peer_name = ack.node_name
        neg.peer_limits = Limits(
            ack.max_frame, ack.max_chunk, ack.max_transfers, ack.initial_window
        )
        # The initiator enforces the acceptor's limits in both directions.
        self.limits = neg.peer_limits
        self.send_credit = ack.initial_window
        self.recv_window = ack.initial_window
        self.state = State.OPEN

    # ---------------------------------------------------------------- sending
    def send(self, frame: Frame) -> bytes:
        """Encode a control frame (anything but CHUNK data, see :meth:`chunk_header`)."""
        if self.state is not State.OPEN:
            raise RuntimeError(f"cannot send {type(frame).__name__} in state {self.state.name}")
        return frame.encode()

    def chunk_header(self, meta: ChunkMeta, wire_length: int) -> bytes:
        """Header + meta of a CHUNK whose ``wire_length`` data bytes the caller sends next.

        Debits the send credit: the IO layer must wait for CREDIT when ``send_credit`` is
        short (a slow receiver bounds the sender's memory this way).
        """
        if self.state is not State.OPEN:
            raise RuntimeError(f"cannot send CHUNK in state {self.state.name}")
        if wire_length > self.send_credit:
            raise RuntimeError(f"CHUNK of {wire_length} B exceeds credit {self.send_credit} B")
        if meta.raw_length > self.limits.max_chunk:
            raise RuntimeError(f"chunk of {meta.raw_length} B above max_chunk")
        self.send_credit -= wire_length
        return Chunk.header(meta, wire_length)

    def grant(self, increment: int) -> bytes:
        """Give the peer ``increment`` more bytes of credit (after consuming chunk data)."""
        if increment <= 0:
            raise ValueError("credit increment must be positive")
        self.recv_window += increment
        if self.recv_window > MAX_WINDOW:
            raise RuntimeError("receive window above 2^31-1")
        return self.send(Credit(increment))

    def forget(self, transfer_id: int) -> None:
        """Stop tracking an incoming transfer this side gave up on (after sending ABORT).

        Its late CHUNK and END frames still parse, count against flow control and come
        out as events, so the application can drop them and return the credit.
        """
        self._incoming.pop(transfer_id, None)
        self._forgotten[transfer_id] = None
        while len(self._forgotten) > FORGOTTEN_MAX:
            self._forgotten.popitem(last=False)

    def is_forgotten(self, transfer_id: int) -> bool:
        return transfer_id in self._forgotten

    def goaway_for(self, error: ProtocolError) -> bytes:
        """Bytes that tell the peer why we close (valid even after the machine failed)."""
        return GoAway(int(error.code), error.message).encode()

    # -------------------------------------------------------------- receiving
    def read_buffer(self) -> memoryview:
        """Where the next received bytes go; at most the rest of the current field."""
        if self.state is State.CLOSED:
            raise RuntimeError("connection is closed")
        return self._buf[self._filled :]

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """``nbytes`` were written into :meth:`read_buffer`; returns the completed frames."""
        self._filled += nbytes
        if self._filled < len(self._buf):
            return []
        return self._field_done()

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Feed any amount of bytes (copying them into the read buffers).

        Bytes after the connection closed (a GOAWAY, or an error) are discarded: a peer
        sends nothing after GOAWAY, and trailing garbage must not surface as anything
        but the events before it.
        """
        src = memoryview(data).cast("B")
        events: list[Frame] = []
        pos = 0
        while pos < len(src) and self.state is not State.CLOSED:
            dst = self.read_buffer()
            n = min(len(dst), len(src) - pos)
            dst[:n] = src[pos : pos + n]
            pos += n
            events.extend(self.buffer_updated(n))
        return events

    def receive_eof(self) -> None:
        """The peer closed its side: fine between frames, an error inside one."""
        at_boundary = self._filled == 0 and self._read in (_Read.HEADER, _Read.PREFACE)
        if self.state is not State.CLOSED and not at_boundary:
            raise self._fail(
                ErrorCode.MALFORMED_FRAME, f"stream truncated inside a frame ({self._read.name})"
            )
        self.state = State.CLOSED

    def _expect(self, read: _Read, buf: memoryview) -> None:
        self._read = read
        self._buf = buf
        self._filled = 0

    def _field_done(self) -> list[Frame]:
        read = self._read
        if read is _Read.PREFACE:
            if bytes(self._buf) != MAGIC:
                raise self._fail(ErrorCode.BAD_MAGIC, "connection preface is not kvship's")
            self.state = State.AWAIT_HELLO
            self._expect(_Read.HEADER, self._scratch[:HEADER_SIZE])
            return []
        if read is _Read.HEADER:
            return self._on_header()
        if read is _Read.BODY:
            body = self._buf
            self._expect(_Read.HEADER, self._scratch[:HEADER_SIZE])
            return self._on_body(body)
        if read is _Read.CHUNK_META:
            return self._on_chunk_meta()
        # CHUNK_DATA
        meta, data = self._chunk_meta, self._buf
        self._chunk_meta = None
        self._expect(_Read.HEADER, self._scratch[:HEADER_SIZE])
        assert meta is not None
        return [Chunk(meta, data)]

    def _on_header(self) -> list[Frame]:
        length, ftype, flags, reserved = HEADER.unpack_from(self._buf)
        limit = self.limits.max_frame if self.state is State.OPEN else HANDSHAKE_MAX_BODY
        if length > limit:
            raise self._fail(
                ErrorCode.FRAME_TOO_LARGE, f"frame type 0x{ftype:02x} of {length} B > {limit} B"
            )
        if reserved:
            raise self._fail(ErrorCode.MALFORMED_FRAME, "reserved header bits are set")
        self._frame_type, self._frame_flags, self._body_length = ftype, flags, length
        if ftype == FrameType.CHUNK:
            if self.state is not State.OPEN:
                raise self._fail(ErrorCode.PROTOCOL_ERROR, "CHUNK before the handshake")
            if length < ChunkMeta.FIXED.size:
                raise self._fail(ErrorCode.MALFORMED_FRAME, f"CHUNK body of {length} B < 40 B")
            self._expect(_Read.CHUNK_META, self._scratch[: ChunkMeta.FIXED.size])
            return []
        if length == 0:
            self._expect(_Read.HEADER, self._scratch[:HEADER_SIZE])
            return self._on_body(memoryview(b""))
        self._expect(_Read.BODY, memoryview(bytearray(length)))
        return []

    def _on_body(self, body: memoryview) -> list[Frame]:
        ftype = self._frame_type
        decode = DECODERS.get(ftype)
        if decode is None:
            if self._frame_flags & FLAG_IGNORABLE and self.state is State.OPEN:
                return []
            raise self._fail(ErrorCode.UNKNOWN_FRAME, f"unknown frame type 0x{ftype:02x}")
        try:
            frame = decode(body)
        except ProtocolError as exc:
            raise self._fail(exc.code, exc.message) from None
        except Exception as exc:  # a decoder bug must not escape as anything else
            raise self._fail(ErrorCode.MALFORMED_FRAME, f"frame 0x{ftype:02x}: {exc!r}") from exc
        return self._dispatch(frame)

    def _dispatch(self, frame: Frame) -> list[Frame]:
        state = self.state
        if state is State.AWAIT_HELLO:
            if not isinstance(frame, Hello):
                raise self._fail(ErrorCode.PROTOCOL_ERROR, f"{type(frame).__name__} before HELLO")
            self._on_hello(frame)
            return [frame]
        if state is State.AWAIT_ACK:
            if isinstance(frame, GoAway):
                self.state = State.CLOSED
                return [frame]
            if not isinstance(frame, HelloAck):
                raise self._fail(
                    ErrorCode.PROTOCOL_ERROR, f"{type(frame).__name__} before HELLO_ACK"
                )
            self._on_hello_ack(frame)
            return [frame]
        if state is not State.OPEN:
            raise self._fail(ErrorCode.PROTOCOL_ERROR, f"{type(frame).__name__} in {state.name}")
        if isinstance(frame, Hello | HelloAck):
            raise self._fail(ErrorCode.PROTOCOL_ERROR, "second handshake frame")
        if isinstance(frame, Open):
            self._on_open(frame)
        elif isinstance(frame, End):
            self._on_end(frame)
        elif isinstance(frame, ShmChunk):
            self._check_chunk(frame.meta, frame.meta.raw_length)
        elif isinstance(frame, Abort):
            if frame.transfer_id in self._incoming:
                self.forget(frame.transfer_id)
        elif isinstance(frame, Credit):
            self.send_credit += frame.increment
            if self.send_credit > MAX_WINDOW:
                raise self._fail(ErrorCode.FLOW_CONTROL, "credit above 2^31-1")
        elif isinstance(frame, GoAway):
            self.state = State.CLOSED
        return [frame]

    def _on_open(self, frame: Open) -> None:
        self._forgotten.pop(frame.transfer_id, None)
        if frame.n_stripes > 1 and not self.negotiated.capabilities & CAP_STRIPING:
            raise self._fail(ErrorCode.PROTOCOL_ERROR, "striped OPEN without CAP_STRIPING")
        if frame.n_chunks > MAX_CHUNKS:
            raise self._fail(
                ErrorCode.TRANSFER_TOO_LARGE,
                f"transfer of {frame.n_chunks} chunks; at most {MAX_CHUNKS} (raise chunk_size)",
            )
        if frame.transfer_id in self._incoming:
            raise self._fail(
                ErrorCode.PROTOCOL_ERROR, f"transfer {frame.transfer_id:#x} opened twice"
            )
        if len(self._incoming) >= self.limits.max_transfers:
            raise self._fail(
                ErrorCode.TOO_MANY_TRANSFERS, f"more than {self.limits.max_transfers} transfers"
            )
        if frame.chunk_size > self.limits.max_chunk:
            raise self._fail(
                ErrorCode.FRAME_TOO_LARGE,
                f"chunk_size {frame.chunk_size} > max_chunk {self.limits.max_chunk}",
            )
        self._incoming[frame.transfer_id] = _Incoming(
            frame, chunk_table(frame.layers, frame.chunk_size)
        )

    def _on_end(self, frame: End) -> None:
        incoming = self._incoming.pop(frame.transfer_id, None)
        if incoming is None and frame.transfer_id in self._forgotten:
            return
        if incoming is None:
            raise self._fail(
                ErrorCode.UNKNOWN_TRANSFER, f"END for transfer {frame.transfer_id:#x} not open"
            )
        if incoming.chunks_seen != frame.chunks_on_stripe:
            raise self._fail(
                ErrorCode.PROTOCOL_ERROR,
                f"END says {frame.chunks_on_stripe} chunks on this stripe, "
                f"{incoming.chunks_seen} arrived",
            )

    def _check_chunk(self, meta: ChunkMeta, wire_length: int) -> None:
        incoming = self._incoming.get(meta.transfer_id)
        if incoming is None and meta.transfer_id in self._forgotten:
            if wire_length > self.limits.max_chunk:
                raise self._fail(ErrorCode.MALFORMED_FRAME, "bad chunk for an ended transfer")
            return
        if incoming is None:
            raise self._fail(
                ErrorCode.UNKNOWN_TRANSFER, f"chunk for transfer {meta.transfer_id:#x} not open"
            )
        opened, starts = incoming.open, incoming.starts
        if meta.layer >= len(opened.layers) or not (
            starts[meta.layer] <= meta.chunk_index < starts[meta.layer + 1]
        ):
            raise self._fail(
                ErrorCode.LAYOUT_MISMATCH,
                f"chunk {meta.chunk_index} is not in layer {meta.layer} of the declared layout",
            )
        offset = (meta.chunk_index - starts[meta.layer]) * opened.chunk_size
        expect_len = min(opened.chunk_size, opened.layers[meta.layer].nbytes - offset)
        if meta.offset != offset or meta.raw_length != expect_len:
            raise self._fail(
                ErrorCode.LAYOUT_MISMATCH,
                f"chunk {meta.chunk_index} claims offset {meta.offset} length {meta.raw_length}, "
                f"the layout puts it at {offset} length {expect_len}",
            )
        if meta.codec == CODEC_RAW:
            if wire_length != meta.raw_length:
                raise self._fail(
                    ErrorCode.MALFORMED_FRAME,
                    f"raw chunk carries {wire_length} B, raw_length is {meta.raw_length}",
                )
        elif meta.codec not in KNOWN_CODECS or not self.negotiated.capabilities & CAP_CODECS:
            raise self._fail(ErrorCode.UNSUPPORTED_CODEC, f"chunk codec {meta.codec}")
        elif not 0 < wire_length < meta.raw_length:
            # Coded chunks exist only because they are smaller (else they travel raw).
            raise self._fail(
                ErrorCode.MALFORMED_FRAME,
                f"codec {meta.codec} chunk of {wire_length} B for {meta.raw_length} raw bytes",
            )
        incoming.chunks_seen += 1

    def _on_chunk_meta(self) -> list[Frame]:
        meta = ChunkMeta.unpack(self._buf)
        wire_length = self._body_length - ChunkMeta.FIXED.size
        self._check_chunk(meta, wire_length)
        if wire_length > self.recv_window:
            raise self._fail(
                ErrorCode.FLOW_CONTROL,
                f"chunk of {wire_length} B exceeds the {self.recv_window} B credit window",
            )
        self.recv_window -= wire_length
        self._chunk_meta = meta
        if wire_length == 0:  # pragma: no cover - a zero-length chunk is never generated
            self._expect(_Read.HEADER, self._scratch[:HEADER_SIZE])
            return [Chunk(meta, memoryview(b""))]
        sink = self.payload_sink(meta, wire_length)
        if len(sink) != wire_length:
            raise RuntimeError(f"payload sink gave {len(sink)} B for a {wire_length} B chunk")
        self._expect(_Read.CHUNK_DATA, sink)
        return []
