"""A model's KV geometry as data: which layers page their KV per token, which keep a state.

Hybrid models mix two kinds of layer, and they cost the link differently:

* :class:`FullAttention` keeps paged KV that grows with the prompt (``block_tokens`` tokens
  per block); only these layers' blocks are content-addressed by the prefix hash chain.
* :class:`LinearState` (linear attention, SWA window, SSM) keeps a fixed-size state per
  request, whatever the prompt length; it is reusable only for the exact same prefix.

A :class:`ModelLayout` loads from and saves to TOML or JSON; every check raises
:class:`LayoutError` naming the field, so a bad file says where it is wrong.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Bytes per element of the dtypes engines keep KV in. Names are numpy's ("bfloat16" as
# ml_dtypes spells it) so they match the wire's LayerSpec.dtype.
DTYPE_SIZES: dict[str, int] = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}
DEFAULT_DTYPE = "bfloat16"


class LayoutError(ValueError):
    """A layout that cannot be right; the message starts with the field's path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _check_dtype(field: str, dtype: Any) -> int:
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise LayoutError(field, f"unknown dtype {dtype!r} (known: {', '.join(DTYPE_SIZES)})")
    return DTYPE_SIZES[dtype]


def _check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LayoutError(field, f"must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class FullAttention:
    """A paged-KV layer: K and V per token (GQA/MHA), or one latent per token (MLA)."""

    block_tokens: int
    kv_heads: int
    head_dim: int
    dtype: str = DEFAULT_DTYPE
    mla_latent_dim: int | None = None
    rope_dim: int = 0

    kind = "full"

    def validate(self, where: str = "layer") -> None:
        _check_int(f"{where}.block_tokens", self.block_tokens, 1)
        _check_int(f"{where}.kv_heads", self.kv_heads, 1)
        _check_int(f"{where}.head_dim", self.head_dim, 1)
        _check_dtype(f"{where}.dtype", self.dtype)
        if self.mla_latent_dim is not None:
            _check_int(f"{where}.mla_latent_dim", self.mla_latent_dim, 1)
        _check_int(f"{where}.rope_dim", self.rope_dim, 0)
        if self.rope_dim and self.mla_latent_dim is None:
            raise LayoutError(f"{where}.rope_dim", "only MLA layers keep a separate rope part")

    @property
    def bytes_per_token(self) -> int:
        size = DTYPE_SIZES[self.dtype]
        if self.mla_latent_dim is not None:
            return (self.mla_latent_dim + self.rope_dim) * size
        return 2 * self.kv_heads * self.head_dim * size

    @property
    def block_bytes(self) -> int:
        """Bytes of one full block of this layer: the unit the store keys and ships."""
        return self.bytes_per_token * self.block_tokens

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind,
            "block_tokens": self.block_tokens,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
        }
        if self.mla_latent_dim is not None:
            d["mla_latent_dim"] = self.mla_latent_dim
            d["rope_dim"] = self.rope_dim
        return d


@dataclass(frozen=True)
class LinearState:
    """A fixed-size per-request state (recurrent matrix, conv tail, SWA window): its shapes."""

    shapes: tuple[tuple[int, ...], ...]
    dtype: str = DEFAULT_DTYPE

    kind = "linear"

    def validate(self, where: str = "layer") -> None:
        _check_dtype(f"{where}.dtype", self.dtype)
        if not isinstance(self.shapes, tuple) or not self.shapes:
            raise LayoutError(f"{where}.shapes", "must be a non-empty list of shapes")
        for i, shape in enumerate(self.shapes):
            if not isinstance(shape, tuple) or not shape:
                raise LayoutError(f"{where}.shapes[{i}]", f"must be a non-empty shape: {shape!r}")
            for j, d in enumerate(shape):
                _check_int(f"{where}.shapes[{i}][{j}]", d, 1)

    @property
    def state_bytes(self) -> int:
        return sum(math.prod(s) for s in self.shapes) * DTYPE_SIZES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "shapes": [list(s) for s in self.shapes], "dtype": self.dtype}


LayerKind = FullAttention | LinearState


