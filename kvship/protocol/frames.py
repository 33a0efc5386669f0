"""kvship wire frames, version 1: layouts, encoders and decoders (normative: protocol/SPEC.md).

Every frame is an 8-byte header ``length:u32 type:u8 flags:u8 reserved:u16`` (big-endian)
followed by ``length`` body bytes. Decoders take the body as a memoryview and raise
:class:`ProtocolError` on anything that does not parse; they never trust a length field.
Frames double as the events the connection state machine emits.
"""

from __future__ import annotations

import json
import struct
import sys
from array import array
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeGuard

from .errors import ErrorCode, ProtocolError

MAGIC = b"\x89KVSHIP\n"  # connection preface: high bit catches 7-bit links, \n catches text modes
PROTOCOL_VERSION = 1
MIN_VERSION = 1

HEADER = struct.Struct(">IBBH")
HEADER_SIZE = HEADER.size  # 8

FLAG_IGNORABLE = 0x80  # a receiver that does not know this frame type may skip it

HANDSHAKE_MAX_BODY = 64 * 1024  # bodies allowed before limits are negotiated
MAX_WINDOW = 2**31 - 1

ROLE_PEER = 1  # another kvshipd (the data plane between clusters)
ROLE_ENGINE = 2  # an inference engine's kvship.Client on the local API

CODEC_RAW = 0
CODEC_ZSTD = 1  # zstd frame of the chunk's bytes (kvship.payload)
CODEC_SPLIT16 = 2  # 2-byte values split into planes; high plane entropy-coded (kvship.payload)
KNOWN_CODECS = (CODEC_RAW, CODEC_ZSTD, CODEC_SPLIT16)

# Capability bits (HELLO / HELLO_ACK). Unknown bits are ignored; the ACK holds the intersection.
CAP_SHM = 1 << 0  # shared-memory staging arena on the local API (Unix socket only)
CAP_STRIPING = 1 << 1  # a transfer may be striped over several connections
CAP_CODECS = 1 << 2  # chunks may carry codecs other than raw (zstd, split16)
CAP_DEDUP = 1 << 3  # OPEN may carry a dedup manifest; the receiver answers HAVE
KNOWN_CAPS = CAP_SHM | CAP_STRIPING | CAP_CODECS | CAP_DEDUP


class FrameType:
    HELLO = 0x01
    HELLO_ACK = 0x02
    OPEN = 0x03
    CHUNK = 0x04
    END = 0x05
    COMPLETE = 0x06
    CREDIT = 0x07
    ABORT = 0x08
    PING = 0x09
    PONG = 0x0A
    GOAWAY = 0x0B
    # 0x0C-0x0F reserved: per-chunk ACK, RESUME (see SPEC.md)
    HAVE = 0x10  # dedup: the receiver holds the first N blocks (and maybe the states)
    # 0x11-0x1F reserved for more of the dedup exchange
    SUBSCRIBE = 0x20
    SHM_ATTACH = 0x21
    SHM_ATTACHED = 0x22
    SHM_CHUNK = 0x23
    LAYER_READY = 0x24
    RELEASE = 0x25


def frame_header(frame_type: int, body_length: int, flags: int = 0) -> bytes:
    return HEADER.pack(body_length, frame_type, flags, 0)


def _frame(frame_type: int, body: bytes, flags: int = 0) -> bytes:
    return frame_header(frame_type, len(body), flags) + body


def _need(body: memoryview, size: int, name: str) -> None:
    if len(body) < size:
        raise ProtocolError(
            ErrorCode.MALFORMED_FRAME, f"{name} body is {len(body)} bytes, needs at least {size}"
        )


def _exact(body: memoryview, size: int, name: str) -> None:
    if len(body) != size:
        raise ProtocolError(
            ErrorCode.MALFORMED_FRAME, f"{name} body is {len(body)} bytes, must be {size}"
        )


