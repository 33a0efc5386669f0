"""Transfer layout: the per-layer dtype/shape/bytes of one request's KV, as numpy sees it.

The wire only needs bytes per layer (:class:`kvship.protocol.LayerSpec`); this module
maps between those specs and arrays. The model geometry and prefix hash chain of the
dedup work will live beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..protocol.frames import LayerSpec


def dtype_name(dtype: Any) -> str:
    """A dtype's portable name ("float16", "bfloat16" with ml_dtypes, "uint8", ...)."""
    return np.dtype(dtype).name


def layer_spec(dtype: Any, shape: Sequence[int]) -> LayerSpec:
    dt = np.dtype(dtype)
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    return LayerSpec(dt.name, shape, int(np.prod(shape, dtype=np.int64)) * dt.itemsize)


def spec_of(array: Any) -> LayerSpec:
    """Spec of a numpy or CuPy array (anything with .dtype and .shape)."""
    return layer_spec(array.dtype, array.shape)


def layout_of(arrays: Sequence[Any]) -> tuple[LayerSpec, ...]:
    return tuple(spec_of(a) for a in arrays)


def uniform_layout(n_layers: int, dtype: Any, shape: Sequence[int]) -> tuple[LayerSpec, ...]:
    """``n_layers`` layers of the same shape: the common case for a dense or per-kind model."""
    spec = layer_spec(dtype, shape)
    return (spec,) * n_layers


def resolve_dtype(name: str) -> np.dtype:
    """The numpy dtype for a wire dtype name; raw bytes (uint8) where numpy lacks it."""
    try:
        return np.dtype(name)
    except TypeError:
        return np.dtype(np.uint8)


def as_array(buffer: memoryview, spec: LayerSpec) -> np.ndarray:
    """A zero-copy array over ``buffer`` with the layer's dtype and shape.

    Falls back to a flat uint8 array when the dtype is unknown to numpy here (bf16
    without ml_dtypes), so the bytes are never lost.
    """
    dt = resolve_dtype(spec.dtype)
    flat = np.frombuffer(buffer, dtype=np.uint8, count=spec.nbytes)
    if dt == np.uint8 and spec.dtype != "uint8":
        return flat
    return flat.view(dt).reshape(spec.shape)


__all__ = [
    "LayerSpec",
    "as_array",
    "dtype_name",
    "layer_spec",
    "layout_of",
    "resolve_dtype",
    "spec_of",
    "uniform_layout",
]

# Model geometry and the prefix hash chain (the dedup work), beside the transfer layouts.
from .model import (  # noqa: E402
    DTYPE_SIZES,
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
