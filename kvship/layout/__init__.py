"""Transfer layout: the per-layer dtype/shape/bytes of one request's KV, as numpy sees it.

The wire only needs bytes per layer (:class:`kvship.protocol.LayerSpec`); this module
maps between those specs and arrays, for dtypes numpy lacks too (bfloat16 without
ml_dtypes travels, and is handed over, as uint16 of the layer's shape: see
:func:`storage_dtype`). The model geometry (:mod:`.model`) and the prefix hash chain
(:mod:`.prefix`) of the dedup work live beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..protocol.frames import LayerSpec
from .model import DTYPE_SIZES


def _numpy_dtype(dtype: Any) -> np.dtype[Any] | None:
    """numpy's dtype for ``dtype`` (a name, type or dtype), or None where numpy lacks it
    (bfloat16 / float8 unless ml_dtypes was imported)."""
    try:
        dt: np.dtype[Any] = np.dtype(dtype)
    except TypeError:
        return None
    return dt


def layer_spec(dtype: Any, shape: Sequence[int]) -> LayerSpec:
    """The spec of one layer of ``dtype`` (numpy dtype, or a name such as "bfloat16" that
    numpy here may lack: :data:`DTYPE_SIZES` gives its width) and ``shape``."""
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    dt = _numpy_dtype(dtype)
    if dt is not None:
        name, itemsize = dt.name, dt.itemsize
    elif isinstance(dtype, str) and dtype in DTYPE_SIZES:
        name, itemsize = dtype, DTYPE_SIZES[dtype]
    else:
        raise ValueError(
            f"unknown dtype {dtype!r} (numpy lacks it and it is not one of "
            f"{', '.join(DTYPE_SIZES)})"
        )
    return LayerSpec(name, shape, int(np.prod(shape, dtype=np.int64)) * itemsize)


def spec_of(array: Any) -> LayerSpec:
    """Spec of a numpy or CuPy array, or a torch tensor (anything with .dtype and .shape).

    It names numpy's dtype: a bf16 layer held as its uint16 stand-in (see
    :func:`storage_dtype`) is "uint16" here; build the layout with
    ``layer_spec("bfloat16", shape)`` to keep the label (``Sender.put`` takes the
    stand-in for such a layer)."""
    dtype = array.dtype
    if _numpy_dtype(dtype) is None and not isinstance(dtype, str):
        dtype = str(dtype).removeprefix("torch.")  # torch.bfloat16 -> "bfloat16"
    return layer_spec(dtype, array.shape)


def layout_of(arrays: Sequence[Any]) -> tuple[LayerSpec, ...]:
    """The specs of arrays that exist already (``send_arrays``, the CLI). An engine that
    streams layers as prefill makes them builds the layout from the model's geometry
    instead (:func:`layer_spec`, :func:`uniform_layout`)."""
    return tuple(spec_of(a) for a in arrays)


def uniform_layout(n_layers: int, dtype: Any, shape: Sequence[int]) -> tuple[LayerSpec, ...]:
    """``n_layers`` layers of the same shape: the common case for a dense or per-kind model."""
    spec = layer_spec(dtype, shape)
    return (spec,) * n_layers


def resolve_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype for a wire dtype name; raw bytes (uint8) where numpy lacks it.

    Tells "numpy knows it" from "it does not"; :func:`storage_dtype` is what
    :func:`as_array` hands out instead (the same-width unsigned integer)."""
    dt = _numpy_dtype(name)
    return np.dtype(np.uint8) if dt is None else dt


def storage_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype a layer of wire dtype ``name`` is handed over as.

    numpy's own where it knows the name (``bfloat16`` too once ``ml_dtypes`` is
    imported); else the unsigned integer of the same width holding the raw bits
    (``bfloat16`` -> ``uint16``, ``float8_e4m3fn`` -> ``uint8``), so the array keeps the
    layer's shape without optional packages; ``arr.view(ml_dtypes.bfloat16)`` or
    ``torch.from_numpy(arr).view(torch.bfloat16)`` reinterprets it without a copy.
    Raw bytes (uint8) for a name of unknown width.
    """
    dt = _numpy_dtype(name)
    if dt is not None:
        return dt
    size = DTYPE_SIZES.get(name)
    return np.dtype(f"u{size}") if size in (1, 2, 4, 8) else np.dtype(np.uint8)


def as_array(buffer: memoryview, spec: LayerSpec) -> np.ndarray[Any, np.dtype[Any]]:
    """A zero-copy array over ``buffer`` with the layer's shape and
    :func:`storage_dtype` (bf16 without ml_dtypes: ``uint16`` of the layer's shape).

    Falls back to a flat uint8 array only when the spec's shape cannot hold its bytes
    (a dtype of unknown width, or a spec whose nbytes do not match), so the bytes are
    never lost.
    """
    flat = np.frombuffer(buffer, dtype=np.uint8, count=spec.nbytes)
    dt = storage_dtype(spec.dtype)
    count = int(np.prod(spec.shape, dtype=np.int64))
    if count * dt.itemsize != spec.nbytes:
        return flat
    return flat.view(dt).reshape(spec.shape)


__all__ = [
    "LayerSpec",
    "as_array",
    "layer_spec",
    "layout_of",
    "resolve_dtype",
    "spec_of",
    "storage_dtype",
    "uniform_layout",
]

# Model geometry and the prefix hash chain (the dedup work), beside the transfer layouts.
from .model import (  # noqa: E402
    FullAttention,
    LayerKind,
    LayoutError,
    LinearState,
    ModelLayout,
)
from .prefix import PREFIX_SEED, block_keys, full_prefix_key, namespace  # noqa: E402
from .presets import preset, preset_names  # noqa: E402

__all__ += [
    "DTYPE_SIZES",
    "PREFIX_SEED",
    "FullAttention",
    "LayerKind",
    "LayoutError",
    "LinearState",
    "ModelLayout",
    "block_keys",
    "full_prefix_key",
    "namespace",
    "preset",
    "preset_names",
]