def _pack_str16(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    if len(raw) > 0xFFFF:
        raise ValueError("string field longer than 65535 bytes")
    return struct.pack(">H", len(raw)) + raw


def _unpack_bytes16(body: memoryview, pos: int, name: str) -> tuple[bytes, int]:
    _need(body, pos + 2, name)
    (n,) = struct.unpack_from(">H", body, pos)
    _need(body, pos + 2 + n, name)
    return bytes(body[pos + 2 : pos + 2 + n]), pos + 2 + n


def _unpack_str16(body: memoryview, pos: int, name: str) -> tuple[str, int]:
    raw, pos = _unpack_bytes16(body, pos, name)
    try:
        return raw.decode(), pos
    except UnicodeDecodeError as exc:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, f"{name}: string is not UTF-8") from exc


def _no_trailing(body: memoryview, pos: int, name: str) -> None:
    if pos != len(body):
        raise ProtocolError(
            ErrorCode.MALFORMED_FRAME, f"{name}: {len(body) - pos} trailing bytes after the body"
        )


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame after the preface, sent by the side that connects."""

    TYPE: ClassVar[int] = FrameType.HELLO
    FIXED: ClassVar[struct.Struct] = struct.Struct(">HHBBHQ")
    role: int
    node_name: str = ""
    min_version: int = MIN_VERSION
    max_version: int = PROTOCOL_VERSION
    capabilities: int = 0
    auth_method: int = 0  # 0 = none; the auth issue defines the rest
    auth: bytes = b""

    def encode(self) -> bytes:
        body = self.FIXED.pack(
            self.min_version, self.max_version, self.role, self.auth_method, 0, self.capabilities
        )
        return _frame(self.TYPE, body + _pack_str16(self.node_name) + _pack_str16(self.auth))

    @classmethod
    def decode(cls, body: memoryview) -> Hello:
        _need(body, cls.FIXED.size, "HELLO")
        lo, hi, role, auth_method, _, caps = cls.FIXED.unpack_from(body)
        name, pos = _unpack_str16(body, cls.FIXED.size, "HELLO node_name")
        auth, pos = _unpack_bytes16(body, pos, "HELLO auth")
        _no_trailing(body, pos, "HELLO")
        if lo > hi:
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, f"HELLO min_version {lo} > max {hi}")
        if role not in (ROLE_PEER, ROLE_ENGINE):
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, f"HELLO role {role} is not 1 or 2")
        return cls(role, name, lo, hi, caps, auth_method, auth)


@dataclass(frozen=True, slots=True)
class HelloAck:
    """The accepting side's answer: the chosen version and the limits it enforces."""

    TYPE: ClassVar[int] = FrameType.HELLO_ACK
    FIXED: ClassVar[struct.Struct] = struct.Struct(">HHIQIIII")
    version: int
    capabilities: int
    initial_window: int
    max_frame: int
    max_chunk: int
    max_transfers: int
    node_name: str = ""

    def encode(self) -> bytes:
        body = self.FIXED.pack(
            self.version,
            0,
            0,
            self.capabilities,
            self.initial_window,
            self.max_frame,
            self.max_chunk,
            self.max_transfers,
        )
        return _frame(self.TYPE, body + _pack_str16(self.node_name))

    @classmethod
    def decode(cls, body: memoryview) -> HelloAck:
        _need(body, cls.FIXED.size, "HELLO_ACK")
        version, _, _, caps, window, max_frame, max_chunk, max_transfers = cls.FIXED.unpack_from(
            body
        )
        name, pos = _unpack_str16(body, cls.FIXED.size, "HELLO_ACK node_name")
        _no_trailing(body, pos, "HELLO_ACK")
        if window > MAX_WINDOW:
            raise ProtocolError(ErrorCode.FLOW_CONTROL, f"initial_window {window} > 2^31-1")
        if max_chunk == 0 or max_frame < max_chunk + ChunkMeta.FIXED.size:
            raise ProtocolError(
                ErrorCode.MALFORMED_FRAME,
                f"HELLO_ACK limits inconsistent: max_frame {max_frame}, max_chunk {max_chunk}",
            )
        return cls(version, caps, window, max_frame, max_chunk, max_transfers, name)


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One layer's bytes as the wire sees them; dtype and shape let the far side rebuild it."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes}


