"""Where the tests' real data lies: tests/data, inside the repo (never outside it).

``tests/data/kv`` holds a real KV cache of SmolLM2-135M-Instruct made by
``tools/capture_kv.py`` (``make capture``); see its README.md and PROVENANCE.json. Two
documents, ``prose`` and ``code``, each in three dtypes, layout
``[layer, K/V, token, kv_head, head_dim]`` = [30, 2, T, 3, 64].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
KV = DATA / "kv"
DOCS = ("prose", "code")
DTYPES = ("bf16", "fp16", "fp8")
N_LAYERS = 30
FILENAMES = {
    "bf16": "{doc}_bf16_as_uint16.npy",  # bf16 bit patterns as uint16
    "fp16": "{doc}_fp16.npy",
    "fp8": "{doc}_fp8e4m3_as_uint8.npy",  # float8_e4m3fn bit patterns as uint8
}


def kv_path(doc: str = "prose", dtype: str = "bf16") -> Path:
    """The .npy file of one document's KV cache in one dtype (bf16, fp16 or fp8)."""
    if doc not in DOCS or dtype not in FILENAMES:
        raise ValueError(f"no KV sample {doc!r}/{dtype!r}: docs {DOCS}, dtypes {DTYPES}")
    return KV / FILENAMES[dtype].format(doc=doc)


def kv_sample(doc: str = "prose", dtype: str = "bf16") -> np.ndarray:
    """One document's KV cache as stored: uint16 (bf16), float16 or uint8 (fp8)."""
    return np.load(kv_path(doc, dtype))


def kv_bytes(dtype: str = "bf16", docs: tuple[str, ...] = DOCS) -> bytes:
    """The raw bytes of several documents' samples of one dtype, one after the other."""
    return b"".join(kv_sample(doc, dtype).tobytes() for doc in docs)


def kv_layers(doc: str = "prose", dtype: str = "bf16") -> list[np.ndarray]:
    """A sample as its 30 per-layer arrays [2, T, 3, 64], each contiguous."""
    kv = kv_sample(doc, dtype)
    assert kv.shape[0] == N_LAYERS, kv.shape
    return [np.ascontiguousarray(layer) for layer in kv]


def token_ids_path(doc: str = "prose") -> Path:
    return kv_path(doc).with_name(f"{doc}_token_ids.npy")


def token_ids(doc: str = "prose") -> list[int]:
    """The ids (int32 on disk) of the tokens whose K/V the sample holds."""
    return [int(t) for t in np.load(token_ids_path(doc))]


def fp8_scales(doc: str = "prose") -> np.ndarray:
    """float32 [30, 2] dequantisation scales: value = fp8[layer, kv, ...] * scale[layer, kv]."""
    return np.load(kv_path(doc).with_name(f"{doc}_fp8e4m3_scales.npy"))


def bf16_as_float32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) widened exactly to float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def fp8_as_float32(bits: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bit patterns (uint8) decoded exactly to float32 (no torch needed)."""
    b = np.arange(256)
    exp, man = (b >> 3) & 15, b & 7
    mag = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7))
    table = np.where(b & 0x80, -mag, mag).astype(np.float32)
    table[[0x7F, 0xFF]] = np.nan  # e4m3fn has no infinities, one NaN per sign
    return table[bits]


def provenance() -> dict[str, Any]:
    """PROVENANCE.json of the capture: versions, recipe, sha256 of every file."""
    return json.loads((KV / "PROVENANCE.json").read_text(encoding="utf-8"))
