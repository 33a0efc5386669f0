"""The core frames (SPEC §5.1–§5.10, HAVE of §7.6): handshake, transfers, flow control,
liveness. Every fixed-layout frame is a :class:`~.base.FixedFrame`: a struct and its
field names; only CHUNK (which streams its data) and OPEN (:mod:`.meta`) are written out."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from .base import FixedFrame, Packed, Tail, frame_header, malformed
from .constants import (
    CODEC_RAW,
    MAX_MESSAGE,
    MAX_WINDOW,
    MIN_VERSION,
    PROTOCOL_VERSION,
    ROLE_ENGINE,
    ROLE_PEER,
    FrameType,
)
from .errors import ErrorCode, ProtocolError


@dataclass(frozen=True, slots=True)
class Hello(FixedFrame):
    """First frame after the preface, sent by the side that connects."""

    TYPE: ClassVar[int] = FrameType.HELLO
    NAME: ClassVar[str] = "HELLO"
    FIXED: ClassVar[struct.Struct] = struct.Struct(">HHBBHQ")
    FIELDS: ClassVar[tuple[str | None, ...]] = (
        "min_version", "max_version", "role", "auth_method", None, "capabilities",
    )  # fmt: skip
    TAIL: ClassVar[tuple[Tail, ...]] = (Tail("node_name"), Tail("auth", binary=True))
    role: int
    node_name: str = ""
    min_version: int = MIN_VERSION
    max_version: int = PROTOCOL_VERSION
    capabilities: int = 0
    auth_method: int = 0  # 0 = none; the auth issue defines the rest
    auth: bytes = b""

    @classmethod
    def build(cls, fields: dict[str, Any]) -> Hello:
        lo, hi, role = fields["min_version"], fields["max_version"], fields["role"]
        if lo > hi:
            raise malformed(f"HELLO min_version {lo} > max {hi}")
        if role not in (ROLE_PEER, ROLE_ENGINE):
            raise malformed(f"HELLO role {role} is not 1 or 2")
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class HelloAck(FixedFrame):
    """The accepting side's answer: the chosen version and the limits it enforces."""

    TYPE: ClassVar[int] = FrameType.HELLO_ACK
    NAME: ClassVar[str] = "HELLO_ACK"
    FIXED: ClassVar[struct.Struct] = struct.Struct(">HHIQIIII")
    FIELDS: ClassVar[tuple[str | None, ...]] = (
        "version", None, None, "capabilities",
        "initial_window", "max_frame", "max_chunk", "max_transfers",
    )  # fmt: skip
    TAIL: ClassVar[tuple[Tail, ...]] = (Tail("node_name"),)
    version: int
    capabilities: int
    initial_window: int
    max_frame: int
    max_chunk: int
    max_transfers: int
    node_name: str = ""

    @classmethod
    def build(cls, fields: dict[str, Any]) -> HelloAck:
        window, max_chunk = fields["initial_window"], fields["max_chunk"]
        if window > MAX_WINDOW:
            raise ProtocolError(ErrorCode.FLOW_CONTROL, f"initial_window {window} > 2^31-1")
        if max_chunk == 0 or fields["max_frame"] < max_chunk + ChunkMeta.FIXED.size:
            raise malformed(
                f"HELLO_ACK limits inconsistent: max_frame {fields['max_frame']}, "
                f"max_chunk {max_chunk}"
            )
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class ChunkMeta(Packed):
    """The fixed 40 bytes that describe one chunk; CHUNK and SHM_CHUNK both start with it."""

    FIXED: ClassVar[struct.Struct] = struct.Struct(">QIIQIBBHQ")
    FIELDS: ClassVar[tuple[str | None, ...]] = (
        "transfer_id", "chunk_index", "layer", "offset", "raw_length", "codec", None, None,
        "checksum",
    )  # fmt: skip
    transfer_id: int
    chunk_index: int
    layer: int
    offset: int
    raw_length: int
    checksum: int  # xxh3-64 of the uncompressed bytes
    codec: int = CODEC_RAW

    def pack(self) -> bytes:
        return self.pack_fixed()

    @classmethod
    def unpack(cls, body: memoryview | bytes) -> ChunkMeta:
        return cls(**cls.unpack_fixed(body))


