"""Chunk checksums and the whole-transfer digest (SPEC.md, "Checksums").

A chunk's checksum is xxh3-64 (seed 0) of its uncompressed bytes. The transfer digest is
xxh3-64 over the chunks' checksums as 8-byte big-endian integers in chunk-index order:
chunks arrive out of order over several stripes, so the receiver can finish the digest
without ever holding the transfer's bytes, and it still covers every byte.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import xxhash

from .errors import ErrorCode, ProtocolError

_xxh3 = xxhash.xxh3_64_intdigest


def chunk_checksum(data: bytes | bytearray | memoryview) -> int:
    return _xxh3(data)


class TransferDigest:
    """Collects per-chunk checksums in any order; ``value()`` once all are in."""

    __slots__ = ("_checksums", "_missing", "_seen")

    def __init__(self, n_chunks: int) -> None:
        self._checksums = bytearray(8 * n_chunks)
        self._seen = bytearray(n_chunks)
        self._missing = n_chunks

    @property
    def complete(self) -> bool:
        return self._missing == 0

    def add(self, chunk_index: int, checksum: int) -> None:
        if not 0 <= chunk_index < len(self._seen):
            raise ProtocolError(
                ErrorCode.LAYOUT_MISMATCH, f"chunk index {chunk_index} out of range"
            )
        if self._seen[chunk_index]:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"chunk {chunk_index} arrived twice")
        self._seen[chunk_index] = 1
        struct.pack_into(">Q", self._checksums, 8 * chunk_index, checksum)
        self._missing -= 1

    def has(self, chunk_index: int) -> bool:
        """The chunk's checksum is in (a resumed transfer's copy of it is a duplicate)."""
        return 0 <= chunk_index < len(self._seen) and bool(self._seen[chunk_index])

    def held(self) -> set[int]:
        return {i for i, seen in enumerate(self._seen) if seen}

    def value(self, replaced: Mapping[int, int] | None = None) -> int:
        """The digest; ``replaced`` gives other checksums for some chunks (a receiving
        daemon's deduplicated delivery: the real checksums of the chunks it filled in from
        its store, where the peer hop counted 0)."""
        if self._missing:
            raise RuntimeError(f"{self._missing} chunks still missing")
        if not replaced:
            return _xxh3(self._checksums)
        checksums = bytearray(self._checksums)
        for index, checksum in replaced.items():
            struct.pack_into(">Q", checksums, 8 * index, checksum)
        return _xxh3(checksums)


def digest_of_checksums(checksums: list[int]) -> int:
    """Sender side: the digest from checksums already in index order."""
    return _xxh3(struct.pack(f">{len(checksums)}Q", *checksums))
