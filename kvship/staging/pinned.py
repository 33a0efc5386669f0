"""Page-locking staging memory and device<->host copies, with CuPy when a GPU is present.

Without CuPy (or without a device) everything degrades to numpy: arrays are already on
the host, so a "device->host copy" is a memcpy into the staging view. The GPU paths are
real CuPy calls (cudaHostRegister on the arena mapping, ``ndarray.get(out=...)`` and
``ndarray.set(...)`` through pinned memory) and are tested by the ``gpu``-marked tests.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

try:  # pragma: no cover - depends on the machine
    import cupy

    HAVE_CUPY = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:  # ImportError, or CUDA present but unusable
    cupy = None
    HAVE_CUPY = False


def is_device_array(array: Any) -> bool:
    return HAVE_CUPY and isinstance(array, cupy.ndarray)


def pin(buffer: memoryview) -> bool:
    """Page-lock a host buffer for fast DMA; False when there is no GPU to pin for."""
    if not HAVE_CUPY:
        return False
    ptr = ctypes.addressof(ctypes.c_char.from_buffer(buffer))  # pragma: no cover
    cupy.cuda.runtime.hostRegister(ptr, len(buffer), 0)  # pragma: no cover
    return True  # pragma: no cover


def unpin(buffer: memoryview) -> None:
    if HAVE_CUPY:  # pragma: no cover
        ptr = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        cupy.cuda.runtime.hostUnregister(ptr)


def copy_to_host(array: Any, dst: memoryview) -> None:
    """Copy an array's bytes (numpy, or CuPy on a GPU) into ``dst`` (len == nbytes)."""
    host = np.frombuffer(dst, dtype=np.uint8)
    if is_device_array(array):  # pragma: no cover - GPU only
        flat = cupy.ascontiguousarray(array).reshape(-1).view(cupy.uint8)
        flat.get(out=host)
        return
    src = np.ascontiguousarray(array)
    host[:] = src.reshape(-1).view(np.uint8)


def copy_from_host(src: memoryview, device_array: Any) -> None:
    """Fill a CuPy (or numpy) array from staged host bytes."""
    host = np.frombuffer(src, dtype=np.uint8)
    if is_device_array(device_array):  # pragma: no cover - GPU only
        device_array.reshape(-1).view(cupy.uint8).set(host)
        return
    np.copyto(device_array.reshape(-1).view(np.uint8), host)
