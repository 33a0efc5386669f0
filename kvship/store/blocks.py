"""The receiving daemon's block store: content-addressed, bounded in bytes, LRU, pinnable.

Two kinds of entry share one byte bound:

* **blocks**: one full-attention layer's KV for one full block, under the block's prefix
  key (:func:`kvship.layout.prefix.block_keys`). Any request with the same prefix reuses it.
* **states**: one linear-attention layer's fixed-size state, under the *full-prefix* key
  (:func:`kvship.layout.prefix.full_prefix_key`). Matched only exactly: a recurrent state
  after N tokens is no use for any other prompt.

Entries whose key is pinned (a transfer writing it, a client reading it) are never evicted;
the rest go least-recently-used first. When the pinned entries leave no room, a put is
refused with :class:`StoreFull`: the bound holds always. Stores of several models can share
one :class:`ByteBudget` (one bound, one LRU across them), so a busy model may use what an
idle one does not. Pure and synchronous: the daemon calls it from its event loop.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..layout.model import DTYPE_SIZES, FullAttention, LinearState, ModelLayout
from ..layout.prefix import KEY_BYTES, namespace

BLOCK, STATE = 0, 1
Entry = tuple[int, bytes, int]  # (BLOCK | STATE, key, layer)
Data = bytes | bytearray | memoryview


class StoreError(Exception):
    """Base of the store's refusals."""


class StoreFull(StoreError):
    """Storing this would exceed the byte bound even after evicting every unpinned entry."""


class BadInput(StoreError, ValueError):
    """The data cannot be what it claims to be; nothing was stored."""


class LayoutMismatch(BadInput):
    """Sender's layout namespace, or a layer's kind, is not this store's."""


class SizeMismatch(BadInput):
    """A block or key of the wrong length."""


class StateShapeError(BadInput):
    """A linear-attention state whose shapes or size differ from the layout's."""


class ByteBudget:
    """One byte bound and one least-recently-used order shared by the stores that draw on it.

    Only unpinned entries are in the LRU; evicting one tells its store to drop it."""

    def __init__(self, capacity_bytes: int) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
            raise TypeError("capacity_bytes must be an int")
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        self.capacity = capacity_bytes
        self.used = 0
        self.lru_bytes = 0
        self._lru: OrderedDict[tuple[BlockStore, Entry], int] = OrderedDict()  # oldest first

    def make_room(self, need: int) -> None:
        """Evict least recently used unpinned entries until ``need`` more bytes fit, or
        raise :class:`StoreFull` before evicting anything."""
        if self.used + need <= self.capacity:
            return
        if self.used - self.lru_bytes + need > self.capacity:
            raise StoreFull(
                f"{need} bytes do not fit: {self.used} of {self.capacity} used, "
                f"{self.lru_bytes} evictable"
            )
        while self.used + need > self.capacity:
            (store, entry), size = self._lru.popitem(last=False)
            self.lru_bytes -= size
            store._evicted(entry, size)

    def add(self, store: BlockStore, entry: Entry, size: int) -> None:
        self._lru[(store, entry)] = size
        self.lru_bytes += size

    def remove(self, store: BlockStore, entry: Entry) -> int:
        size = self._lru.pop((store, entry))
        self.lru_bytes -= size
        return size

    def touch(self, store: BlockStore, entry: Entry) -> None:
        item = (store, entry)
        if item in self._lru:
            self._lru.move_to_end(item)

    def drop_store(self, store: BlockStore) -> None:
        """Forget every entry of ``store`` (the daemon drops a model's whole store)."""
        for item in [item for item in self._lru if item[0] is store]:
            self.lru_bytes -= self._lru.pop(item)
        self.used -= store.used_bytes