def chunk_table(layers: tuple[LayerSpec, ...], chunk_size: int) -> list[int]:
    """First chunk index of each layer, plus the total as the last entry.

    Layers are cut into ``ceil(nbytes / chunk_size)`` chunks, numbered layer by layer, so
    both ends derive every chunk's (layer, offset, length) from its index alone.
    """
    starts = [0]
    for spec in layers:
        starts.append(starts[-1] + -(-spec.nbytes // chunk_size))
    return starts


_NATIVE_LITTLE = sys.byteorder == "little"


def _pack_tokens(tokens: tuple[int, ...]) -> bytes:
    arr = array("I", tokens)
    if arr.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte unsigned int
        raise RuntimeError("array('I') is not 32-bit here")
    if _NATIVE_LITTLE:
        arr.byteswap()
    return arr.tobytes()


def _unpack_tokens(raw: memoryview) -> tuple[int, ...]:
    arr = array("I")
    arr.frombytes(raw)
    if _NATIVE_LITTLE:
        arr.byteswap()
    return tuple(arr)


MAX_REQUEST_ID = 256


@dataclass(frozen=True, slots=True)
class Open:
    """Opens a transfer on this connection (sent on every stripe that carries its chunks)."""

    TYPE: ClassVar[int] = FrameType.OPEN
    FIXED: ClassVar[struct.Struct] = struct.Struct(">QQIIHHBBHI")
    transfer_id: int
    request_id: str
    layers: tuple[LayerSpec, ...]
    chunk_size: int
    token_ids: tuple[int, ...] = ()
    n_stripes: int = 1
    stripe: int = 0
    priority: int = 0
    peer: str = ""  # engine -> daemon only: the destination daemon
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.layers)

    @property
    def n_chunks(self) -> int:
        return chunk_table(self.layers, self.chunk_size)[-1]

    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "request_id": self.request_id,
            "layers": [spec.to_json() for spec in self.layers],
        }
        if self.peer:
            meta["peer"] = self.peer
        if self.extra:
            meta["extra"] = self.extra
        return meta

    def encode(self) -> bytes:
        fixed = self.FIXED.pack(
            self.transfer_id,
            self.total_bytes,
            self.n_chunks,
            self.chunk_size,
            self.n_stripes,
            self.stripe,
            self.priority,
            0,
            0,
            len(self.token_ids),
        )
        meta = json.dumps(self.meta(), separators=(",", ":")).encode()
        return _frame(self.TYPE, fixed + _pack_tokens(self.token_ids) + meta)

    @classmethod
    def decode(cls, body: memoryview) -> Open:
        _need(body, cls.FIXED.size, "OPEN")
        (tid, total, n_chunks, chunk_size, n_stripes, stripe, prio, _, _, n_tokens) = (
            cls.FIXED.unpack_from(body)
        )
        pos = cls.FIXED.size
        _need(body, pos + 4 * n_tokens, "OPEN token_ids")
        tokens = _unpack_tokens(body[pos : pos + 4 * n_tokens])
        pos += 4 * n_tokens
        try:
            meta = json.loads(
                bytes(body[pos:]).decode("utf-8"),
                parse_constant=_reject_constant,
                object_pairs_hook=_unique_keys,
            )
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, f"OPEN meta is not JSON: {exc}") from exc
        layers, request_id, peer, extra = _parse_meta(meta)
        if chunk_size == 0:
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, "OPEN chunk_size is 0")
        if n_stripes == 0 or stripe >= n_stripes:
            raise ProtocolError(
                ErrorCode.MALFORMED_FRAME, f"OPEN stripe {stripe} of {n_stripes} stripes"
            )
        frame = cls(
            tid, request_id, layers, chunk_size, tokens, n_stripes, stripe, prio, peer, extra
        )
        if frame.total_bytes != total or frame.n_chunks != n_chunks:
            raise ProtocolError(
                ErrorCode.MALFORMED_FRAME,
                f"OPEN says {total} bytes in {n_chunks} chunks, its layers make "
                f"{frame.total_bytes} bytes in {frame.n_chunks} chunks",
            )
        return frame