@dataclass(frozen=True, slots=True)
class Chunk:
    """CHUNK: ``ChunkMeta`` then the chunk's bytes (``wire_length = length - 40``).

    A chunk the connection received is a :class:`ReceivedChunk`: its ``tag`` is what the
    payload sink returned with the buffer ``data`` lies in (SPEC §5.4: "straight into the
    buffer the application chose for it"). The tag is not a dataclass field: it is not on
    the wire, and compares, prints and serialises with nothing."""

    TYPE: ClassVar[int] = FrameType.CHUNK
    NAME: ClassVar[str] = "CHUNK"
    meta: ChunkMeta
    data: memoryview | bytes

    @property
    def tag(self) -> object:
        """What the payload sink said about ``data``'s buffer; None for a chunk built here."""
        return None

    @property
    def view(self) -> memoryview:
        """``data`` as a memoryview: itself for a received chunk (Connection hands out the
        payload sink's view), a new view over it for one built from bytes."""
        return self.data if isinstance(self.data, memoryview) else memoryview(self.data)

    @staticmethod
    def header(meta: ChunkMeta, wire_length: int) -> bytes:
        """Frame header + meta, so the data can follow from its own buffer without a copy."""
        return frame_header(FrameType.CHUNK, ChunkMeta.FIXED.size + wire_length) + meta.pack()

    def encode(self) -> bytes:
        return self.header(self.meta, len(self.data)) + bytes(self.data)


class ReceivedChunk(Chunk):
    """A CHUNK event: the frame plus the payload sink's ``tag`` for its buffer."""

    __slots__ = ("_tag",)
    _tag: object

    def __init__(self, meta: ChunkMeta, data: memoryview | bytes, tag: object = None) -> None:
        Chunk.__init__(self, meta, data)
        object.__setattr__(self, "_tag", tag)

    @property
    def tag(self) -> object:
        return self._tag

    def __eq__(self, other: object) -> bool:  # equal to the Chunk with the same fields
        if isinstance(other, Chunk):
            return (self.meta, self.data) == (other.meta, other.data)
        return NotImplemented

    __hash__ = Chunk.__hash__


@dataclass(frozen=True, slots=True)
class End(FixedFrame):
    """The sender put its last chunk of a transfer on this stripe."""

    TYPE: ClassVar[int] = FrameType.END
    NAME: ClassVar[str] = "END"
    FIXED: ClassVar[struct.Struct] = struct.Struct(">QIIQ")
    FIELDS: ClassVar[tuple[str | None, ...]] = (
        "transfer_id", "chunks_on_stripe", "open_check", "digest",
    )  # fmt: skip
    transfer_id: int
    chunks_on_stripe: int
    digest: int  # whole-transfer digest, SPEC.md "Checksums"
    # With CAP_OPEN_CHECK: the low 32 bits of xxh3-64 of this stripe's OPEN body as it went
    # on the wire (the connection fills it in); the receiver compares its own (§7.4).
    open_check: int = 0


@dataclass(frozen=True, slots=True)
class Complete(FixedFrame):
    """The receiver holds the whole transfer, every checksum and the digest verified."""

    TYPE: ClassVar[int] = FrameType.COMPLETE
    NAME: ClassVar[str] = "COMPLETE"
    FIXED: ClassVar[struct.Struct] = struct.Struct(">QQQ")
    FIELDS: ClassVar[tuple[str | None, ...]] = ("transfer_id", "total_bytes", "digest")
    transfer_id: int
    total_bytes: int
    digest: int


