"""Shared-memory staging arena: the buffer an engine and its local daemon both map.

An engine writes a layer's bytes into the arena once; the daemon sends them to the
wire straight from there (and on the receiving side, receives straight into it), so
the engine<->daemon hop costs one memcpy instead of a socket round trip. The arena is
a file under /dev/shm: the creator unlinks it once the daemon has mapped it, so it
never outlives the two processes. With a GPU, the region is also page-locked
(see :mod:`kvship.staging.pinned`) so device<->host copies run at full PCIe speed.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import stat
from collections import deque
from collections.abc import Sequence

import numpy as np

SHM_DIR = "/dev/shm"
PAGE = mmap.PAGESIZE


def share_with_group(fd: int, group: int) -> None:
    """Give the file to ``group`` (rw for it), when this process may: its owner may
    choose any group it belongs to. Otherwise the file stays private (0600)."""
    try:
        os.fchown(fd, -1, group)
    except PermissionError:
        return
    os.fchmod(fd, 0o660)


class Arena:
    """A mapped shared-memory region; ``view(offset, length)`` gives writable memoryviews."""

    def __init__(self, path: str, size: int, mm: mmap.mmap, owner: bool) -> None:
        self.path = path
        self.size = size
        self._mmap = mm
        self._owner = owner
        self.buffer = memoryview(mm)

    @classmethod
    def create(cls, size: int, prefix: str = "kvship", group: int | None = None) -> Arena:
        """A new arena with every page allocated and faulted in before data flows (that
        costs ~0.5 s per GiB): ENOSPC now, as an OSError, if /dev/shm cannot hold it
        (never a SIGBUS on first touch). The work releases the GIL, so callers run it in
        a worker thread, off their event loop.

        ``group``: a daemon running as another user maps the arena through this group
        (the group of its engine socket: whoever may connect may share memory with it);
        the file is then 0660, else 0600."""
        if size <= 0:
            raise ValueError("arena size must be positive")
        path = os.path.join(SHM_DIR, f"{prefix}-{os.getpid()}-{secrets.token_hex(8)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if group is not None and group != os.getegid():
                share_with_group(fd, group)
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            # One write per page maps it (MAP_POPULATE would do it holding the GIL).
            np.frombuffer(mm, np.uint8)[::PAGE] = 0
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(path, size, mm, owner=True)

    @classmethod
    def attach(cls, path: str, size: int) -> Arena:
        """Map an arena another process created; refuses paths outside /dev/shm."""
        real = os.path.realpath(path)
        if os.path.dirname(real) != SHM_DIR or not os.path.basename(real).startswith("kvship-"):
            raise ValueError(f"arena path {path!r} is not a kvship file under {SHM_DIR}")
        fd = os.open(real, os.O_RDWR | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"arena {path!r} is not a regular file")
            actual = st.st_size
            if actual != size or size <= 0:
                raise ValueError(f"arena {path!r} is {actual} B, announced {size} B")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(real, size, mm, owner=False)

    def view(self, offset: int, length: int) -> memoryview:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"region {offset}+{length} outside the {self.size} B arena")
        return self.buffer[offset : offset + length]

    def unlink(self) -> None:
        """Remove the name; the mapping lives on until both sides close it."""
        if self._owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._owner = False

    def close(self) -> None:
        self.unlink()
        # While a view is still exported (an engine kept a layer array) the mapping
        # cannot close now; it goes away with its last reference instead.
        with contextlib.suppress(BufferError):
            self.buffer.release()
            self._mmap.close()


class RingAllocator:
    """Contiguous regions handed out in ring order; released in any order.

    Staging traffic is FIFO-ish (chunks leave roughly in the order they came), so a
    ring is simple and never fragments for long: space is reclaimed as soon as the
    oldest live region is released.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._live: deque[list[int]] = deque()  # [offset, length, released]
        self._by_offset: dict[int, list[int]] = {}
        self._head = 0
        self.in_use = 0

    def allocate(self, length: int) -> int | None:
        """Offset of a free region of ``length`` bytes, or None when the ring is full."""
        return self.allocate_run((length,))

    def allocate_run(self, lengths: Sequence[int]) -> int | None:
        """Regions of ``lengths`` bytes back to back, all or none: the offset of the first
        (None when the ring has no room for them together). Each is released on its own,
        so one copy can fill a whole layer while its chunks leave one by one."""
        total = sum(lengths)
        if not lengths or min(lengths) <= 0 or total > self.capacity:
            raise ValueError(f"cannot allocate {list(lengths)} B from a {self.capacity} B arena")
        offset = self._fit(total)
        if offset is None:
            return None
        start = offset
        for length in lengths:
            entry = [offset, length, 0]
            self._live.append(entry)
            self._by_offset[offset] = entry
            offset += length
        self._head = offset
        self.in_use += total
        return start

    def _fit(self, length: int) -> int | None:
        if not self._live:
            return 0
        tail, head = self._live[0][0], self._head
        if head > tail:
            if self.capacity - head >= length:
                return head
            return 0 if tail >= length else None
        return head if tail - head >= length else None

    def release(self, offset: int, length: int) -> None:
        entry = self._by_offset.get(offset)
        if entry is None or entry[1] != length:
            raise ValueError(f"release of {offset}+{length}: no such region")
        del self._by_offset[offset]
        entry[2] = 1
        self.in_use -= length
        while self._live and self._live[0][2]:
            self._live.popleft()
        while self._live and self._live[-1][2]:  # the newest end frees up too
            self._live.pop()
        self._head = self._live[-1][0] + self._live[-1][1] if self._live else 0
