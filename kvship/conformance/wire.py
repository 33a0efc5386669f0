"""The kvship v1 frames, encoded and decoded from protocol/SPEC.md's text alone.

This module deliberately imports nothing of :mod:`kvship.protocol`: it is a second, small
implementation of the SPEC's byte layouts (§2-§5, §7.2, §8, §12), so the conformance kit
checks another implementation against the SPEC rather than against the reference code,
and the golden vectors check this module (tests/test_conformance.py).

Frames are ``(name, fields)`` pairs: ``name`` as in the SPEC's §4 table (``"CHUNK"``),
``fields`` a dict with the SPEC's field names (§5). Byte strings are ``bytes`` (HELLO's
``auth``, CHUNK's ``data``); CHUNK and SHM_CHUNK carry their ChunkMeta as a nested ``meta``
dict; OPEN also lists its ``total_bytes`` and ``n_chunks`` (derived from the layers when
encoding unless given, so a check can make an OPEN lie about them). Reserved fields are
written as 0 and never returned.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any, TypeGuard

import xxhash

# ------------------------------------------------------------------ §2, §3, §11 constants
MAGIC = b"\x89KVSHIP\n"
HEADER = struct.Struct(">IBBH")  # length, type, flags, reserved
HEADER_SIZE = HEADER.size
FLAG_IGNORABLE = 0x80
HANDSHAKE_MAX_BODY = 65536
MAX_CHUNKS = 1 << 20
MAX_WINDOW = 2**31 - 1
PROTOCOL_VERSION = 1
MAX_REQUEST_ID = 256  # code points
MAX_DTYPE = 32  # code points

ROLE_PEER = 1
ROLE_ENGINE = 2
AUTH_NONE = 0

CAP_SHM = 0x1
CAP_STRIPING = 0x2
CAP_CODECS = 0x4
CAP_DEDUP = 0x8
CAP_AUTH = 0x10  # granted only after the pre-shared-key exchange (§6.4)
CAP_RESUME = 0x20  # ACK / RESUME, OPEN's resume flag (§7.7)
CAP_OPEN_CHECK = 0x40  # END's open_check (§7.4)
CAP_HOLD = 0x80  # HOLD pauses one transfer's chunks (§7.8)
CAP_DEDUP_TAIL = 0x100  # the chunk straddling a held prefix travels as its tail (§7.6.5)
CAP_SKIP = 0x200  # engine API: SKIP names chunks of a put the engine may omit (§9.1.1)
KNOWN_CAPS = (
    CAP_SHM
    | CAP_STRIPING
    | CAP_CODECS
    | CAP_DEDUP
    | CAP_AUTH
    | CAP_RESUME
    | CAP_OPEN_CHECK
    | CAP_HOLD
    | CAP_DEDUP_TAIL
    | CAP_SKIP
)
# What the kit's checks offer unless they test one of the others on purpose.
BASE_CAPS = CAP_SHM | CAP_STRIPING | CAP_CODECS | CAP_DEDUP

CODEC_RAW = 0
CODEC_ZSTD = 1
CODEC_SPLIT16 = 2

CHUNK_META_SIZE = 40

# ------------------------------------------------------------------------- §4 types
FRAME_TYPES: dict[str, int] = {
    "HELLO": 0x01,
    "HELLO_ACK": 0x02,
    "OPEN": 0x03,
    "CHUNK": 0x04,
    "END": 0x05,
    "COMPLETE": 0x06,
    "CREDIT": 0x07,
    "ABORT": 0x08,
    "PING": 0x09,
    "PONG": 0x0A,
    "GOAWAY": 0x0B,
    "AUTH_CHALLENGE": 0x0E,
    "AUTH_PROOF": 0x0F,
    "HAVE": 0x10,
    "SUBSCRIBE": 0x20,
    "SHM_ATTACH": 0x21,
    "SHM_ATTACHED": 0x22,
    "SHM_CHUNK": 0x23,
    "LAYER_READY": 0x24,
    "RELEASE": 0x25,
    "HOLD": 0x26,
    "SKIP": 0x28,
}
TYPE_NAMES: dict[int, str] = {v: k for k, v in FRAME_TYPES.items()}

# ------------------------------------------------------------------------ §12 errors
ERROR_CODES: dict[str, int] = {
    "NO_ERROR": 0,
    "PROTOCOL_ERROR": 1,
    "BAD_MAGIC": 2,
    "UNSUPPORTED_VERSION": 3,
    "FRAME_TOO_LARGE": 4,
    "MALFORMED_FRAME": 5,
    "UNKNOWN_FRAME": 6,
    "FLOW_CONTROL": 7,
    "TOO_MANY_TRANSFERS": 8,
    "UNKNOWN_TRANSFER": 9,
    "CHECKSUM_MISMATCH": 10,
    "DIGEST_MISMATCH": 11,
    "AUTH_FAILED": 12,
    "LAYOUT_MISMATCH": 13,
    "NOT_FOUND": 14,
    "CANCELLED": 15,
    "SHUTTING_DOWN": 16,
    "INTERNAL_ERROR": 17,
    "PEER_UNREACHABLE": 18,
    "UNSUPPORTED_CODEC": 19,
    "TIMEOUT": 20,
    "TRANSFER_TOO_LARGE": 21,
}
ERROR_NAMES: dict[int, str] = {v: k for k, v in ERROR_CODES.items()}


def error_name(code: int) -> str:
    """The §12 name of ``code``; unknown codes read as ``INTERNAL_ERROR`` (§5.8), shown with
    their number so a report still says what came."""
    return ERROR_NAMES.get(code, f"INTERNAL_ERROR(unknown code {code})")


class WireError(Exception):
    """A frame that breaks a SPEC rule; ``code`` is the §12 name the SPEC assigns."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _malformed(message: str) -> WireError:
    return WireError("MALFORMED_FRAME", message)