def _reject_constant(name: str) -> Any:
    """NaN/Infinity are not JSON (RFC 8259): other implementations would refuse them."""
    raise ValueError(f"{name} is not a JSON value")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Duplicate keys mean different things to different JSON parsers: refuse them."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return obj


def _is_text(value: object) -> TypeGuard[str]:
    """A str that UTF-8 can carry: a JSON escape like \\ud800 yields a lone surrogate."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _parse_meta(meta: Any) -> tuple[tuple[LayerSpec, ...], str, str, dict[str, Any]]:
    def bad(why: str) -> ProtocolError:
        return ProtocolError(ErrorCode.MALFORMED_FRAME, f"OPEN meta: {why}")

    if not isinstance(meta, dict):
        raise bad("not an object")
    request_id = meta.get("request_id")
    if not _is_text(request_id) or not 0 < len(request_id) <= MAX_REQUEST_ID:
        raise bad(f"request_id must be a string of 1..{MAX_REQUEST_ID} characters")
    raw_layers = meta.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise bad("layers must be a non-empty list")
    layers = []
    for i, item in enumerate(raw_layers):
        if not isinstance(item, dict):
            raise bad(f"layer {i} is not an object")
        dtype, shape, nbytes = item.get("dtype"), item.get("shape"), item.get("nbytes")
        if not _is_text(dtype) or not dtype or len(dtype) > 32:
            raise bad(f"layer {i} dtype must be a short string")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**40 for d in shape):
            raise bad(f"layer {i} shape must be a list of non-negative integers")
        if type(nbytes) is not int or not 0 <= nbytes < 2**48:
            raise bad(f"layer {i} nbytes must be a non-negative integer")
        layers.append(LayerSpec(dtype, tuple(shape), nbytes))
    peer = meta.get("peer", "")
    if not _is_text(peer):
        raise bad("peer must be a string")
    extra = meta.get("extra", {})
    if not isinstance(extra, dict):
        raise bad("extra must be an object")
    return tuple(layers), request_id, peer, extra


@dataclass(frozen=True, slots=True)
class ChunkMeta:
    """The fixed 40 bytes that describe one chunk; CHUNK and SHM_CHUNK both start with it."""

    FIXED: ClassVar[struct.Struct] = struct.Struct(">QIIQIBBHQ")
    transfer_id: int
    chunk_index: int
    layer: int
    offset: int
    raw_length: int
    checksum: int  # xxh3-64 of the uncompressed bytes
    codec: int = CODEC_RAW

    def pack(self) -> bytes:
        return self.FIXED.pack(
            self.transfer_id,
            self.chunk_index,
            self.layer,
            self.offset,
            self.raw_length,
            self.codec,
            0,
            0,
            self.checksum,
        )

    @classmethod
    def unpack(cls, body: memoryview | bytes) -> ChunkMeta:
        tid, index, layer, offset, raw_length, codec, _, _, checksum = cls.FIXED.unpack_from(body)
        return cls(tid, index, layer, offset, raw_length, checksum, codec)


@dataclass(frozen=True, slots=True)
class Chunk:
    """CHUNK: ``ChunkMeta`` then the chunk's bytes (``wire_length = length - 40``)."""

    TYPE: ClassVar[int] = FrameType.CHUNK
    meta: ChunkMeta
    data: memoryview | bytes

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


@dataclass(frozen=True, slots=True)
class End:
    """The sender put its last chunk of a transfer on this stripe."""

    TYPE: ClassVar[int] = FrameType.END
    FIXED: ClassVar[struct.Struct] = struct.Struct(">QIIQ")
    transfer_id: int
    chunks_on_stripe: int
    digest: int  # whole-transfer digest, SPEC.md "Checksums"

    def encode(self) -> bytes:
        return _frame(
            self.TYPE, self.FIXED.pack(self.transfer_id, self.chunks_on_stripe, 0, self.digest)
        )

    @classmethod
    def decode(cls, body: memoryview) -> End:
        _exact(body, cls.FIXED.size, "END")
        tid, count, _, digest = cls.FIXED.unpack_from(body)
        return cls(tid, count, digest)


