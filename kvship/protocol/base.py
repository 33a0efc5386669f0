"""What every frame codec shares: the header, length checks, str16/bytes16 fields, and
:class:`FixedFrame`, the base of every frame whose body is one struct (plus, for some,
trailing str16/bytes16 fields): encode and decode come from ``FIXED`` and ``FIELDS``.

Decoders take the body as a memoryview and raise :class:`ProtocolError` on anything that
does not parse; they never trust a length field.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar, Self

from .constants import FLAG_IGNORABLE, HEADER, FrameType
from .errors import ErrorCode, ProtocolError

_U16 = struct.Struct(">H")


def frame_header(frame_type: int, body_length: int, flags: int = 0) -> bytes:
    return HEADER.pack(body_length, frame_type, flags, 0)


def frame_bytes(frame_type: int, body: bytes, flags: int = 0) -> bytes:
    return frame_header(frame_type, len(body), flags) + body


def pad_header(body_length: int) -> bytes:
    """The header of a PAD frame (SPEC §5.23): ``body_length`` bytes a receiver reads and
    drops, known type or not (FLAG_IGNORABLE). A daemon warms a new connection's congestion
    window with them; the body's content is irrelevant (zeros)."""
    return frame_header(FrameType.PAD, body_length, FLAG_IGNORABLE)


def malformed(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.MALFORMED_FRAME, message)


def need(body: memoryview, size: int, name: str) -> None:
    if len(body) < size:
        raise malformed(f"{name} body is {len(body)} bytes, needs at least {size}")


def exact(body: memoryview, size: int, name: str) -> None:
    if len(body) != size:
        raise malformed(f"{name} body is {len(body)} bytes, must be {size}")


def no_trailing(body: memoryview, pos: int, name: str) -> None:
    if pos != len(body):
        raise malformed(f"{name}: {len(body) - pos} trailing bytes after the body")


def pack_str16(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    if len(raw) > 0xFFFF:
        raise ValueError("string field longer than 65535 bytes")
    return _U16.pack(len(raw)) + raw


def unpack_bytes16(body: memoryview, pos: int, name: str) -> tuple[bytes, int]:
    need(body, pos + 2, name)
    (n,) = _U16.unpack_from(body, pos)
    need(body, pos + 2 + n, name)
    return bytes(body[pos + 2 : pos + 2 + n]), pos + 2 + n


def unpack_str16(body: memoryview, pos: int, name: str) -> tuple[str, int]:
    raw, pos = unpack_bytes16(body, pos, name)
    try:
        return raw.decode(), pos
    except UnicodeDecodeError as exc:
        raise malformed(f"{name}: string is not UTF-8") from exc


class Tail:
    """A variable-length field after the struct: ``str16`` (text) or ``bytes16``."""

    __slots__ = ("binary", "max_chars", "name")

    def __init__(self, name: str, *, binary: bool = False, max_chars: int | None = None) -> None:
        self.name = name
        self.binary = binary
        self.max_chars = max_chars  # the encoder truncates to this many characters


class Packed:
    """A struct of named fields: ``FIELDS`` names ``FIXED``'s items in order, ``None`` for
    a reserved item (written 0, ignored when read; pad bytes ``x`` need no entry).

    ``pack_fixed`` / ``unpack_fixed`` are generated per class from ``FIELDS`` (as
    dataclasses generates ``__init__``): ChunkMeta goes through them for every chunk.
    """

    __slots__ = ()
    FIXED: ClassVar[struct.Struct]
    FIELDS: ClassVar[tuple[str | None, ...]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields = cls.__dict__.get("FIELDS")
        if fields is None:
            return
        if not all(f is None or f.isidentifier() for f in fields):
            raise TypeError(f"{cls.__name__}.FIELDS must be identifiers or None")
        args = ", ".join("0" if f is None else f"self.{f}" for f in fields)
        items = ", ".join(f"{f!r}: v[{i}]" for i, f in enumerate(fields) if f is not None)
        source = (
            f"def pack_fixed(self):\n    return pack({args})\n"
            f"def unpack_fixed(body, pos=0):\n    v = unpack_from(body, pos)\n"
            f"    return {{{items}}}\n"
        )
        namespace: dict[str, Any] = {"pack": cls.FIXED.pack, "unpack_from": cls.FIXED.unpack_from}
        exec(source, namespace)  # generated from FIELDS only (checked above)
        cls.pack_fixed = namespace["pack_fixed"]  # type: ignore[method-assign]
        cls.unpack_fixed = staticmethod(namespace["unpack_fixed"])  # type: ignore[method-assign]

    def pack_fixed(self) -> bytes:
        """``FIXED`` packed from this object's fields (reserved items 0)."""
        raise NotImplementedError  # generated per class

    @classmethod
    def unpack_fixed(cls, body: memoryview | bytes, pos: int = 0) -> dict[str, Any]:
        """The named items of ``FIXED`` read at ``pos``."""
        raise NotImplementedError  # generated per class


class FixedFrame(Packed):
    """A frame whose body is ``FIXED`` then the ``TAIL`` fields, nothing else.

    Without a tail the body has exactly ``FIXED.size`` bytes. Subclasses are frozen
    dataclasses whose fields carry the names in ``FIELDS`` and ``TAIL``; :meth:`build`
    is where a subclass checks (and converts) what it read.
    """

    __slots__ = ()
    TYPE: ClassVar[int]
    NAME: ClassVar[str]
    TAIL: ClassVar[tuple[Tail, ...]] = ()

    def body(self) -> bytes:
        out = self.pack_fixed()
        for tail in self.TAIL:
            value = getattr(self, tail.name)
            if tail.max_chars is not None:
                value = value[: tail.max_chars]
            out += pack_str16(value)
        return out

    def encode(self) -> bytes:
        return frame_bytes(self.TYPE, self.body())

    @classmethod
    def decode(cls, body: memoryview) -> Self:
        if cls.TAIL:
            need(body, cls.FIXED.size, cls.NAME)
        else:
            exact(body, cls.FIXED.size, cls.NAME)
        fields = cls.unpack_fixed(body)
        pos = cls.FIXED.size
        for tail in cls.TAIL:
            where = f"{cls.NAME} {tail.name}"
            if tail.binary:
                fields[tail.name], pos = unpack_bytes16(body, pos, where)
            else:
                fields[tail.name], pos = unpack_str16(body, pos, where)
        no_trailing(body, pos, cls.NAME)
        return cls.build(fields)

    @classmethod
    def build(cls, fields: dict[str, Any]) -> Self:
        """The frame from its decoded fields; raise ProtocolError for what breaks a rule."""
        return cls(**fields)
