"""Staging buffers between engines and daemons: shared-memory arenas, pinning, copies."""

from .arena import Arena, RingAllocator
from .copies import Source, StagingCopy, copy_in, copy_out, source_of
from .device import HAVE_CUPY, DeviceBuffer, device_buffer
from .pinned import pin, unpin

__all__ = [
    "HAVE_CUPY",
    "Arena",
    "DeviceBuffer",
    "RingAllocator",
    "Source",
    "StagingCopy",
    "copy_in",
    "copy_out",
    "device_buffer",
    "pin",
    "source_of",
    "unpin",
]