@dataclass(frozen=True, slots=True)
class Complete:
    """The receiver holds the whole transfer, every checksum and the digest verified."""

    TYPE: ClassVar[int] = FrameType.COMPLETE
    FIXED: ClassVar[struct.Struct] = struct.Struct(">QQQ")
    transfer_id: int
    total_bytes: int
    digest: int

    def encode(self) -> bytes:
        return _frame(self.TYPE, self.FIXED.pack(self.transfer_id, self.total_bytes, self.digest))

    @classmethod
    def decode(cls, body: memoryview) -> Complete:
        _exact(body, cls.FIXED.size, "COMPLETE")
        return cls(*cls.FIXED.unpack_from(body))


@dataclass(frozen=True, slots=True)
class Credit:
    """Grants the peer ``increment`` more bytes of chunk data on this connection."""

    TYPE: ClassVar[int] = FrameType.CREDIT
    FIXED: ClassVar[struct.Struct] = struct.Struct(">I")
    increment: int

    def encode(self) -> bytes:
        return _frame(self.TYPE, self.FIXED.pack(self.increment))

    @classmethod
    def decode(cls, body: memoryview) -> Credit:
        _exact(body, cls.FIXED.size, "CREDIT")
        (inc,) = cls.FIXED.unpack_from(body)
        if inc == 0:
            raise ProtocolError(ErrorCode.FLOW_CONTROL, "CREDIT increment of 0")
        return cls(inc)


@dataclass(frozen=True, slots=True)
class Abort:
    """Ends one transfer with an error; the connection stays up."""

    TYPE: ClassVar[int] = FrameType.ABORT
    FIXED: ClassVar[struct.Struct] = struct.Struct(">QH")
    transfer_id: int
    code: int
    message: str = ""

    def encode(self) -> bytes:
        body = self.FIXED.pack(self.transfer_id, self.code) + _pack_str16(self.message[:1000])
        return _frame(self.TYPE, body)

    @classmethod
    def decode(cls, body: memoryview) -> Abort:
        _need(body, cls.FIXED.size, "ABORT")
        tid, code = cls.FIXED.unpack_from(body)
        message, pos = _unpack_str16(body, cls.FIXED.size, "ABORT message")
        _no_trailing(body, pos, "ABORT")
        return cls(tid, code, message)


class _Opaque:
    """PING and PONG share a body (8 opaque bytes) but are distinct frames: a PONG must
    never be mistaken for a PING (two peers would answer each other forever)."""

    TYPE: ClassVar[int]
    FIXED: ClassVar[struct.Struct] = struct.Struct(">Q")
    opaque: int

    def encode(self) -> bytes:
        return _frame(self.TYPE, self.FIXED.pack(self.opaque))

    @classmethod
    def decode(cls, body: memoryview) -> Any:
        _exact(body, cls.FIXED.size, cls.__name__.upper())
        return cls(*cls.FIXED.unpack_from(body))


@dataclass(frozen=True, slots=True)
class Ping(_Opaque):
    TYPE: ClassVar[int] = FrameType.PING
    opaque: int


@dataclass(frozen=True, slots=True)
class Pong(_Opaque):
    TYPE: ClassVar[int] = FrameType.PONG
    opaque: int


@dataclass(frozen=True, slots=True)
class GoAway:
    """Closes the connection: an error, or a graceful drain with NO_ERROR."""

    TYPE: ClassVar[int] = FrameType.GOAWAY
    FIXED: ClassVar[struct.Struct] = struct.Struct(">H")
    code: int
    message: str = ""

    def encode(self) -> bytes:
        return _frame(self.TYPE, self.FIXED.pack(self.code) + _pack_str16(self.message[:1000]))

    @classmethod
    def decode(cls, body: memoryview) -> GoAway:
        _need(body, cls.FIXED.size, "GOAWAY")
        (code,) = cls.FIXED.unpack_from(body)
        message, pos = _unpack_str16(body, cls.FIXED.size, "GOAWAY message")
        _no_trailing(body, pos, "GOAWAY")
        return cls(code, message)


