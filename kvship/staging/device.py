"""GPU memory as kvship sees it: a device pointer and a byte count, whoever allocated it.

Engines hand kvship CuPy arrays, torch CUDA tensors, or anything speaking the CUDA array
interface or DLPack. Staging copies raw bytes, so all it needs of them is where the bytes
are, how many, and that they are contiguous; dtypes CuPy lacks (torch's bfloat16) pass
through untouched. Without CuPy (or a device) nothing here is a device buffer, and
everything in :mod:`kvship.staging` runs on numpy.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

try:  # pragma: no cover - depends on the machine
    import cupy

    HAVE_CUPY = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:  # ImportError, or CUDA present but unusable
    cupy = None
    HAVE_CUPY = False

DLPACK_CUDA = 2  # DLDeviceType kDLCUDA


@dataclass(frozen=True)
class DeviceBuffer:
    """``nbytes`` contiguous bytes at ``ptr`` on GPU ``device``; ``owner`` keeps the memory
    alive while a copy is in flight."""

    ptr: int
    nbytes: int
    device: int
    owner: Any


def looks_like_device_array(obj: Any) -> bool:
    """Whether ``obj`` claims to live on a GPU (true even where CuPy is missing)."""
    if getattr(obj, "is_cuda", False) or hasattr(obj, "__cuda_array_interface__"):
        return True
    dlpack_device = getattr(obj, "__dlpack_device__", None)
    if dlpack_device is None:
        return False
    try:
        return int(dlpack_device()[0]) == DLPACK_CUDA
    except Exception:
        return False


def device_buffer(obj: Any) -> DeviceBuffer | None:
    """The GPU memory behind ``obj``, or None for host memory (numpy, bytes).

    Raises ``ValueError`` for a non-contiguous device array that CuPy cannot make
    contiguous, and :class:`RuntimeError` for a device array where CuPy is missing."""
    if not looks_like_device_array(obj):
        return None
    if not HAVE_CUPY:
        raise RuntimeError(
            f"a GPU array ({type(obj).__name__}) but no usable CuPy: install kvship[gpu]"
        )
    if isinstance(obj, cupy.ndarray):  # pragma: no cover - GPU only
        array = cupy.ascontiguousarray(obj)  # on the current stream, when it must copy
        return DeviceBuffer(array.data.ptr, array.nbytes, array.device.id, array)
    if getattr(obj, "is_cuda", False) and hasattr(obj, "data_ptr"):  # pragma: no cover
        return _torch_buffer(obj)
    if hasattr(obj, "__cuda_array_interface__"):  # pragma: no cover - GPU only
        return _interface_buffer(obj)
    array = cupy.from_dlpack(obj)  # pragma: no cover - GPU only
    return device_buffer(array)  # pragma: no cover


def _torch_buffer(tensor: Any) -> DeviceBuffer:  # pragma: no cover - GPU only
    """torch tensors directly: their CUDA array interface refuses bfloat16."""
    if not tensor.is_contiguous():
        raise ValueError("a non-contiguous CUDA tensor: pass tensor.contiguous()")
    nbytes = tensor.numel() * tensor.element_size()
    return DeviceBuffer(tensor.data_ptr(), nbytes, tensor.device.index or 0, tensor)


def _interface_buffer(obj: Any) -> DeviceBuffer:  # pragma: no cover - GPU only
    face = obj.__cuda_array_interface__
    shape, itemsize = tuple(face["shape"]), int(face["typestr"][2:])
    strides = face.get("strides")
    if strides is not None and tuple(strides) != _c_strides(shape, itemsize):
        raise ValueError("a non-contiguous CUDA array: make it contiguous first")
    ptr = int(face["data"][0])
    attributes = cupy.cuda.runtime.pointerGetAttributes(ptr)
    return DeviceBuffer(ptr, math.prod(shape) * itemsize, attributes.device, obj)


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for extent in reversed(shape):
        strides.append(step)
        step *= extent
    return tuple(reversed(strides))


def cuda_stream(stream: Any) -> Any:  # pragma: no cover - GPU only
    """A CuPy stream for ``stream``: a CuPy stream, a torch stream (``.cuda_stream``), a
    raw ``cudaStream_t`` as int; None: CuPy's current stream."""
    if stream is None:
        return cupy.cuda.get_current_stream()
    if isinstance(stream, cupy.cuda.Stream | cupy.cuda.ExternalStream):
        return stream
    pointer = getattr(stream, "cuda_stream", stream)
    return cupy.cuda.ExternalStream(int(pointer))


_side_streams: dict[int, Any] = {}
_side_lock = threading.Lock()


def side_stream(device: int) -> Any:  # pragma: no cover - GPU only
    """kvship's own copy stream on ``device``: non-blocking, so staging copies never wait
    for (nor hold up) the legacy default stream an engine's kernels may run on."""
    with _side_lock:
        stream = _side_streams.get(device)
        if stream is None:
            with cupy.cuda.Device(device):
                stream = _side_streams[device] = cupy.cuda.Stream(non_blocking=True)
        return stream
