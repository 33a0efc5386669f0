"""The prefix hash chain: same keys in every process, chained, namespaced, full blocks only."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from kvship.layout import PREFIX_SEED, block_keys, full_prefix_key, namespace, preset
from kvship.layout.prefix import first_mismatch

LAYOUT = preset("kimi-linear-48b")
BT = LAYOUT.block_tokens


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 200_000, n, dtype=np.int64)


def test_seed_is_fixed() -> None:
    assert int.from_bytes(b"kvship\x00\x01", "big") == PREFIX_SEED


def test_same_keys_in_another_process() -> None:
    tokens = _tokens(10 * BT + 5).tolist()
    code = (
        "import json, sys; from kvship.layout import block_keys, full_prefix_key, preset;"
        "t = json.loads(sys.stdin.read()); l = preset('kimi-linear-48b');"
        "print(json.dumps([k.hex() for k in block_keys(t, l)] + [full_prefix_key(t, l).hex()]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(tokens),
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    ).stdout
    here = [k.hex() for k in block_keys(tokens, LAYOUT)] + [full_prefix_key(tokens, LAYOUT).hex()]
    assert json.loads(out) == here


def test_known_vector() -> None:
    """A pinned value: changing the chain's definition must be a deliberate, visible act."""
    layout = preset("dense-gqa-8b")
    keys = block_keys(range(32), layout)
    assert [k.hex() for k in keys] == [
        "3703c37d0d2d591a1241074ce3e81162",
        "770167987f852027fc400b03ef82fca0",
    ]
    assert keys == block_keys(np.arange(32, dtype=np.uint32), layout)
    assert keys == block_keys(list(range(32)), layout)


def test_only_full_blocks_are_keyed() -> None:
    assert block_keys([], LAYOUT) == []
    assert block_keys(_tokens(BT - 1), LAYOUT) == []
    t = _tokens(3 * BT + 7)
    keys = block_keys(t, LAYOUT)
    assert len(keys) == 3
    assert keys == block_keys(t[: 3 * BT], LAYOUT)  # the tail does not enter any block key
    assert keys[:2] == block_keys(t[: 2 * BT + 3], LAYOUT)


@pytest.mark.parametrize("pos", [0, BT - 1, 2 * BT, 5 * BT + 3])
def test_chain_one_token_changes_this_and_later_keys(pos: int) -> None:
    t = _tokens(8 * BT)
    u = t.copy()
    u[pos] += 1
    a, b = block_keys(t, LAYOUT), block_keys(u, LAYOUT)
    blk = pos // BT
    assert a[:blk] == b[:blk]
    assert all(x != y for x, y in zip(a[blk:], b[blk:], strict=True))
    assert len(set(a) | set(b)) == len(a) + len(a) - blk


def test_same_block_different_prefix_different_key() -> None:
    block = _tokens(BT, seed=1)
    a = block_keys(np.concatenate([_tokens(BT, seed=2), block]), LAYOUT)
    b = block_keys(np.concatenate([_tokens(BT, seed=3), block]), LAYOUT)
    assert a[1] != b[1]


def test_namespace_changes_keys() -> None:
    t = _tokens(4 * BT)
    base = block_keys(t, LAYOUT)
    assert block_keys(t, LAYOUT, tp_rank=1) != base
    assert block_keys(t, replace(LAYOUT, tp_rank=1)) == block_keys(t, LAYOUT, tp_rank=1)
    assert block_keys(t, replace(LAYOUT, model_id="other")) != base
    assert block_keys(t, replace(LAYOUT, name="renamed")) == base  # the name is cosmetic
    layers = tuple(replace(x, dtype="float16") for x in LAYOUT.layers)
    assert block_keys(t, replace(LAYOUT, layers=layers)) != base
    dense = preset("dense-gqa-8b")
    bigger = tuple(replace(x, block_tokens=32) for x in dense.layers)
    assert block_keys(t, replace(dense, layers=bigger))[0] not in block_keys(t, dense)
    ns = namespace(LAYOUT)
    assert ns != namespace(LAYOUT, 1) and ns == namespace(LAYOUT, 0)


def test_full_prefix_key_covers_tail_exactly() -> None:
    t = _tokens(5 * BT + 3)
    k = full_prefix_key(t, LAYOUT)
    assert k == full_prefix_key(t, LAYOUT, keys=block_keys(t, LAYOUT))
    assert k != full_prefix_key(t[:-1], LAYOUT)
    assert k != full_prefix_key(np.concatenate([t, [7]]), LAYOUT)
    u = t.copy()
    u[-1] += 1
    assert k != full_prefix_key(u, LAYOUT)
    aligned = t[: 5 * BT]
    assert full_prefix_key(aligned, LAYOUT) not in block_keys(aligned, LAYOUT)
    assert full_prefix_key([], LAYOUT) != full_prefix_key([0], LAYOUT)
    with pytest.raises(ValueError, match="keys given"):
        full_prefix_key(t, LAYOUT, keys=[])


def test_first_mismatch() -> None:
    t = _tokens(4 * BT)
    keys = block_keys(t, LAYOUT)
    assert first_mismatch(keys, t, LAYOUT) is None
    assert first_mismatch([*keys[:2], b"\0" * 16, keys[3]], t, LAYOUT) == 2
    assert first_mismatch(keys[:3], t, LAYOUT) == 3


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param([-1], id="negative"),
        pytest.param([2**32], id="over-uint32"),
        pytest.param([[1, 2]], id="nested"),
        pytest.param([1.5], id="float"),
    ],
)
def test_bad_tokens_are_refused(bad: list[object]) -> None:
    with pytest.raises(ValueError):
        block_keys(bad, LAYOUT)