@dataclass(frozen=True, slots=True)
class Have:
    """Receiver -> sender, answering a dedup manifest: the first ``blocks`` full blocks
    (every full-attention layer) and, if ``states``, the exact linear states are held
    (and pinned), so the chunks they cover are not sent."""

    TYPE: ClassVar[int] = FrameType.HAVE
    FIXED: ClassVar[struct.Struct] = struct.Struct(">QIB3x")
    transfer_id: int
    blocks: int
    states: bool = False

    def encode(self) -> bytes:
        return _frame(self.TYPE, self.FIXED.pack(self.transfer_id, self.blocks, self.states))

    @classmethod
    def decode(cls, body: memoryview) -> Have:
        _exact(body, cls.FIXED.size, "HAVE")
        tid, blocks, states = cls.FIXED.unpack_from(body)
        if states > 1:
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, "HAVE states flag is not 0 or 1")
        return cls(tid, blocks, bool(states))


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Engine asks its daemon for a request's KV, waiting up to ``timeout_ms`` for it to arrive."""

    TYPE: ClassVar[int] = FrameType.SUBSCRIBE
    FIXED: ClassVar[struct.Struct] = struct.Struct(">I")
    request_id: str
    timeout_ms: int

    def encode(self) -> bytes:
        return _frame(self.TYPE, self.FIXED.pack(self.timeout_ms) + _pack_str16(self.request_id))

    @classmethod
    def decode(cls, body: memoryview) -> Subscribe:
        _need(body, cls.FIXED.size, "SUBSCRIBE")
        (timeout_ms,) = cls.FIXED.unpack_from(body)
        request_id, pos = _unpack_str16(body, cls.FIXED.size, "SUBSCRIBE request_id")
        _no_trailing(body, pos, "SUBSCRIBE")
        if not 0 < len(request_id) <= MAX_REQUEST_ID:
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, "SUBSCRIBE request_id length")
        return cls(request_id, timeout_ms)


@dataclass(frozen=True, slots=True)
class ShmAttach:
    """Engine offers a shared-memory staging arena (a file under /dev/shm) for this connection."""

    TYPE: ClassVar[int] = FrameType.SHM_ATTACH
    FIXED: ClassVar[struct.Struct] = struct.Struct(">Q")
    size: int
    path: str

    def encode(self) -> bytes:
        return _frame(self.TYPE, self.FIXED.pack(self.size) + _pack_str16(self.path))

    @classmethod
    def decode(cls, body: memoryview) -> ShmAttach:
        _need(body, cls.FIXED.size, "SHM_ATTACH")
        (size,) = cls.FIXED.unpack_from(body)
        path, pos = _unpack_str16(body, cls.FIXED.size, "SHM_ATTACH path")
        _no_trailing(body, pos, "SHM_ATTACH")
        return cls(size, path)


@dataclass(frozen=True, slots=True)
class ShmAttached:
    TYPE: ClassVar[int] = FrameType.SHM_ATTACHED
    FIXED: ClassVar[struct.Struct] = struct.Struct(">Q")
    size: int

    def encode(self) -> bytes:
        return _frame(self.TYPE, self.FIXED.pack(self.size))

    @classmethod
    def decode(cls, body: memoryview) -> ShmAttached:
        _exact(body, cls.FIXED.size, "SHM_ATTACHED")
        return cls(*cls.FIXED.unpack_from(body))


