"""Block store: byte bound, pins, LRU, exact-match states, and refusals that change nothing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvship.layout import FullAttention, LinearState, ModelLayout
from kvship.store import (
    BlockStore,
    ByteBudget,
    LayoutMismatch,
    SizeMismatch,
    StateShapeError,
    StoreError,
    StoreFull,
)

KEYS = [bytes([i]) * 16 for i in range(6)]

# A tiny hybrid: linear, full, linear, full. Blocks of 4 tokens; 16 bytes/token/full layer.
FULL = FullAttention(4, kv_heads=2, head_dim=2)
LIN = LinearState(((2, 3), (4,)))
TINY = ModelLayout("tiny", "org/tiny", (LIN, FULL, LIN, FULL))
BLOCK = FULL.block_bytes  # 64
STATE = LIN.state_bytes  # 20


def snapshot(store: BlockStore) -> tuple:
    lru = [entry for owner, entry in store.budget._lru if owner is store]
    return (dict(store._data), lru, dict(store._pins), store.used_bytes)


class StoreMachine(RuleBasedStateMachine):
    """Random put/put_state/pin/unpin/get/match sequences on a store without a layout."""

    def __init__(self) -> None:
        super().__init__()
        self.store = BlockStore(200)
        self.pins: dict[bytes, int] = {}
        self.must_keep: set[tuple] = set()

    def _refresh_pinned(self) -> None:
        for entry in self.store._data:
            if self.pins.get(entry[1], 0):
                self.must_keep.add(entry)

    @rule(key=st.sampled_from(KEYS), layer=st.integers(0, 2), size=st.integers(1, 120))
    def put(self, key: bytes, layer: int, size: int) -> None:
        before = snapshot(self.store)
        held = self.store.has(key, layer)
        try:
            stored = self.store.put(key, layer, bytes([layer]) * size)
        except StoreFull:
            assert snapshot(self.store) == before
            pinned = sum(len(d) for e, d in before[0].items() if self.pins.get(e[1], 0))
            assert pinned + size > self.store.capacity
            return
        assert stored is not held
        assert self.store.has(key, layer)
        self._refresh_pinned()

    @rule(key=st.sampled_from(KEYS), layer=st.integers(0, 2), size=st.integers(1, 80))
    def put_state(self, key: bytes, layer: int, size: int) -> None:
        before = snapshot(self.store)
        try:
            self.store.put_state(key, layer, b"s" * size)
        except StoreFull:
            assert snapshot(self.store) == before
            return
        assert self.store.get_state(key, layer) is not None
        assert self.store.get(key, layer) is None or self.store.has(key, layer)
        self._refresh_pinned()

    @rule(key=st.sampled_from(KEYS))
    def pin(self, key: bytes) -> None:
        self.store.pin([key])
        self.pins[key] = self.pins.get(key, 0) + 1
        self._refresh_pinned()

    @precondition(lambda self: any(self.pins.values()))
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(k for k, c in self.pins.items() if c)))
        self.store.unpin([key])
        self.pins[key] -= 1
        if not self.pins[key]:
            self.must_keep = {e for e in self.must_keep if e[1] != key}

    @rule(key=st.sampled_from(KEYS))
    def unpin_unpinned_is_refused(self, key: bytes) -> None:
        if self.pins.get(key, 0):
            return
        before = snapshot(self.store)
        with pytest.raises(StoreError):
            self.store.unpin([key])
        assert snapshot(self.store) == before

    @rule(key=st.sampled_from(KEYS), layer=st.integers(0, 2))
    def get(self, key: bytes, layer: int) -> None:
        data = self.store.get(key, layer)
        assert (data is not None) == self.store.has(key, layer)
        if data is not None:
            assert data == bytes([layer]) * len(data)

    @rule(
        keys=st.lists(st.sampled_from(KEYS), max_size=6),
        layers=st.sets(st.integers(0, 2), min_size=1),
    )
    def match(self, keys: list[bytes], layers: set[int]) -> None:
        want = 0
        for key in keys:
            if not all(self.store.has(key, layer) for layer in layers):
                break
            want += 1
        assert self.store.match_prefix(keys, layers) == want

    @invariant()
    def bounded_and_consistent(self) -> None:
        s = self.store
        assert s.used_bytes <= s.capacity
        assert s.used_bytes == sum(len(d) for d in s._data.values())
        lru = {entry: size for (owner, entry), size in s.budget._lru.items() if owner is s}
        assert s._lru_bytes == s.budget.lru_bytes == sum(len(s._data[e]) for e in lru)
        assert set(lru) == {e for e in s._data if e[1] not in s._pins}
        assert all(size == len(s._data[e]) for e, size in lru.items())
        assert self.must_keep <= set(s._data), "a pinned entry was evicted"
        st_ = s.stats()
        assert st_["bytes"] == s.used_bytes and st_["pinned"] == sum(
            1 for c in self.pins.values() if c
        )


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_lru_order_and_pinned_refusal() -> None:
    store = BlockStore(3 * 10)
    a, b, c, d = KEYS[:4]
    for k in (a, b, c):
        store.put(k, 0, b"x" * 10)
    store.get(a, 0)  # a is now the most recent; b goes first
    store.put(d, 0, b"y" * 10)
    assert not store.has(b, 0) and store.has(a, 0)
    assert store.stats()["evictions"] == 1
    store.pin([a, c, d])
    with pytest.raises(StoreFull):
        store.put(b, 0, b"z")
    assert store.stats()["refused"] == 1
    store.unpin([c])
    store.put(b, 0, b"z" * 10)
    assert not store.has(c, 0) and store.has(a, 0) and store.has(d, 0)
    with pytest.raises(StoreFull):  # larger than the whole store
        BlockStore(5).put(a, 0, b"123456")


def test_pin_before_put_protects_arrival() -> None:
    store = BlockStore(20)
    store.pin([KEYS[0]])
    store.put(KEYS[0], 0, b"a" * 10)
    store.put(KEYS[1], 0, b"b" * 10)
    store.put(KEYS[2], 0, b"c" * 10)  # evicts KEYS[1], never KEYS[0]
    assert store.has(KEYS[0], 0) and not store.has(KEYS[1], 0)


def test_put_copies_data() -> None:
    store = BlockStore(100)
    buf = bytearray(b"abcd")
    store.put(KEYS[0], 0, memoryview(buf))
    buf[0] = 0
    assert store.get(KEYS[0], 0) == b"abcd"


# ---------------------------------------------------------------------- with a layout


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, n)


def test_stores_share_one_budget_and_one_lru() -> None:
    """Two models' stores draw on one byte bound: an idle model's old blocks make room
    for a busy one's (the daemon no longer splits store_bytes into fixed quarters)."""
    other = ModelLayout("other", "org/other", (FULL, FULL))
    budget = ByteBudget(4 * BLOCK)
    tiny, second = BlockStore(budget, TINY), BlockStore(budget, other)
    tiny.put(KEYS[0], 1, b"a" * BLOCK)
    second.put(KEYS[1], 0, b"b" * BLOCK)
    for k in KEYS[2:5]:  # three more blocks: the oldest entry (tiny's) goes first
        second.put(k, 1, b"c" * BLOCK)
    assert not tiny.has(KEYS[0], 1) and tiny.used_bytes == 0
    assert second.used_bytes == budget.used == 4 * BLOCK
    assert tiny.stats()["evictions"] == 1 and tiny.capacity == second.capacity == 4 * BLOCK
    second.pin(KEYS[1:5])
    with pytest.raises(StoreFull):  # every byte pinned by the other model: refused
        tiny.put(KEYS[0], 1, b"a" * BLOCK)
    assert tiny.stats()["refused"] == 1 and budget.used == 4 * BLOCK
    budget.drop_store(second)
    assert budget.used == 0 and budget.lru_bytes == 0


