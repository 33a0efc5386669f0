"""The receiving daemon's block store: content-addressed, bounded in bytes, LRU, pinnable.

Two kinds of entry share one byte bound:

* **blocks**: one full-attention layer's KV for one full block, under the block's prefix
  key (:func:`kvship.layout.prefix.block_keys`). Any request with the same prefix reuses it.
* **states**: one linear-attention layer's fixed-size state, under the *full-prefix* key
  (:func:`kvship.layout.prefix.full_prefix_key`). Matched only exactly: a recurrent state
  after N tokens is no use for any other prompt.

Entries whose key is pinned (a transfer writing it, a client reading it) are never evicted;
the rest go least-recently-used first. When the pinned entries leave no room, a put is
refused with :class:`StoreFull`: the bound holds always. :meth:`BlockStore.admit` checks a
whole request (layout, keys vs tokens, sizes, room) before it stores anything, so a refused
request changes nothing. Pure and synchronous: the daemon calls it from its event loop.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..layout.model import DTYPE_SIZES, LinearState, ModelLayout
from ..layout.prefix import KEY_BYTES, first_mismatch, full_prefix_key, namespace

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


class KeyMismatch(BadInput):
    """A claimed block key is not the key of its token ids (``index``: the first bad one)."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


class SizeMismatch(BadInput):
    """A block or key of the wrong length."""


class StateShapeError(BadInput):
    """A linear-attention state whose shapes or size differ from the layout's."""


class MissingBlock(BadInput):
    """A block the sender skipped as already held, but the store does not hold it."""


@dataclass
class Manifest:
    """One request's KV as it arrives: claimed keys, the data, and what they are keys *of*.

    ``blocks[layer][i]`` is full block ``i`` of a full-attention layer; ``None`` where the
    sender skipped it because the store already held it (dedup). ``states[layer]`` is a
    linear layer's state, as bytes or as one array per shape of the layout.
    """

    namespace: bytes
    token_ids: Sequence[int] | np.ndarray
    keys: Sequence[bytes]
    blocks: Mapping[int, Sequence[Data | None]] = field(default_factory=dict)
    states: Mapping[int, Data | Sequence[np.ndarray]] = field(default_factory=dict)
    state_key: bytes | None = None


@dataclass(frozen=True)
class Admitted:
    stored: int  # entries newly stored
    bytes: int  # their bytes
    state_key: bytes | None  # the full-prefix key the states were stored under