Fields = dict[str, Any]

# ------------------------------------------------------------------ §1 primitives
_U16 = struct.Struct(">H")


def _str16(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _U16.pack(len(raw)) + raw


def _bytes16(raw: bytes) -> bytes:
    return _U16.pack(len(raw)) + raw


class _Reader:
    """A bounds-checked cursor over one frame body."""

    def __init__(self, body: bytes, what: str) -> None:
        self.body = body
        self.pos = 0
        self.what = what

    def take(self, n: int, field: str) -> bytes:
        if self.pos + n > len(self.body):
            raise _malformed(f"{self.what}: body ends inside {field}")
        out = self.body[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: struct.Struct, field: str) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size, field))

    def str16(self, field: str) -> str:
        (n,) = self.unpack(_U16, f"{field} length")
        raw = self.take(n, field)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _malformed(f"{self.what}: {field} is not UTF-8") from exc

    def bytes16(self, field: str) -> bytes:
        (n,) = self.unpack(_U16, f"{field} length")
        return self.take(n, field)

    def rest(self) -> bytes:
        out = self.body[self.pos :]
        self.pos = len(self.body)
        return out

    def done(self) -> None:
        if self.pos != len(self.body):
            raise _malformed(f"{self.what}: {len(self.body) - self.pos} trailing bytes")