@dataclass(frozen=True, slots=True)
class Credit(FixedFrame):
    """Grants the peer ``increment`` more bytes of chunk data on this connection."""

    TYPE: ClassVar[int] = FrameType.CREDIT
    NAME: ClassVar[str] = "CREDIT"
    FIXED: ClassVar[struct.Struct] = struct.Struct(">I")
    FIELDS: ClassVar[tuple[str | None, ...]] = ("increment",)
    increment: int

    @classmethod
    def build(cls, fields: dict[str, Any]) -> Credit:
        if fields["increment"] == 0:
            raise ProtocolError(ErrorCode.FLOW_CONTROL, "CREDIT increment of 0")
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class Abort(FixedFrame):
    """Ends one transfer with an error; the connection stays up."""

    TYPE: ClassVar[int] = FrameType.ABORT
    NAME: ClassVar[str] = "ABORT"
    FIXED: ClassVar[struct.Struct] = struct.Struct(">QH")
    FIELDS: ClassVar[tuple[str | None, ...]] = ("transfer_id", "code")
    TAIL: ClassVar[tuple[Tail, ...]] = (Tail("message", max_chars=MAX_MESSAGE),)
    transfer_id: int
    code: int
    message: str = ""


@dataclass(frozen=True, slots=True)
class Ping(FixedFrame):
    """PING and PONG share a body (8 opaque bytes) but are distinct frames: a PONG must
    never be mistaken for a PING (two peers would answer each other forever)."""

    TYPE: ClassVar[int] = FrameType.PING
    NAME: ClassVar[str] = "PING"
    FIXED: ClassVar[struct.Struct] = struct.Struct(">Q")
    FIELDS: ClassVar[tuple[str | None, ...]] = ("opaque",)
    opaque: int


@dataclass(frozen=True, slots=True)
class Pong(FixedFrame):
    TYPE: ClassVar[int] = FrameType.PONG
    NAME: ClassVar[str] = "PONG"
    FIXED: ClassVar[struct.Struct] = struct.Struct(">Q")
    FIELDS: ClassVar[tuple[str | None, ...]] = ("opaque",)
    opaque: int


@dataclass(frozen=True, slots=True)
class GoAway(FixedFrame):
    """Closes the connection: an error, or a graceful drain with NO_ERROR."""

    TYPE: ClassVar[int] = FrameType.GOAWAY
    NAME: ClassVar[str] = "GOAWAY"
    FIXED: ClassVar[struct.Struct] = struct.Struct(">H")
    FIELDS: ClassVar[tuple[str | None, ...]] = ("code",)
    TAIL: ClassVar[tuple[Tail, ...]] = (Tail("message", max_chars=MAX_MESSAGE),)
    code: int
    message: str = ""


@dataclass(frozen=True, slots=True)
class Have(FixedFrame):
    """Receiver -> sender, answering a dedup manifest: the first ``blocks`` full blocks
    (every full-attention layer) and, if ``states``, the exact linear states are held
    (and pinned), so the chunks they cover are not sent."""

    TYPE: ClassVar[int] = FrameType.HAVE
    NAME: ClassVar[str] = "HAVE"
    FIXED: ClassVar[struct.Struct] = struct.Struct(">QIB3x")
    FIELDS: ClassVar[tuple[str | None, ...]] = ("transfer_id", "blocks", "states")
    transfer_id: int
    blocks: int
    states: bool = False

    @classmethod
    def build(cls, fields: dict[str, Any]) -> Have:
        if fields["states"] > 1:
            raise malformed("HAVE states flag is not 0 or 1")
        return cls(fields["transfer_id"], fields["blocks"], bool(fields["states"]))


@dataclass(frozen=True, slots=True)
class Hold(FixedFrame):
    """Receiver -> sender: stop sending chunks of this transfer (``hold``) or go on.

    Credit is per connection and every transfer of a link shares its connections, so
    withheld credit stops them all; HOLD lets a receiver whose staging is full stop the
    one transfer that is filling it (nobody claimed it yet) while it grants the credit a
    transfer an engine waits for needs (SPEC §7.8)."""

    TYPE: ClassVar[int] = FrameType.HOLD
    NAME: ClassVar[str] = "HOLD"
    FIXED: ClassVar[struct.Struct] = struct.Struct(">QB3x")
    FIELDS: ClassVar[tuple[str | None, ...]] = ("transfer_id", "hold")
    transfer_id: int
    hold: bool = True

    @classmethod
    def build(cls, fields: dict[str, Any]) -> Hold:
        if fields["hold"] > 1:
            raise malformed("HOLD hold flag is not 0 or 1")
        return cls(fields["transfer_id"], bool(fields["hold"]))