def test_single_puts_check_the_layout() -> None:
    store = BlockStore(10_000, TINY)
    with pytest.raises(LayoutMismatch):
        store.put(KEYS[0], 0, b"\0" * BLOCK)  # layer 0 is linear
    with pytest.raises(SizeMismatch):
        store.put(KEYS[0], 1, b"\0" * (BLOCK - 1))
    with pytest.raises(SizeMismatch):
        store.put(b"short", 1, b"\0" * BLOCK)
    with pytest.raises(StateShapeError):
        store.put_state(KEYS[0], 0, b"\0" * (STATE + 1))
    with pytest.raises(LayoutMismatch):
        store.put_state(KEYS[0], 1, b"\0" * STATE)
    assert store.used_bytes == 0
    assert store.put(KEYS[0], 1, b"\0" * BLOCK) and not store.put(KEYS[0], 1, b"\1" * BLOCK)
    assert store.get(KEYS[0], 1) == b"\0" * BLOCK


@settings(max_examples=100, deadline=None)
@given(
    puts=st.lists(st.tuples(st.integers(0, 5), st.sampled_from([1, 3])), max_size=30),
    capacity_blocks=st.integers(1, 12),
    query=st.lists(st.integers(0, 5), max_size=6),
)
def test_match_prefix_with_layout(puts, capacity_blocks: int, query: list[int]) -> None:
    store = BlockStore(capacity_blocks * BLOCK, TINY)
    for k, layer in puts:
        store.put(KEYS[k], layer, b"\0" * BLOCK)
        assert store.used_bytes <= store.capacity
    keys = [KEYS[i] for i in query]
    for layers in ([1, 3], [1], [3]):
        want = 0
        for key in keys:
            if not all(store.has(key, layer) for layer in layers):
                break
            want += 1
        assert store.match_prefix(keys, layers) == want
    assert store.match_prefix(keys) == store.match_prefix(keys, [1, 3])
