"""Resuming a transfer on new connections (SPEC §7.7, with ``CAP_RESUME``): the frames.

The receiver acknowledges every chunk it holds (ACK: chunk indices, batched), so the
sender may free a chunk only once it is safe on the far side. When connections are lost,
the sender connects again and re-opens the transfer with OPEN's ``resume`` flag; the
receiver answers RESUME, a bitmap of the chunks it holds, and the sender sends the rest.
Indices rather than per-stripe counts: chunks are verified (and decoded) out of arrival
order, and a resumed transfer's chunks travel on other stripes than the first time.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from .base import exact, frame_bytes, malformed, need
from .constants import MAX_CHUNKS, FrameType

_ACK = struct.Struct(">QI")
_RESUME = struct.Struct(">QI")


@dataclass(frozen=True, slots=True)
class ChunkList:
    """A transfer id and chunk indices (ACK, SKIP): ``transfer_id:u64 count:u32`` then
    ``count`` u32 indices, 1 .. MAX_CHUNKS of them."""

    TYPE: ClassVar[int]
    NAME: ClassVar[str]
    transfer_id: int
    chunks: tuple[int, ...]

    def encode(self) -> bytes:
        body = _ACK.pack(self.transfer_id, len(self.chunks))
        return frame_bytes(self.TYPE, body + struct.pack(f">{len(self.chunks)}I", *self.chunks))

    @classmethod
    def decode(cls, body: memoryview) -> Self:
        need(body, _ACK.size, cls.NAME)
        tid, count = _ACK.unpack_from(body)
        if count == 0 or count > MAX_CHUNKS:
            raise malformed(f"{cls.NAME} of {count} chunks (1..{MAX_CHUNKS})")
        exact(body, _ACK.size + 4 * count, cls.NAME)
        return cls(tid, struct.unpack_from(f">{count}I", body, _ACK.size))


@dataclass(frozen=True, slots=True)
class Ack(ChunkList):
    """Receiver -> sender: these chunks of the transfer are held, verified (SPEC §5.20)."""

    TYPE: ClassVar[int] = FrameType.ACK
    NAME: ClassVar[str] = "ACK"


@dataclass(frozen=True, slots=True)
class Skip(ChunkList):
    """Daemon -> engine (CAP_SKIP): the receiver holds these chunks of the engine's put
    already (dedup), so the engine may leave them out of it (SPEC §5.24, §9.1.1)."""

    TYPE: ClassVar[int] = FrameType.SKIP
    NAME: ClassVar[str] = "SKIP"


@dataclass(frozen=True, slots=True)
class Resume:
    """Receiver -> sender, answering a resuming OPEN: which chunks it holds (§5.21)."""

    TYPE: ClassVar[int] = FrameType.RESUME
    NAME: ClassVar[str] = "RESUME"
    transfer_id: int
    n_chunks: int
    held: bytes  # bit i (byte i // 8, bit i % 8, least significant first): chunk i is held

    @classmethod
    def of(cls, transfer_id: int, n_chunks: int, held: set[int] | frozenset[int]) -> Resume:
        bitmap = bytearray((n_chunks + 7) // 8)
        for index in held:
            bitmap[index >> 3] |= 1 << (index & 7)
        return cls(transfer_id, n_chunks, bytes(bitmap))

    def holds(self, index: int) -> bool:
        return bool(self.held[index >> 3] & (1 << (index & 7)))

    def held_chunks(self) -> set[int]:
        return {i for i in range(self.n_chunks) if self.holds(i)}

    def encode(self) -> bytes:
        return frame_bytes(self.TYPE, _RESUME.pack(self.transfer_id, self.n_chunks) + self.held)

    @classmethod
    def decode(cls, body: memoryview) -> Resume:
        need(body, _RESUME.size, "RESUME")
        tid, n_chunks = _RESUME.unpack_from(body)
        if n_chunks > MAX_CHUNKS:
            raise malformed(f"RESUME of {n_chunks} chunks > {MAX_CHUNKS}")
        exact(body, _RESUME.size + (n_chunks + 7) // 8, "RESUME")
        held = bytes(body[_RESUME.size :])
        if n_chunks % 8 and held[-1] >> (n_chunks % 8):
            raise malformed("RESUME sets bits past n_chunks")
        return cls(tid, n_chunks, held)
