"""The prefix hash chain: a content key per full KV block, the same on every host.

Block i's key is ``xxh3_128(key[i-1] || tokens[i])`` with the fixed seed
:data:`PREFIX_SEED`, where ``tokens[i]`` is the block's token ids as little-endian uint32.
The key "before" block 0 is the *root*: ``xxh3_128(namespace)``, and the namespace covers the
model id, the dtypes, the block size, the layer geometry and the tensor-parallel rank. So
every key covers, through the chain, the namespace and every token before it: two prompts
share block i's key only if they share the whole prefix up to it under the same layout
(vLLM's and SGLang's prefix caches use the same idea).

Only full blocks are keyed; the partial tail block always travels. Linear-attention states
summarise the *whole* prompt, so they are keyed by :func:`full_prefix_key`, which also
covers the tail tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import xxhash

from .model import ModelLayout

#: The xxh3-128 seed of every prefix key. Fixed forever (changing it changes every key on
#: every host): the first 8 bytes of ``b"kvship\x00\x01"`` read as a big-endian integer.
PREFIX_SEED = 0x6B76736869700001
KEY_BYTES = 16
_STATE_TAG = b"S"  # odd length: a state key's input can never have a block key's length

_digest = xxhash.xxh3_128_digest


def namespace(layout: ModelLayout, tp_rank: int | None = None) -> bytes:
    """Canonical bytes naming what a key is a key *of*: model, dtypes, blocks, geometry, rank.

    ``tp_rank`` defaults to the layout's own; each rank holds a different shard of the same
    tokens' KV, so ranks must never share keys.
    """
    rank = layout.tp_rank if tp_rank is None else tp_rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"tp_rank must be an integer >= 0, got {rank!r}")
    doc = {
        "v": 1,
        "model_id": layout.model_id,
        "dtypes": list(layout.dtypes),
        "block_tokens": layout.block_tokens,
        "tp_rank": rank,
        "layers": [x.to_dict() for x in layout.layers],
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def root_key(ns: bytes) -> bytes:
    """The chain's key before block 0."""
    return _digest(ns, PREFIX_SEED)


@lru_cache(maxsize=64)
def _layout_root(layout: ModelLayout, tp_rank: int | None) -> bytes:
    return root_key(namespace(layout, tp_rank))


def _tokens_u32(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise ValueError(f"token ids must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype="<u4")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got {arr.dtype}")
    if arr.dtype != np.dtype("<u4") and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise ValueError("token ids must fit in uint32")
    return arr.astype("<u4", copy=False)


def chain(root: bytes, tokens: np.ndarray, block_tokens: int) -> list[bytes]:
    """Keys of the full blocks of ``tokens`` (uint32), chained from ``root``."""
    step = 4 * block_tokens
    n = len(tokens) // block_tokens
    raw = tokens[: n * block_tokens].tobytes()
    keys: list[bytes] = []
    append = keys.append
    key = root
    # One C call per block is the floor of a sequential chain; slicing whole bytes first and
    # concatenating is faster here than writing the previous key into a shared buffer.
    for chunk in [raw[o : o + step] for o in range(0, n * step, step)]:
        key = _digest(key + chunk, PREFIX_SEED)
        append(key)
    return keys


def block_keys(
    token_ids: Sequence[int] | np.ndarray, layout: ModelLayout, tp_rank: int | None = None
) -> list[bytes]:
    """16-byte keys of the prompt's full blocks, in order (``len(tokens) // block_tokens``)."""
    tokens = _tokens_u32(token_ids)
    return chain(_layout_root(layout, tp_rank), tokens, layout.block_tokens)


def full_prefix_key(
    token_ids: Sequence[int] | np.ndarray,
    layout: ModelLayout,
    tp_rank: int | None = None,
    keys: Sequence[bytes] | None = None,
) -> bytes:
    """The key of the whole prompt: the last full block's key (or the root) + the tail tokens.

    Linear-attention states are matched only under this key: a state after N tokens is
    useless for any other N. Pass ``keys`` (from :func:`block_keys`) to skip rehashing.
    """
    tokens = _tokens_u32(token_ids)
    bt = layout.block_tokens
    n = len(tokens) // bt
    if keys is None:
        keys = block_keys(tokens, layout, tp_rank)
    elif len(keys) != n:
        raise ValueError(f"{len(keys)} keys given for {n} full blocks")
    last = keys[-1] if n else _layout_root(layout, tp_rank)
    return _digest(last + _STATE_TAG + tokens[n * bt :].tobytes(), PREFIX_SEED)


def first_mismatch(
    keys: Sequence[bytes],
    token_ids: Sequence[int] | np.ndarray,
    layout: ModelLayout,
    tp_rank: int | None = None,
) -> int | None:
    """Index of the first claimed key that is not the tokens' key (or the count, if the
    number differs); None when every key matches."""
    want = block_keys(token_ids, layout, tp_rank)
    for i, (a, b) in enumerate(zip(keys, want, strict=False)):
        if a != b:
            return i
    if len(keys) != len(want):
        return min(len(keys), len(want))
    return None
