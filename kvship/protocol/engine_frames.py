"""The local engine API's frames (SPEC §5.11–§5.16, §9): subscriptions and the
shared-memory arena. Only on engine connections, each in its direction (:mod:`.roles`)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from .base import FixedFrame, Tail, exact, frame_bytes, malformed
from .constants import CODEC_RAW, MAX_REQUEST_ID, FrameType
from .peer_frames import ChunkMeta


@dataclass(frozen=True, slots=True)
class Subscribe(FixedFrame):
    """Engine asks its daemon for a request's KV, waiting up to ``timeout_ms`` for it to arrive."""

    TYPE: ClassVar[int] = FrameType.SUBSCRIBE
    NAME: ClassVar[str] = "SUBSCRIBE"
    FIXED: ClassVar[struct.Struct] = struct.Struct(">I")
    FIELDS: ClassVar[tuple[str | None, ...]] = ("timeout_ms",)
    TAIL: ClassVar[tuple[Tail, ...]] = (Tail("request_id"),)
    request_id: str
    timeout_ms: int

    @classmethod
    def build(cls, fields: dict[str, Any]) -> Subscribe:
        if not 0 < len(fields["request_id"]) <= MAX_REQUEST_ID:
            raise malformed("SUBSCRIBE request_id length")
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class ShmAttach(FixedFrame):
    """Engine offers a shared-memory staging arena (a file under /dev/shm) for this connection."""

    TYPE: ClassVar[int] = FrameType.SHM_ATTACH
    NAME: ClassVar[str] = "SHM_ATTACH"
    FIXED: ClassVar[struct.Struct] = struct.Struct(">Q")
    FIELDS: ClassVar[tuple[str | None, ...]] = ("size",)
    TAIL: ClassVar[tuple[Tail, ...]] = (Tail("path"),)
    size: int
    path: str


@dataclass(frozen=True, slots=True)
class ShmAttached(FixedFrame):
    TYPE: ClassVar[int] = FrameType.SHM_ATTACHED
    NAME: ClassVar[str] = "SHM_ATTACHED"
    FIXED: ClassVar[struct.Struct] = struct.Struct(">Q")
    FIELDS: ClassVar[tuple[str | None, ...]] = ("size",)
    size: int


@dataclass(frozen=True, slots=True)
class ShmChunk:
    """A chunk whose bytes lie in the engine's arena at ``arena_offset`` (engine -> daemon)."""

    TYPE: ClassVar[int] = FrameType.SHM_CHUNK
    NAME: ClassVar[str] = "SHM_CHUNK"
    TAIL: ClassVar[struct.Struct] = struct.Struct(">QI4x")
    meta: ChunkMeta
    arena_offset: int

    def encode(self) -> bytes:
        body = self.meta.pack() + self.TAIL.pack(self.arena_offset, self.meta.raw_length)
        return frame_bytes(self.TYPE, body)

    @classmethod
    def decode(cls, body: memoryview) -> ShmChunk:
        exact(body, ChunkMeta.FIXED.size + cls.TAIL.size, "SHM_CHUNK")
        meta = ChunkMeta.unpack(body)
        arena_offset, wire_length = cls.TAIL.unpack_from(body, ChunkMeta.FIXED.size)
        if wire_length != meta.raw_length or meta.codec != CODEC_RAW:
            raise malformed("SHM_CHUNK carries raw bytes only")
        return cls(meta, arena_offset)


@dataclass(frozen=True, slots=True)
class LayerReady(FixedFrame):
    """Daemon -> engine: a whole layer lies verified in the arena at ``arena_offset``."""

    TYPE: ClassVar[int] = FrameType.LAYER_READY
    NAME: ClassVar[str] = "LAYER_READY"
    FIXED: ClassVar[struct.Struct] = struct.Struct(">QI4xQQ")
    FIELDS: ClassVar[tuple[str | None, ...]] = ("transfer_id", "layer", "arena_offset", "nbytes")
    transfer_id: int
    layer: int
    arena_offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Release(FixedFrame):
    """Hands an arena region back to the side that allocated it."""

    TYPE: ClassVar[int] = FrameType.RELEASE
    NAME: ClassVar[str] = "RELEASE"
    FIXED: ClassVar[struct.Struct] = struct.Struct(">QQ")
    FIELDS: ClassVar[tuple[str | None, ...]] = ("arena_offset", "length")
    arena_offset: int
    length: int
