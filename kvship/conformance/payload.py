"""Chunk payloads and dedup keys, from protocol/SPEC.md §5.4.1 and §7.6: the kit's own
codecs, model geometry and prefix hash chain.

Like :mod:`.wire`, nothing here comes from the reference implementation (kvship.payload,
kvship.layout): only zstandard and xxhash, the project's dependencies.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from typing import Any

import xxhash
import zstandard

from .wire import CODEC_SPLIT16, CODEC_ZSTD

# ------------------------------------------------------------------- §5.4.1 codecs
SPLIT16_HEADER = struct.Struct(">BBHI")  # coder, reserved, reserved, hi_len
SPLIT16_CODER_ZSTD = 1


def zstd_frame(raw: bytes, *, content_size: bool = True) -> bytes:
    """One zstd frame (RFC 8878) of ``raw``: content size in the header, no checksum, no
    dictionary id (§5.4.1). ``content_size=False`` makes the invalid variant."""
    cctx = zstandard.ZstdCompressor(
        level=3, write_content_size=content_size, write_checksum=False, write_dict_id=False
    )
    if content_size:
        return cctx.compress(raw)
    # compress() records the size whenever it knows it; a stream writer with no size
    # given leaves it out.
    out = cctx.compressobj()
    return out.compress(raw) + out.flush()


def split16(raw: bytes) -> bytes:
    """The split16 data of ``raw`` (§5.4.1): header, zstd high plane, raw low plane, tail."""
    n = len(raw)
    m = n // 2
    high = raw[1 : 2 * m : 2]
    low = raw[0 : 2 * m : 2]
    tail = raw[2 * m :]
    hi = zstd_frame(high)
    return SPLIT16_HEADER.pack(SPLIT16_CODER_ZSTD, 0, 0, len(hi)) + hi + low + tail


def _unzstd(frame: bytes, size: int) -> bytes:
    params = zstandard.get_frame_parameters(frame)
    if params.content_size != size:
        raise ValueError(f"zstd content size {params.content_size}, expected {size}")
    return zstandard.ZstdDecompressor().decompress(frame, max_output_size=size)


def unsplit16(data: bytes, raw_length: int) -> bytes:
    """Inverse of :func:`split16` (the kit uses it to prove its encoder)."""
    coder, r1, r2, hi_len = SPLIT16_HEADER.unpack_from(data)
    if coder != SPLIT16_CODER_ZSTD or r1 or r2:
        raise ValueError("split16 header")
    m, t = raw_length // 2, raw_length % 2
    if len(data) != SPLIT16_HEADER.size + hi_len + m + t:
        raise ValueError("split16 length")
    pos = SPLIT16_HEADER.size
    high = _unzstd(data[pos : pos + hi_len], m)
    low = data[pos + hi_len : pos + hi_len + m]
    out = bytearray(raw_length)
    out[1 : 2 * m : 2] = high
    out[0 : 2 * m : 2] = low
    out[2 * m :] = data[pos + hi_len + m :]
    return bytes(out)


def encode_chunk(raw: bytes, codec: int) -> bytes:
    if codec == CODEC_ZSTD:
        return zstd_frame(raw)
    if codec == CODEC_SPLIT16:
        return split16(raw)
    raise ValueError(f"codec {codec}")


def decode_chunk(data: bytes, codec: int, raw_length: int) -> bytes:
    if codec == CODEC_ZSTD:
        return _unzstd(data, raw_length)
    if codec == CODEC_SPLIT16:
        return unsplit16(data, raw_length)
    raise ValueError(f"codec {codec}")


# -------------------------------------------------------- §7.6 dedup: layout + key chain
PREFIX_SEED = 0x6B76736869700001  # b"kvship\x00\x01" as a big-endian u64
DTYPE_SIZES = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}
DEFAULT_DTYPE = "bfloat16"
_STATE_TAG = b"S"


def expand_layers(model: dict[str, Any]) -> list[dict[str, Any]]:
    """The layout's layers one by one (``repeat`` unrolled, the key dropped)."""
    out: list[dict[str, Any]] = []
    for group in model["layers"]:
        layer = {k: v for k, v in group.items() if k != "repeat"}
        out.extend(dict(layer) for _ in range(group.get("repeat", 1)))
    return out


def block_tokens(model: dict[str, Any]) -> int:
    return int(next(x["block_tokens"] for x in expand_layers(model) if x["kind"] == "full"))


