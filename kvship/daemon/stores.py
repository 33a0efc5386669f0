"""The daemon's block stores: one per model namespace, all under one byte budget.

Only incoming dedup transfers create a store (they bring KV to keep); look-ups read the
stores that exist and never create or evict one, so a burst of look-ups naming other
models cannot push real data out. All models draw on ``store_bytes`` together, with one
least-recently-used order across them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from ..layout.model import ModelLayout
from ..layout.prefix import namespace
from ..store import BlockStore, ByteBudget, StoreFull

log = logging.getLogger("kvship.store")

MAX_MODELS = 64  # namespaces with a store at once; past it, an unpinned one is dropped


class StoreSet:
    def __init__(self, capacity_bytes: int, max_models: int = MAX_MODELS) -> None:
        self.budget = ByteBudget(capacity_bytes)
        self.max_models = max_models
        self._stores: OrderedDict[bytes, BlockStore] = OrderedDict()  # least recent first

    def get(self, layout: ModelLayout, tp_rank: int) -> BlockStore | None:
        """The store of this model namespace, if one exists (read-only callers)."""
        return self._stores.get(namespace(layout, tp_rank))

    def cached_blocks(self, layout: ModelLayout, tp_rank: int, keys: list[bytes]) -> int:
        """Leading blocks of ``keys`` held for every full-attention layer (0: no store)."""
        store = self.get(layout, tp_rank)
        return 0 if store is None else store.match_prefix(keys)

    def for_transfer(self, layout: ModelLayout, tp_rank: int) -> BlockStore:
        """The store an incoming dedup transfer reads and fills: made on first use. Past
        ``max_models`` stores the least recently used one that no transfer pins goes."""
        key = namespace(layout, tp_rank)
        store = self._stores.get(key)
        if store is not None:
            self._stores.move_to_end(key)
            return store
        if len(self._stores) >= self.max_models:
            victim = next((k for k, s in self._stores.items() if not s.pinned), None)
            if victim is None:
                raise StoreFull(f"{len(self._stores)} model stores, every one in use")
            old = self._stores.pop(victim)
            self.budget.drop_store(old)
            log.info("block store of another model dropped (%d B)", old.used_bytes)
        store = self._stores[key] = BlockStore(self.budget, layout, tp_rank)
        return store

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for store in self._stores.values():
            for k, v in store.stats().items():
                total[k] = total.get(k, 0) + v
        total["capacity"] = self.budget.capacity
        total["models"] = len(self._stores)
        return total