class BlockStore:
    """Content-addressed, byte-bounded store of KV blocks and linear states."""

    def __init__(
        self,
        capacity: int | ByteBudget,
        layout: ModelLayout | None = None,
        tp_rank: int | None = None,
    ) -> None:
        self.budget = capacity if isinstance(capacity, ByteBudget) else ByteBudget(capacity)
        self.layout = layout
        self.namespace = namespace(layout, tp_rank) if layout is not None else None
        self._data: dict[Entry, bytes] = {}
        self._masks: dict[bytes, int] = {}  # block key -> bitmask of layers held (fast match)
        self._entries: dict[bytes, set[Entry]] = {}  # key -> its entries (blocks and states)
        self._pins: dict[bytes, int] = {}
        # Keys held for every full-attention layer: the common lookup is set membership.
        self._full_mask = sum(1 << i for i in layout.full_layers) if layout is not None else -1
        self._complete: set[bytes] = set()
        self._used = 0
        self._lru_bytes = 0  # of this store's entries, those not pinned
        self._hits = self._misses = self._evictions = self._refused = 0

    @property
    def capacity(self) -> int:
        return self.budget.capacity

    @property
    def pinned(self) -> bool:
        return bool(self._pins)

    # ------------------------------------------------------------------ queries

    @property
    def used_bytes(self) -> int:
        return self._used

    def has(self, key: bytes, layer: int) -> bool:
        """Whether block (key, layer) is held; no figures, no recency change."""
        return (BLOCK, key, layer) in self._data

    def has_state(self, key: bytes, layer: int) -> bool:
        return (STATE, key, layer) in self._data

    def get(self, key: bytes, layer: int) -> bytes | None:
        return self._get((BLOCK, key, layer))

    def get_state(self, full_prefix_key: bytes, layer: int) -> bytes | None:
        """The state stored under exactly this full-prefix key, else None."""
        return self._get((STATE, full_prefix_key, layer))

    def match_prefix(self, keys: Sequence[bytes], layers: Iterable[int] | None = None) -> int:
        """How many leading ``keys`` are held for *all* ``layers`` (default: the layout's
        full-attention layers). Recency is not changed: callers pin what they will use."""
        if layers is None:
            if self.layout is None:
                raise ValueError("match_prefix needs layers when the store has no layout")
            layers = self.layout.full_layers
        need = 0
        for layer in layers:
            need |= 1 << layer
        n = 0
        if need == self._full_mask:
            complete = self._complete
            for key in keys:
                if key not in complete:
                    break
                n += 1
            return n
        for mask in map(self._masks.get, keys):
            if mask is None or mask & need != need:
                break
            n += 1
        return n

    def stats(self) -> dict[str, int]:
        pinned_bytes = self._used - self._lru_bytes
        return {
            "capacity": self.capacity,
            "bytes": self._used,
            "blocks": sum(1 for e in self._data if e[0] == BLOCK),
            "states": sum(1 for e in self._data if e[0] == STATE),
            "keys": len(self._entries),
            "hits": self._hits,
            "misses": self._misses,
            "evictions": self._evictions,
            "refused": self._refused,
            "pinned": len(self._pins),
            "pinned_bytes": pinned_bytes,
        }

    # ------------------------------------------------------------------ pins

    def pin(self, keys: Iterable[bytes]) -> None:
        """Keep every entry under these keys (now held or stored later) until unpinned.

        Counted: pin twice, unpin twice. Keys may be pinned before their data arrives.
        """
        for key in keys:
            count = self._pins.get(key, 0)
            self._pins[key] = count + 1
            if count == 0:
                for entry in self._entries.get(key, ()):
                    self._lru_bytes -= self.budget.remove(self, entry)

    def unpin(self, keys: Iterable[bytes]) -> None:
        keys = list(keys)
        missing = [k for k, c in Counter(keys).items() if self._pins.get(k, 0) < c]
        if missing:
            raise StoreError(f"unpin of a key not pinned: {missing[0].hex()}")
        for key in keys:
            count = self._pins[key] - 1
            if count:
                self._pins[key] = count
                continue
            del self._pins[key]
            for entry in self._entries.get(key, ()):
                size = len(self._data[entry])
                self.budget.add(self, entry, size)
                self._lru_bytes += size

    # ------------------------------------------------------------------ puts

    def put(self, key: bytes, layer: int, data: Data) -> bool:
        """Store a copy of one block; False when it was already held (content-addressed)."""
        self._check_key(key)
        if self.layout is not None:
            self._check_block(layer, data)
        return self._put((BLOCK, key, layer), data)

    def put_state(self, full_prefix_key: bytes, layer: int, data: Data | Sequence[Any]) -> bool:
        self._check_key(full_prefix_key)
        raw = self._state_bytes(layer, data) if self.layout is not None else data
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise StateShapeError("a state without a layout must be bytes")
        return self._put((STATE, full_prefix_key, layer), raw)

    # ------------------------------------------------------------------ internals

    def _get(self, entry: Entry) -> bytes | None:
        data = self._data.get(entry)
        if data is None:
            self._misses += 1
            return None
        self._hits += 1
        self.budget.touch(self, entry)
        return data

    def _put(self, entry: Entry, data: Data) -> bool:
        if entry in self._data:
            self.budget.touch(self, entry)
            return False
        try:
            self.budget.make_room(_nbytes(data))
        except StoreFull:
            self._refused += 1
            raise
        self._insert(entry, data)
        return True

    def _insert(self, entry: Entry, data: Data) -> None:
        kind, key, layer = entry
        copy = bytes(data)
        self._data[entry] = copy
        self._used += len(copy)
        self.budget.used += len(copy)
        self._entries.setdefault(key, set()).add(entry)
        if kind == BLOCK:
            mask = self._masks.get(key, 0) | (1 << layer)
            self._masks[key] = mask
            if mask == self._full_mask:
                self._complete.add(key)
        if key not in self._pins:
            self.budget.add(self, entry, len(copy))
            self._lru_bytes += len(copy)

    def _evicted(self, entry: Entry, size: int) -> None:
        """The budget evicted ``entry`` (already out of its LRU): drop its data."""
        kind, key, layer = entry
        del self._data[entry]
        self._used -= size
        self.budget.used -= size
        self._lru_bytes -= size
        entries = self._entries[key]
        entries.discard(entry)
        if not entries:
            del self._entries[key]
        if kind == BLOCK:
            self._complete.discard(key)
            mask = self._masks[key] & ~(1 << layer)
            if mask:
                self._masks[key] = mask
            else:
                del self._masks[key]
        self._evictions += 1

    def _need_layout(self) -> ModelLayout:
        if self.layout is None:
            raise StoreError("this store has no layout to check requests against")
        return self.layout

    @staticmethod
    def _check_key(key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise SizeMismatch(f"keys are {KEY_BYTES} bytes, got {key!r:.40}")

    def _check_layer(self, layer: int, full: bool) -> None:
        layout = self._need_layout()
        wanted = layout.full_layers if full else layout.linear_layers
        if layer not in wanted:
            kind = "full-attention" if full else "linear-attention"
            raise LayoutMismatch(f"layer {layer} is not a {kind} layer of {layout.name}")

    def _check_block(self, layer: int, data: Data) -> None:
        self._check_layer(layer, full=True)
        spec = self._need_layout().layers[layer]
        assert isinstance(spec, FullAttention)  # _check_layer made sure
        want = spec.block_bytes
        got = _nbytes(data)
        if got != want:
            raise SizeMismatch(f"layer {layer}: block of {got} bytes, layout says {want}")

    def _state_bytes(self, layer: int, state: Data | Sequence[Any]) -> Data:
        """The state's bytes, after checking them against the layer's shapes."""
        self._check_layer(layer, full=False)
        spec = self._need_layout().layers[layer]
        assert isinstance(spec, LinearState)  # _check_layer made sure
        if isinstance(state, bytes | bytearray | memoryview):
            if _nbytes(state) != spec.state_bytes:
                raise StateShapeError(
                    f"layer {layer}: state of {_nbytes(state)} bytes, layout says "
                    f"{spec.state_bytes} (shapes {list(spec.shapes)}, {spec.dtype})"
                )
            return state
        arrays = list(state)
        shapes = [tuple(np.shape(a)) for a in arrays]
        if shapes != list(spec.shapes):
            raise StateShapeError(
                f"layer {layer}: state shapes {shapes}, layout says {list(spec.shapes)}"
            )
        for a in arrays:
            if np.asarray(a).dtype.itemsize != DTYPE_SIZES[spec.dtype]:
                raise StateShapeError(
                    f"layer {layer}: state dtype {np.asarray(a).dtype}, layout says {spec.dtype}"
                )
        return b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)


def _nbytes(data: Data) -> int:
    return memoryview(data).nbytes
