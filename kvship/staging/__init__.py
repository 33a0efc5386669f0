"""Staging buffers between engines and daemons: shared-memory arenas, pinning, copies."""

from .arena import Arena, RingAllocator
from .pinned import HAVE_CUPY, copy_from_host, copy_to_host, is_device_array, pin, unpin

__all__ = [
    "HAVE_CUPY",
    "Arena",
    "RingAllocator",
    "copy_from_host",
    "copy_to_host",
    "is_device_array",
    "pin",
    "unpin",
]