# ---------------------------------------------------------------- §7.2 chunking, §8
def chunk_table(layer_sizes: Sequence[int], chunk_size: int) -> list[int]:
    """``starts`` of §7.2: layer l holds chunks starts[l] .. starts[l+1]-1."""
    starts = [0]
    for n in layer_sizes:
        starts.append(starts[-1] + -(-n // chunk_size))
    return starts


def chunk_places(layer_sizes: Sequence[int], chunk_size: int) -> list[tuple[int, int, int, int]]:
    """Every chunk as (index, layer, offset, raw_length), in index order (§7.2)."""
    places = []
    index = 0
    for layer, n in enumerate(layer_sizes):
        for offset in range(0, n, chunk_size):
            places.append((index, layer, offset, min(chunk_size, n - offset)))
            index += 1
    return places


def checksum(data: bytes | bytearray | memoryview) -> int:
    """§8: a chunk's checksum, xxh3-64 seed 0 of its uncompressed bytes."""
    return xxhash.xxh3_64_intdigest(bytes(data))


def digest(checksums: Sequence[int]) -> int:
    """§8: xxh3-64 of the checksums as u64 big-endian in chunk-index order."""
    return xxhash.xxh3_64_intdigest(struct.pack(f">{len(checksums)}Q", *checksums))


# ----------------------------------------------------------------- §5.3 OPEN meta
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def _is_text(value: Any, lo: int, hi: int) -> bool:
    if not isinstance(value, str) or not lo <= len(value) <= hi:
        return False
    try:
        value.encode("utf-8")  # a lone surrogate (\ud800) does not encode
    except UnicodeEncodeError:
        return False
    return True


def _is_int(value: Any) -> TypeGuard[int]:
    return type(value) is int  # bool is not an integer here (§5.3)


def encode_meta(fields: Fields) -> bytes:
    """The reference form of §5.3: compact, keys in order, non-ASCII escaped."""
    meta: dict[str, Any] = {
        "request_id": fields["request_id"],
        "layers": [
            {"dtype": x["dtype"], "shape": list(x["shape"]), "nbytes": x["nbytes"]}
            for x in fields["layers"]
        ],
    }
    if fields.get("peer"):
        meta["peer"] = fields["peer"]
    if fields.get("extra"):
        meta["extra"] = fields["extra"]
    return json.dumps(meta, separators=(",", ":"), ensure_ascii=True).encode()


def decode_meta(raw: bytes) -> Fields:
    """Parse and check OPEN's meta (§5.3); WireError(MALFORMED_FRAME) when it breaks a rule."""
    try:
        text = raw.decode("utf-8")
        if text.startswith("\ufeff"):
            raise ValueError("BOM")
        meta = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique)
    except (ValueError, RecursionError) as exc:
        raise _malformed(f"OPEN meta is not one JSON object: {exc}") from exc
    if not isinstance(meta, dict):
        raise _malformed("OPEN meta is not an object")
    if not _is_text(meta.get("request_id"), 1, MAX_REQUEST_ID):
        raise _malformed("OPEN meta request_id")
    layers = meta.get("layers")
    if not isinstance(layers, list) or not layers:
        raise _malformed("OPEN meta layers must be a non-empty array")
    out_layers = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise _malformed(f"OPEN meta layers[{i}] is not an object")
        dtype, shape, nbytes = layer.get("dtype"), layer.get("shape"), layer.get("nbytes")
        if not _is_text(dtype, 1, MAX_DTYPE):
            raise _malformed(f"OPEN meta layers[{i}].dtype")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**40 for d in shape):
            raise _malformed(f"OPEN meta layers[{i}].shape")
        if not _is_int(nbytes) or not 0 <= nbytes < 2**48:
            raise _malformed(f"OPEN meta layers[{i}].nbytes")
        out_layers.append({"dtype": dtype, "shape": list(shape), "nbytes": nbytes})
    peer = meta.get("peer", "")
    if not _is_text(peer, 0, len(raw)):
        raise _malformed("OPEN meta peer")
    extra = meta.get("extra", {})
    if not isinstance(extra, dict):
        raise _malformed("OPEN meta extra is not an object")
    return {"request_id": meta["request_id"], "layers": out_layers, "peer": peer, "extra": extra}


# --------------------------------------------------------------------- frame bodies
_HELLO = struct.Struct(">HHBBHQ")
_HELLO_ACK = struct.Struct(">HHIQIIII")
_OPEN = struct.Struct(">QQIIHHBBHI")
_META = struct.Struct(">QIIQIBBHQ")
_END = struct.Struct(">QIIQ")
_COMPLETE = struct.Struct(">QQQ")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_ABORT = struct.Struct(">QH")
_HAVE = struct.Struct(">QIB3x")
_HOLD = struct.Struct(">QB3x")  # §5.22
_SKIP = struct.Struct(">QI")  # §5.24: then count u32 chunk indices
_SHM_CHUNK_TAIL = struct.Struct(">QI4x")
_LAYER_READY = struct.Struct(">QIIQQ")
_RELEASE = struct.Struct(">QQ")


def pack_chunk_meta(meta: Fields) -> bytes:
    return _META.pack(
        meta["transfer_id"],
        meta["chunk_index"],
        meta["layer"],
        meta["offset"],
        meta["raw_length"],
        meta.get("codec", CODEC_RAW),
        0,
        0,
        meta["checksum"],
    )


def unpack_chunk_meta(raw: bytes) -> Fields:
    tid, index, layer, offset, raw_length, codec, _, _, csum = _META.unpack(raw)
    return {
        "transfer_id": tid,
        "chunk_index": index,
        "layer": layer,
        "offset": offset,
        "raw_length": raw_length,
        "checksum": csum,
        "codec": codec,
    }


def _fixed_bytes(value: bytes, size: int) -> bytes:
    if len(value) != size:
        raise ValueError(f"expected {size} bytes, got {len(value)}")
    return bytes(value)