@dataclass(frozen=True, slots=True)
class ShmChunk:
    """A chunk whose bytes lie in the engine's arena at ``arena_offset`` (engine -> daemon)."""

    TYPE: ClassVar[int] = FrameType.SHM_CHUNK
    TAIL: ClassVar[struct.Struct] = struct.Struct(">QI4x")
    meta: ChunkMeta
    arena_offset: int

    def encode(self) -> bytes:
        body = self.meta.pack() + self.TAIL.pack(self.arena_offset, self.meta.raw_length)
        return _frame(self.TYPE, body)

    @classmethod
    def decode(cls, body: memoryview) -> ShmChunk:
        _exact(body, ChunkMeta.FIXED.size + cls.TAIL.size, "SHM_CHUNK")
        meta = ChunkMeta.unpack(body)
        arena_offset, wire_length = cls.TAIL.unpack_from(body, ChunkMeta.FIXED.size)
        if wire_length != meta.raw_length or meta.codec != CODEC_RAW:
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, "SHM_CHUNK carries raw bytes only")
        return cls(meta, arena_offset)


@dataclass(frozen=True, slots=True)
class LayerReady:
    """Daemon -> engine: a whole layer lies verified in the arena at ``arena_offset``."""

    TYPE: ClassVar[int] = FrameType.LAYER_READY
    FIXED: ClassVar[struct.Struct] = struct.Struct(">QI4xQQ")
    transfer_id: int
    layer: int
    arena_offset: int
    nbytes: int

    def encode(self) -> bytes:
        body = self.FIXED.pack(self.transfer_id, self.layer, self.arena_offset, self.nbytes)
        return _frame(self.TYPE, body)

    @classmethod
    def decode(cls, body: memoryview) -> LayerReady:
        _exact(body, cls.FIXED.size, "LAYER_READY")
        return cls(*cls.FIXED.unpack_from(body))


@dataclass(frozen=True, slots=True)
class Release:
    """Hands an arena region back to the side that allocated it."""

    TYPE: ClassVar[int] = FrameType.RELEASE
    FIXED: ClassVar[struct.Struct] = struct.Struct(">QQ")
    arena_offset: int
    length: int

    def encode(self) -> bytes:
        return _frame(self.TYPE, self.FIXED.pack(self.arena_offset, self.length))

    @classmethod
    def decode(cls, body: memoryview) -> Release:
        _exact(body, cls.FIXED.size, "RELEASE")
        return cls(*cls.FIXED.unpack_from(body))


Frame = (
    Hello
    | HelloAck
    | Open
    | Chunk
    | End
    | Complete
    | Credit
    | Abort
    | Ping
    | Pong
    | GoAway
    | Have
    | Subscribe
    | ShmAttach
    | ShmAttached
    | ShmChunk
    | LayerReady
    | Release
)

__all__ = [
    "CAP_CODECS",
    "CAP_DEDUP",
    "CAP_SHM",
    "CAP_STRIPING",
    "CODEC_RAW",
    "CODEC_SPLIT16",
    "CODEC_ZSTD",
    "FLAG_IGNORABLE",
    "HEADER_SIZE",
    "KNOWN_CAPS",
    "KNOWN_CODECS",
    "MAGIC",
    "MAX_REQUEST_ID",
    "PROTOCOL_VERSION",
    "ROLE_ENGINE",
    "ROLE_PEER",
    "Abort",
    "Chunk",
    "ChunkMeta",
    "Complete",
    "Credit",
    "End",
    "Frame",
    "FrameType",
    "GoAway",
    "Have",
    "Hello",
    "HelloAck",
    "LayerReady",
    "LayerSpec",
    "Open",
    "Ping",
    "Pong",
    "Release",
    "ShmAttach",
    "ShmAttached",
    "ShmChunk",
    "Subscribe",
    "chunk_table",
    "frame_header",
]

DECODERS = {
    cls.TYPE: cls.decode
    for cls in (
        Hello,
        HelloAck,
        Open,
        End,
        Complete,
        Credit,
        Abort,
        Ping,
        Pong,
        GoAway,
        Have,
        Subscribe,
        ShmAttach,
        ShmAttached,
        ShmChunk,
        LayerReady,
        Release,
    )
}
