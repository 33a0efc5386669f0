"""OPEN (0x03) and its metadata (SPEC §5.3): the fixed part, the token ids, the JSON meta.

The meta is one RFC 8259 object in UTF-8; :func:`parse_meta` is the one validator, used on
what the wire carried (after ``json.loads``) and on what this side is about to send.
"""

from __future__ import annotations

import json
import struct
import sys
from array import array
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeGuard

from .base import frame_bytes, malformed, need
from .constants import MAX_REQUEST_ID, FrameType
from .errors import ProtocolError
from .geometry import LayerSpec, chunk_table

_NATIVE_LITTLE = sys.byteorder == "little"
OPEN_RESUME = 0x01  # OPEN flags bit 0 (SPEC §5.3, §7.7)


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


def parse_meta(meta: Any) -> tuple[tuple[LayerSpec, ...], str, str, dict[str, Any]]:
    """(layers, request_id, peer, extra) of a meta object, or ``MALFORMED_FRAME``."""

    def bad(why: str) -> ProtocolError:
        return malformed(f"OPEN meta: {why}")

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


def check_fixed(chunk_size: int, n_stripes: int, stripe: int) -> None:
    """The rules on OPEN's fixed part that need no layout."""
    if chunk_size == 0:
        raise malformed("OPEN chunk_size is 0")
    if n_stripes == 0 or stripe >= n_stripes:
        raise malformed(f"OPEN stripe {stripe} of {n_stripes} stripes")


@dataclass(frozen=True, slots=True)
class Open:
    """Opens a transfer on this connection (sent on every stripe that carries its chunks)."""

    TYPE: ClassVar[int] = FrameType.OPEN
    NAME: ClassVar[str] = "OPEN"
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
    resume: bool = False  # flags bit 0 (CAP_RESUME): re-opens a transfer on new connections

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

    def check(self) -> None:
        """What a receiver's decoder would refuse in this frame (``MALFORMED_FRAME``)."""
        check_fixed(self.chunk_size, self.n_stripes, self.stripe)
        parse_meta(self.meta())

    def encode(self) -> bytes:
        fixed = self.FIXED.pack(
            self.transfer_id,
            self.total_bytes,
            self.n_chunks,
            self.chunk_size,
            self.n_stripes,
            self.stripe,
            self.priority,
            OPEN_RESUME if self.resume else 0,
            0,
            len(self.token_ids),
        )
        meta = json.dumps(self.meta(), separators=(",", ":"), allow_nan=False).encode()
        return frame_bytes(self.TYPE, fixed + _pack_tokens(self.token_ids) + meta)

    @classmethod
    def decode(cls, body: memoryview) -> Open:
        need(body, cls.FIXED.size, "OPEN")
        (tid, total, n_chunks, chunk_size, n_stripes, stripe, prio, flags, _, n_tokens) = (
            cls.FIXED.unpack_from(body)
        )
        pos = cls.FIXED.size
        need(body, pos + 4 * n_tokens, "OPEN token_ids")
        tokens = _unpack_tokens(body[pos : pos + 4 * n_tokens])
        pos += 4 * n_tokens
        try:
            meta = json.loads(
                bytes(body[pos:]).decode("utf-8"),
                parse_constant=_reject_constant,
                object_pairs_hook=_unique_keys,
            )
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise malformed(f"OPEN meta is not JSON: {exc}") from exc
        layers, request_id, peer, extra = parse_meta(meta)
        check_fixed(chunk_size, n_stripes, stripe)
        frame = cls(
            tid,
            request_id,
            layers,
            chunk_size,
            tokens,
            n_stripes,
            stripe,
            prio,
            peer,
            extra,
            bool(flags & OPEN_RESUME),  # the other bits are reserved: ignored
        )
        if frame.total_bytes != total or frame.n_chunks != n_chunks:
            raise malformed(
                f"OPEN says {total} bytes in {n_chunks} chunks, its layers make "
                f"{frame.total_bytes} bytes in {frame.n_chunks} chunks",
            )
        return frame
