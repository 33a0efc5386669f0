"""Reusable receive buffers for coded chunks.

A compressed chunk's wire bytes live only from the moment its CHUNK header is parsed until
a codec worker has decoded them into their destination. A fresh ``bytearray(n)`` for each
one zero-fills n bytes first (glibc serves it from the heap once its mmap threshold has
risen, so calloc must memset): with compression on, that memset was 39 % of the receiving
daemon's event-loop time (py-spy, docs/benchmarks.md). The pool hands the same buffers
out again instead, nothing zero-filled, since every byte is overwritten by the socket.
"""

from __future__ import annotations

SMALLEST = 64 << 10  # buffers below this are cheap to allocate: one class for all of them


def size_class(nbytes: int) -> int:
    """The capacity of the pooled buffer that holds ``nbytes``: the next power of two."""
    return max(SMALLEST, 1 << (nbytes - 1).bit_length())


class ScratchPool:
    """Buffers by size class, at most ``limit_bytes`` of them idle.

    Buffers in use are bounded by the peer links' credit, not by the pool; one that is never
    given back (its connection failed mid-chunk) is simply garbage, so a lost buffer costs
    an allocation, never correctness. A buffer goes back only once nothing reads it any more.
    """

    def __init__(self, limit_bytes: int = 32 << 20) -> None:
        self.limit_bytes = limit_bytes
        self.idle_bytes = 0
        self._free: dict[int, list[bytearray]] = {}

    def take(self, nbytes: int) -> memoryview:
        """A writable view of exactly ``nbytes``, its contents undefined."""
        cls = size_class(nbytes)
        free = self._free.get(cls)
        if free:
            buf = free.pop()
            self.idle_bytes -= cls
        else:
            buf = bytearray(cls)
        return memoryview(buf)[:nbytes]

    def give(self, view: memoryview) -> None:
        """Return the buffer behind ``view`` (from ``take``); kept if the pool has room."""
        buf = view.obj
        if not isinstance(buf, bytearray):
            return
        cls = len(buf)
        if cls != size_class(cls) or self.idle_bytes + cls > self.limit_bytes:
            return  # not one of ours, or the pool is full: let it go
        self._free.setdefault(cls, []).append(buf)
        self.idle_bytes += cls