@dataclass(frozen=True)
class ModelLayout:
    """The whole model's per-layer geometry (one tensor-parallel rank's share)."""

    name: str
    model_id: str
    layers: tuple[LayerKind, ...]
    tp_rank: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise LayoutError("name", "must be a non-empty string")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise LayoutError("model_id", "must be a non-empty string")
        _check_int("tp_rank", self.tp_rank, 0)
        if not isinstance(self.layers, tuple) or not self.layers:
            raise LayoutError("layers", "must be a non-empty list of layers")
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, FullAttention | LinearState):
                raise LayoutError(f"layers[{i}]", f"not a layer kind: {layer!r}")
            layer.validate(f"layers[{i}]")
        full = [
            (i, layer) for i, layer in enumerate(self.layers) if isinstance(layer, FullAttention)
        ]
        # The prefix chain keys blocks of one size; a model without paged layers has nothing
        # to key, so it is not a layout this package can serve.
        if not full:
            raise LayoutError("layers", "needs at least one full-attention layer")
        first = full[0][1].block_tokens
        for i, layer in full:
            if layer.block_tokens != first:
                raise LayoutError(
                    f"layers[{i}].block_tokens",
                    f"{layer.block_tokens} differs from the first full layer's {first}",
                )

    # ------------------------------------------------------------------ figures

    @property
    def block_tokens(self) -> int:
        first = self.layers[self.full_layers[0]]
        assert isinstance(first, FullAttention)  # full_layers holds only those
        return first.block_tokens

    @property
    def full_layers(self) -> tuple[int, ...]:
        return tuple(i for i, x in enumerate(self.layers) if isinstance(x, FullAttention))

    @property
    def linear_layers(self) -> tuple[int, ...]:
        return tuple(i for i, x in enumerate(self.layers) if isinstance(x, LinearState))

    @property
    def kv_bytes_per_token(self) -> int:
        return sum(x.bytes_per_token for x in self.layers if isinstance(x, FullAttention))

    @property
    def fixed_bytes_per_request(self) -> int:
        return sum(x.state_bytes for x in self.layers if isinstance(x, LinearState))

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(sorted({x.dtype for x in self.layers}))

    def bytes_for(self, tokens: int) -> int:
        """KV bytes one request of ``tokens`` tokens holds: paged part + fixed states."""
        _check_int("tokens", tokens, 0)
        return tokens * self.kv_bytes_per_token + self.fixed_bytes_per_request

    def summary(self, tokens: int | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "model_id": self.model_id,
            "layers": len(self.layers),
            "full_layers": len(self.full_layers),
            "linear_layers": len(self.linear_layers),
            "block_tokens": self.block_tokens,
            "dtypes": list(self.dtypes),
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "fixed_bytes_per_request": self.fixed_bytes_per_request,
        }
        if tokens is not None:
            d["tokens"] = tokens
            d["bytes_for_tokens"] = self.bytes_for(tokens)
        return d

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """Runs of equal consecutive layers become one entry with ``repeat`` (compact files)."""
        groups: list[dict[str, Any]] = []
        prev: LayerKind | None = None
        for layer in self.layers:
            if layer == prev:
                groups[-1]["repeat"] += 1
            else:
                groups.append({**layer.to_dict(), "repeat": 1})
            prev = layer
        return {
            "name": self.name,
            "model_id": self.model_id,
            "tp_rank": self.tp_rank,
            "layers": groups,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_toml(self) -> str:
        d = self.to_dict()
        lines = [f"{k} = {_toml_value(d[k])}" for k in ("name", "model_id", "tp_rank")]
        for group in d["layers"]:
            lines += ["", "[[layers]]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in group.items()]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_dict(cls, data: object) -> ModelLayout:
        """Build and check a layout from parsed TOML/JSON (any value: LayoutError if bad)."""
        if not isinstance(data, Mapping):
            raise LayoutError("layout", "must be a table/object")
        unknown = set(data) - {"name", "model_id", "tp_rank", "layers"}
        if unknown:
            raise LayoutError(sorted(unknown)[0], "unknown field")
        for field in ("name", "model_id", "layers"):
            if field not in data:
                raise LayoutError(field, "missing")
        groups = data["layers"]
        if not isinstance(groups, Sequence) or isinstance(groups, str | bytes):
            raise LayoutError("layers", "must be a list of layer tables")
        layers: list[LayerKind] = []
        for i, group in enumerate(groups):
            layer, repeat = _layer_from_dict(f"layers[{i}]", group)
            layers.extend([layer] * repeat)
        return cls(
            name=data["name"],
            model_id=data["model_id"],
            layers=tuple(layers),
            tp_rank=data.get("tp_rank", 0),
        )

    @classmethod
    def from_json(cls, text: str) -> ModelLayout:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LayoutError("layout", f"not JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_toml(cls, text: str) -> ModelLayout:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise LayoutError("layout", f"not TOML: {exc}") from None
        return cls.from_dict(data)


_FULL_FIELDS = {"block_tokens", "kv_heads", "head_dim", "dtype", "mla_latent_dim", "rope_dim"}
_LINEAR_FIELDS = {"shapes", "dtype"}


def _layer_from_dict(where: str, group: Any) -> tuple[LayerKind, int]:
    if not isinstance(group, Mapping):
        raise LayoutError(where, "must be a table/object")
    g = dict(group)
    kind = g.pop("kind", None)
    repeat = g.pop("repeat", 1)
    _check_int(f"{where}.repeat", repeat, 1)
    allowed = _FULL_FIELDS if kind == "full" else _LINEAR_FIELDS if kind == "linear" else None
    if allowed is None:
        raise LayoutError(f"{where}.kind", f"must be 'full' or 'linear', got {kind!r}")
    for field in g:
        if field not in allowed:
            raise LayoutError(f"{where}.{field}", f"unknown field for a {kind} layer")
    layer: LayerKind
    if kind == "full":
        for field in ("block_tokens", "kv_heads", "head_dim"):
            if field not in g:
                raise LayoutError(f"{where}.{field}", "missing")
        layer = FullAttention(**g)
    else:
        shapes = g.get("shapes")
        if not isinstance(shapes, list):
            raise LayoutError(f"{where}.shapes", "must be a list of shapes")
        for j, s in enumerate(shapes):
            if not isinstance(s, list):
                raise LayoutError(f"{where}.shapes[{j}]", f"must be a list of ints: {s!r}")
        layer = LinearState(tuple(tuple(s) for s in shapes), g.get("dtype", DEFAULT_DTYPE))
    layer.validate(where)
    return layer, repeat


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")