def encode_body(name: str, f: Fields) -> bytes:
    """The body of frame ``name`` from its fields (no checks: a check may lie on purpose)."""
    if name == "HELLO":
        return (
            _HELLO.pack(
                f.get("min_version", PROTOCOL_VERSION),
                f.get("max_version", PROTOCOL_VERSION),
                f["role"],
                f.get("auth_method", AUTH_NONE),
                0,
                f.get("capabilities", 0),
            )
            + _str16(f.get("node_name", ""))
            + _bytes16(f.get("auth", b""))
        )
    if name == "HELLO_ACK":
        return _HELLO_ACK.pack(
            f["version"],
            0,
            0,
            f["capabilities"],
            f["initial_window"],
            f["max_frame"],
            f["max_chunk"],
            f["max_transfers"],
        ) + _str16(f.get("node_name", ""))
    if name == "OPEN":
        sizes = [x["nbytes"] for x in f["layers"]]
        tokens = list(f.get("token_ids", ()))
        fixed = _OPEN.pack(
            f["transfer_id"],
            f.get("total_bytes", sum(sizes)),
            f.get("n_chunks", chunk_table(sizes, f["chunk_size"])[-1]),
            f["chunk_size"],
            f.get("n_stripes", 1),
            f.get("stripe", 0),
            f.get("priority", 0),
            1 if f.get("resume") else 0,  # flags: bit 0 = resume (§5.3, §7.7)
            0,
            len(tokens),
        )
        meta = f["meta_raw"] if "meta_raw" in f else encode_meta(f)
        return fixed + struct.pack(f">{len(tokens)}I", *tokens) + meta
    if name == "CHUNK":
        return pack_chunk_meta(f["meta"]) + bytes(f["data"])
    if name == "END":
        # open_check: §7.4, with CAP_OPEN_CHECK (else 0)
        return _END.pack(
            f["transfer_id"], f["chunks_on_stripe"], f.get("open_check", 0), f["digest"]
        )
    if name == "COMPLETE":
        return _COMPLETE.pack(f["transfer_id"], f["total_bytes"], f["digest"])
    if name == "CREDIT":
        return _U32.pack(f["increment"])
    if name == "ABORT":
        return _ABORT.pack(f["transfer_id"], f["code"]) + _str16(f.get("message", ""))
    if name in ("PING", "PONG"):
        return _U64.pack(f["opaque"])
    if name == "AUTH_CHALLENGE":  # §5.18: nonce (32) + mac (32)
        return _fixed_bytes(f["nonce"], 32) + _fixed_bytes(f["mac"], 32)
    if name == "AUTH_PROOF":  # §5.19
        return _fixed_bytes(f["mac"], 32)
    if name == "GOAWAY":
        return _U16.pack(f["code"]) + _str16(f.get("message", ""))
    if name == "HAVE":
        return _HAVE.pack(f["transfer_id"], f["blocks"], int(bool(f.get("states", False))))
    if name == "HOLD":
        return _HOLD.pack(f["transfer_id"], int(bool(f.get("hold", True))))
    if name == "SKIP":
        chunks = list(f["chunks"])
        return _SKIP.pack(f["transfer_id"], len(chunks)) + struct.pack(f">{len(chunks)}I", *chunks)
    if name == "SUBSCRIBE":
        return _U32.pack(f.get("timeout_ms", 0)) + _str16(f["request_id"])
    if name == "SHM_ATTACH":
        return _U64.pack(f["size"]) + _str16(f["path"])
    if name == "SHM_ATTACHED":
        return _U64.pack(f["size"])
    if name == "SHM_CHUNK":
        meta = f["meta"]
        wire_length = f.get("wire_length", meta["raw_length"])
        return pack_chunk_meta(meta) + _SHM_CHUNK_TAIL.pack(f["arena_offset"], wire_length)
    if name == "LAYER_READY":
        return _LAYER_READY.pack(f["transfer_id"], f["layer"], 0, f["arena_offset"], f["nbytes"])
    if name == "RELEASE":
        return _RELEASE.pack(f["arena_offset"], f["length"])
    raise ValueError(f"no frame named {name!r}")


def frame(ftype: int, body: bytes, flags: int = 0, reserved: int = 0) -> bytes:
    """One whole frame: the §3 header, then ``body``."""
    return HEADER.pack(len(body), ftype, flags, reserved) + body


def encode(name: str, fields: Fields | None = None, flags: int = 0) -> bytes:
    """One whole frame named ``name`` (§4) with ``fields`` (§5)."""
    return frame(FRAME_TYPES[name], encode_body(name, fields or {}), flags)


def _exact(body: bytes, size: int, what: str) -> None:
    if len(body) != size:
        raise _malformed(f"{what} body of {len(body)} B, exactly {size} B expected")