class BlockStore:
    """Content-addressed, byte-bounded store of KV blocks and linear states."""

    def __init__(
        self, capacity_bytes: int, layout: ModelLayout | None = None, tp_rank: int | None = None
    ) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
            raise TypeError("capacity_bytes must be an int")
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        self.capacity = capacity_bytes
        self.layout = layout
        self.namespace = namespace(layout, tp_rank) if layout is not None else None
        self._tp_rank = tp_rank
        self._data: dict[Entry, bytes] = {}
        self._masks: dict[bytes, int] = {}  # block key -> bitmask of layers held (fast match)
        self._entries: dict[bytes, set[Entry]] = {}  # key -> its entries (blocks and states)
        self._lru: OrderedDict[Entry, None] = OrderedDict()  # unpinned entries, oldest first
        self._pins: dict[bytes, int] = {}
        # Keys held for every full-attention layer: the common lookup is set membership.
        self._full_mask = sum(1 << i for i in layout.full_layers) if layout is not None else -1
        self._complete: set[bytes] = set()
        self._used = 0
        self._lru_bytes = 0
        self._hits = self._misses = self._evictions = self._refused = 0

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
                    del self._lru[entry]
                    self._lru_bytes -= len(self._data[entry])

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
                self._lru[entry] = None
                self._lru_bytes += len(self._data[entry])

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

    def admit(self, manifest: Manifest) -> Admitted:
        """Check a whole request, then store all of it, or refuse and change nothing."""
        layout = self._need_layout()
        if manifest.namespace != self.namespace:
            raise LayoutMismatch("sender's layout namespace differs from this store's layout")
        for key in manifest.keys:
            self._check_key(key)
        bad = first_mismatch(manifest.keys, manifest.token_ids, layout, self._tp_rank)
        if bad is not None:
            raise KeyMismatch(f"block key {bad} does not match its token ids", bad)
        n = len(manifest.keys)
        todo: dict[Entry, Data] = {}
        for layer, blocks in manifest.blocks.items():
            if len(blocks) != n:
                raise SizeMismatch(f"layer {layer}: {len(blocks)} blocks for {n} keys")
            for key, data in zip(manifest.keys, blocks, strict=True):
                entry = (BLOCK, key, layer)
                if data is None:
                    self._check_layer(layer, full=True)
                    if entry not in self._data:
                        raise MissingBlock(f"layer {layer}: skipped block {key.hex()} not held")
                    continue
                self._check_block(layer, data)
                if entry not in self._data:
                    todo[entry] = data
        state_key = None
        if manifest.states:
            state_key = full_prefix_key(manifest.token_ids, layout, self._tp_rank, manifest.keys)
            if manifest.state_key is not None and manifest.state_key != state_key:
                raise KeyMismatch("state key does not match the token ids", n)
            for layer, state in manifest.states.items():
                entry = (STATE, state_key, layer)
                raw = self._state_bytes(layer, state)
                if entry not in self._data:
                    todo[entry] = raw
        protect = {e for key in manifest.keys for e in self._entries.get(key, ())}
        if state_key is not None:
            protect |= self._entries.get(state_key, set())
        need = sum(_nbytes(d) for d in todo.values())
        self._make_room(need, protect)
        for entry, data in todo.items():
            self._insert(entry, data)
        return Admitted(len(todo), need, state_key)

    # ------------------------------------------------------------------ internals

    def _get(self, entry: Entry) -> bytes | None:
        data = self._data.get(entry)
        if data is None:
            self._misses += 1
            return None
        self._hits += 1
        if entry in self._lru:
            self._lru.move_to_end(entry)
        return data

    def _put(self, entry: Entry, data: Data) -> bool:
        if entry in self._data:
            if entry in self._lru:
                self._lru.move_to_end(entry)
            return False
        self._make_room(_nbytes(data), set())
        self._insert(entry, data)
        return True

    def _make_room(self, need: int, protect: set[Entry]) -> None:
        """Evict LRU unpinned entries (not in ``protect``) until ``need`` fits, or refuse
        before evicting anything."""
        if self._used + need <= self.capacity:
            return
        evictable = self._lru_bytes - sum(len(self._data[e]) for e in protect if e in self._lru)
        if self._used - evictable + need > self.capacity:
            self._refused += 1
            raise StoreFull(
                f"{need} bytes do not fit: {self._used} of {self.capacity} used, "
                f"{evictable} evictable"
            )
        for entry in list(self._lru):
            if self._used + need <= self.capacity:
                break
            if entry not in protect:
                self._evict(entry)

    def _insert(self, entry: Entry, data: Data) -> None:
        kind, key, layer = entry
        copy = bytes(data)
        self._data[entry] = copy
        self._used += len(copy)
        self._entries.setdefault(key, set()).add(entry)
        if kind == BLOCK:
            mask = self._masks.get(key, 0) | (1 << layer)
            self._masks[key] = mask
            if mask == self._full_mask:
                self._complete.add(key)
        if key not in self._pins:
            self._lru[entry] = None
            self._lru_bytes += len(copy)

    def _evict(self, entry: Entry) -> None:
        kind, key, layer = entry
        size = len(self._data.pop(entry))
        self._used -= size
        del self._lru[entry]
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
        want = self.layout.layers[layer].block_bytes  # type: ignore[union-attr]
        got = _nbytes(data)
        if got != want:
            raise SizeMismatch(f"layer {layer}: block of {got} bytes, layout says {want}")

    def _state_bytes(self, layer: int, state: Data | Sequence[Any]) -> Data:
        """The state's bytes, after checking them against the layer's shapes."""
        self._check_layer(layer, full=False)
        spec: LinearState = self.layout.layers[layer]  # type: ignore[assignment, union-attr]
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