def block_bytes(layer: dict[str, Any]) -> int:
    """Bytes of one full block of a full-attention layer (K and V per token, or MLA)."""
    size = DTYPE_SIZES[layer.get("dtype", DEFAULT_DTYPE)]
    if layer.get("mla_latent_dim") is not None:
        per_token = (layer["mla_latent_dim"] + layer.get("rope_dim", 0)) * size
    else:
        per_token = 2 * layer["kv_heads"] * layer["head_dim"] * size
    return int(per_token * layer["block_tokens"])


def state_bytes(layer: dict[str, Any]) -> int:
    size = DTYPE_SIZES[layer.get("dtype", DEFAULT_DTYPE)]
    return sum(math.prod(shape) for shape in layer["shapes"]) * size


def layer_nbytes(model: dict[str, Any], n_tokens: int) -> list[int]:
    """§7.6 geometry: ⌈tokens / block_tokens⌉ blocks per full layer, the state's bytes per
    linear layer."""
    bt = block_tokens(model)
    n_blocks = -(-n_tokens // bt)
    return [
        n_blocks * block_bytes(x) if x["kind"] == "full" else state_bytes(x)
        for x in expand_layers(model)
    ]


def canonical_layer(layer: dict[str, Any]) -> dict[str, Any]:
    """A layer as the namespace writes it (§7.6.3): defaults applied, MLA members only for an
    MLA layer (``rope_dim`` even when 0), nothing else."""
    dtype = layer.get("dtype", DEFAULT_DTYPE)
    if layer["kind"] == "linear":
        return {"kind": "linear", "shapes": layer["shapes"], "dtype": dtype}
    out = {
        "kind": "full",
        "block_tokens": layer["block_tokens"],
        "kv_heads": layer["kv_heads"],
        "head_dim": layer["head_dim"],
        "dtype": dtype,
    }
    if layer.get("mla_latent_dim") is not None:
        out["mla_latent_dim"] = layer["mla_latent_dim"]
        out["rope_dim"] = layer.get("rope_dim", 0)
    return out


def namespace(model: dict[str, Any], tp_rank: int) -> bytes:
    """§7.6.3 step 1: canonical JSON (keys sorted by code point, no whitespace, non-ASCII
    and controls as lower-case \\u escapes) of version 1, the model id, its distinct dtypes,
    the block size, the manifest's TP rank and every layer (the display name excluded)."""
    layers = [canonical_layer(x) for x in expand_layers(model)]
    doc = {
        "v": 1,
        "model_id": model["model_id"],
        "dtypes": sorted({x["dtype"] for x in layers}),
        "block_tokens": block_tokens(model),
        "tp_rank": tp_rank,
        "layers": layers,
    }
    # json.dumps with ensure_ascii escapes exactly what §7.6.3 asks: ", \\, the five short
    # escapes, and everything outside U+0020..U+007E as \u + 4 lower-case hex digits.
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _h128(data: bytes) -> bytes:
    return xxhash.xxh3_128_digest(data, PREFIX_SEED)


def block_keys(model: dict[str, Any], tp_rank: int, token_ids: Sequence[int]) -> list[bytes]:
    """key[-1] = root = xxh3_128(namespace); key[i] = xxh3_128(key[i-1] || block i's token ids
    as little-endian u32), seed PREFIX_SEED; full blocks only."""
    bt = block_tokens(model)
    key = _h128(namespace(model, tp_rank))
    keys = []
    for i in range(len(token_ids) // bt):
        block = token_ids[i * bt : (i + 1) * bt]
        key = _h128(key + struct.pack(f"<{bt}I", *block))
        keys.append(key)
    return keys


def full_prefix_key(model: dict[str, Any], tp_rank: int, token_ids: Sequence[int]) -> bytes:
    """§7.6.3 step 4: xxh3_128(last full block's key (or the root) || "S" || the tail's ids
    as little-endian u32): the key linear-attention states are matched under."""
    bt = block_tokens(model)
    keys = block_keys(model, tp_rank, token_ids)
    last = keys[-1] if keys else _h128(namespace(model, tp_rank))
    tail = token_ids[len(keys) * bt :]
    return _h128(last + _STATE_TAG + struct.pack(f"<{len(tail)}I", *tail))


def manifest(model: dict[str, Any], tp_rank: int, keys: Sequence[bytes]) -> dict[str, Any]:
    """OPEN's ``extra.dedup`` (§7.6)."""
    return {"model": model, "tp_rank": tp_rank, "keys": [k.hex() for k in keys]}