def decode_body(name: str, body: bytes) -> Fields:
    """Fields of a frame body, with every §5 rule checked (WireError with the SPEC's code)."""
    r = _Reader(body, name)
    if name == "HELLO":
        lo, hi, role, auth_method, _, caps = r.unpack(_HELLO, "HELLO fixed part")
        node_name = r.str16("node_name")
        auth = r.bytes16("auth")
        r.done()
        if lo > hi:
            raise _malformed(f"HELLO min_version {lo} > max_version {hi}")
        if role not in (ROLE_PEER, ROLE_ENGINE):
            raise _malformed(f"HELLO role {role}")
        return {
            "role": role,
            "node_name": node_name,
            "min_version": lo,
            "max_version": hi,
            "capabilities": caps,
            "auth_method": auth_method,
            "auth": auth,
        }
    if name == "HELLO_ACK":
        version, _, _, caps, window, max_frame, max_chunk, max_transfers = r.unpack(
            _HELLO_ACK, "HELLO_ACK fixed part"
        )
        node_name = r.str16("node_name")
        r.done()
        if window > MAX_WINDOW:
            raise WireError("FLOW_CONTROL", f"HELLO_ACK initial_window {window} > 2^31-1")
        if max_chunk < 1:
            raise _malformed("HELLO_ACK max_chunk 0")
        if max_frame < max_chunk + CHUNK_META_SIZE:
            raise _malformed(f"HELLO_ACK max_frame {max_frame} < max_chunk {max_chunk} + 40")
        return {
            "version": version,
            "capabilities": caps,
            "initial_window": window,
            "max_frame": max_frame,
            "max_chunk": max_chunk,
            "max_transfers": max_transfers,
            "node_name": node_name,
        }
    if name == "OPEN":
        (tid, total, n_chunks, chunk_size, n_stripes, stripe, priority, flags, _, n_tokens) = (
            r.unpack(_OPEN, "OPEN fixed part")
        )
        tokens = list(struct.unpack(f">{n_tokens}I", r.take(4 * n_tokens, "token_ids")))
        meta = decode_meta(r.rest())
        if chunk_size < 1:
            raise _malformed("OPEN chunk_size 0")
        if n_stripes < 1 or stripe >= n_stripes:
            raise _malformed(f"OPEN stripe {stripe} of {n_stripes}")
        sizes = [x["nbytes"] for x in meta["layers"]]
        want_total, want_chunks = sum(sizes), chunk_table(sizes, chunk_size)[-1]
        if total != want_total or n_chunks != want_chunks:
            raise _malformed(
                f"OPEN says {total} B / {n_chunks} chunks, its layers make "
                f"{want_total} B / {want_chunks}"
            )
        return {
            "transfer_id": tid,
            "request_id": meta["request_id"],
            "layers": meta["layers"],
            "chunk_size": chunk_size,
            "token_ids": tokens,
            "n_stripes": n_stripes,
            "stripe": stripe,
            "priority": priority,
            "peer": meta["peer"],
            "extra": meta["extra"],
            "resume": bool(flags & 1),
            "total_bytes": total,
            "n_chunks": n_chunks,
        }
    if name == "CHUNK":
        if len(body) < CHUNK_META_SIZE:
            raise _malformed(f"CHUNK body of {len(body)} B < 40 B")
        meta = unpack_chunk_meta(body[:CHUNK_META_SIZE])
        data = body[CHUNK_META_SIZE:]
        if meta["codec"] == CODEC_RAW and len(data) != meta["raw_length"]:
            raise _malformed(f"raw CHUNK carries {len(data)} B for raw_length {meta['raw_length']}")
        if meta["codec"] != CODEC_RAW and not 0 < len(data) < meta["raw_length"]:
            raise _malformed(f"coded CHUNK of {len(data)} B for raw_length {meta['raw_length']}")
        return {"meta": meta, "data": data}
    if name == "END":
        _exact(body, _END.size, name)
        tid, count, check, dig = _END.unpack(body)
        return {"transfer_id": tid, "chunks_on_stripe": count, "digest": dig, "open_check": check}
    if name == "COMPLETE":
        _exact(body, _COMPLETE.size, name)
        tid, total, dig = _COMPLETE.unpack(body)
        return {"transfer_id": tid, "total_bytes": total, "digest": dig}
    if name == "CREDIT":
        _exact(body, _U32.size, name)
        (increment,) = _U32.unpack(body)
        if increment < 1:
            raise WireError("FLOW_CONTROL", "CREDIT increment 0")
        return {"increment": increment}
    if name == "ABORT":
        tid, code = r.unpack(_ABORT, "ABORT fixed part")
        message = r.str16("message")
        r.done()
        return {"transfer_id": tid, "code": code, "message": message}
    if name in ("PING", "PONG"):
        _exact(body, _U64.size, name)
        return {"opaque": _U64.unpack(body)[0]}
    if name == "AUTH_CHALLENGE":
        _exact(body, 64, name)
        return {"nonce": body[:32], "mac": body[32:]}
    if name == "AUTH_PROOF":
        _exact(body, 32, name)
        return {"mac": body}
    if name == "GOAWAY":
        (code,) = r.unpack(_U16, "GOAWAY code")
        message = r.str16("message")
        r.done()
        return {"code": code, "message": message}
    if name == "HAVE":
        _exact(body, _HAVE.size, name)
        tid, blocks, states = _HAVE.unpack(body)
        if states > 1:
            raise _malformed(f"HAVE states {states}")
        return {"transfer_id": tid, "blocks": blocks, "states": bool(states)}
    if name == "HOLD":
        _exact(body, _HOLD.size, name)
        tid, hold = _HOLD.unpack(body)
        if hold > 1:
            raise _malformed(f"HOLD hold {hold}")
        return {"transfer_id": tid, "hold": bool(hold)}
    if name == "SKIP":
        tid, count = r.unpack(_SKIP, "SKIP fixed part")
        if not 1 <= count <= MAX_CHUNKS:
            raise _malformed(f"SKIP of {count} chunks (1..{MAX_CHUNKS})")
        _exact(body, _SKIP.size + 4 * count, name)
        return {
            "transfer_id": tid,
            "chunks": list(struct.unpack_from(f">{count}I", body, _SKIP.size)),
        }
    if name == "SUBSCRIBE":
        (timeout_ms,) = r.unpack(_U32, "SUBSCRIBE timeout_ms")
        request_id = r.str16("request_id")
        r.done()
        if not 1 <= len(request_id) <= MAX_REQUEST_ID:
            raise _malformed("SUBSCRIBE request_id length")
        return {"request_id": request_id, "timeout_ms": timeout_ms}
    if name == "SHM_ATTACH":
        (size,) = r.unpack(_U64, "SHM_ATTACH size")
        path = r.str16("path")
        r.done()
        return {"size": size, "path": path}
    if name == "SHM_ATTACHED":
        _exact(body, _U64.size, name)
        return {"size": _U64.unpack(body)[0]}
    if name == "SHM_CHUNK":
        _exact(body, CHUNK_META_SIZE + _SHM_CHUNK_TAIL.size, name)
        meta = unpack_chunk_meta(body[:CHUNK_META_SIZE])
        arena_offset, wire_length = _SHM_CHUNK_TAIL.unpack(body[CHUNK_META_SIZE:])
        if meta["codec"] != CODEC_RAW:
            raise _malformed("SHM_CHUNK codec must be 0")
        if wire_length != meta["raw_length"]:
            raise _malformed("SHM_CHUNK wire_length differs from raw_length")
        return {"meta": meta, "arena_offset": arena_offset, "wire_length": wire_length}
    if name == "LAYER_READY":
        _exact(body, _LAYER_READY.size, name)
        tid, layer, _, arena_offset, nbytes = _LAYER_READY.unpack(body)
        return {"transfer_id": tid, "layer": layer, "arena_offset": arena_offset, "nbytes": nbytes}
    if name == "RELEASE":
        _exact(body, _RELEASE.size, name)
        arena_offset, length = _RELEASE.unpack(body)
        return {"arena_offset": arena_offset, "length": length}
    raise ValueError(f"no frame named {name!r}")


def decode(data: bytes) -> tuple[str, Fields, int]:
    """One whole frame (header included, nothing after it) -> (name, fields, flags)."""
    if len(data) < HEADER_SIZE:
        raise _malformed("shorter than a frame header")
    length, ftype, flags, reserved = HEADER.unpack_from(data)
    if reserved:
        raise _malformed("header reserved field is not 0")
    if len(data) != HEADER_SIZE + length:
        raise _malformed(f"header says {length} body bytes, {len(data) - HEADER_SIZE} follow")
    name = TYPE_NAMES.get(ftype)
    if name is None:
        raise WireError("UNKNOWN_FRAME", f"frame type 0x{ftype:02x}")
    return name, decode_body(name, data[HEADER_SIZE:]), flags
