"""Receiver side of prefix dedup: what this daemon already holds of an arriving request,
and how the held blocks and states are put back into the layers handed to the engine.

On OPEN with a manifest, the receiver checks the manifest against the transfer (keys
against token ids, layers against the model: :func:`verify_manifest`, in a worker thread),
then matches the longest prefix held for every full-attention layer, pins it, and answers
HAVE (:meth:`HeldPrefix.hold`). Both sides then skip the same chunks
(:func:`kvship.layout.dedup.skipped_chunks`). At delivery the held prefix is copied into
the layer's buffer, and the layer's own full blocks go into the store for the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from ..layout.dedup import DedupError, Manifest, skipped_chunks, tail_cuts
from ..layout.model import FullAttention
from ..layout.prefix import first_mismatch, full_prefix_key
from ..protocol import LayerSpec, chunk_table
from ..store import BlockStore, StoreError

log = logging.getLogger("kvship.dedup")

SLICE_BLOCKS = 512  # store work per turn of the loop at delivery (~2 ms)


@dataclass(frozen=True)
class VerifiedManifest:
    """A manifest checked against its transfer, with the full-prefix key of its states."""

    manifest: Manifest
    state_key: bytes


def verify_manifest(
    extra: object, layers: tuple[LayerSpec, ...], token_ids: tuple[int, ...], chunk_size: int
) -> VerifiedManifest:
    """Check the manifest against the transfer: layers against the model, every block key
    against its token ids (DedupError if anything disagrees). Pure, and it hashes the whole
    prompt (~17 ms for 128K tokens): the daemon runs it in a worker thread."""
    manifest = Manifest.from_extra(extra)
    manifest.check(layers, len(token_ids), chunk_size)
    layout = manifest.layout
    bad = first_mismatch(manifest.keys, token_ids, layout, manifest.tp_rank)
    if bad is not None:
        raise DedupError(f"block key {bad} does not match its token ids")
    state_key = full_prefix_key(token_ids, layout, manifest.tp_rank, manifest.keys)
    return VerifiedManifest(manifest, state_key)


@dataclass
class HeldPrefix:
    """One incoming transfer's dedup state on the receiving daemon."""

    store: BlockStore
    manifest: Manifest
    blocks: int  # leading full blocks held for every full-attention layer
    state_key: bytes
    states: bool  # the exact linear states are held too
    skip: dict[int, list[int]]  # layer -> chunk indices not sent
    chunk_size: int
    tails: dict[int, int]  # chunk index -> held bytes at its start (CAP_DEDUP_TAIL)
    starts: list[int]  # each layer's first chunk index (SPEC §7.2)
    released: bool = False

    @classmethod
    def hold(
        cls,
        store: BlockStore,
        verified: VerifiedManifest,
        layers: tuple[LayerSpec, ...],
        chunk_size: int,
        tails: bool = False,
    ) -> HeldPrefix:
        """Find and pin what ``store`` holds of a verified manifest's prefix (cheap: set
        walks, on the event loop, where the store lives). ``tails``: the link has
        ``CAP_DEDUP_TAIL``, so the chunk straddling the prefix comes as its tail."""
        manifest, state_key = verified.manifest, verified.state_key
        layout, keys = manifest.layout, manifest.keys
        held = store.match_prefix(keys)
        states = bool(layout.linear_layers) and all(
            store.has_state(state_key, i) for i in layout.linear_layers
        )
        store.pin(keys[:held])
        if states:
            store.pin([state_key])
        skip = skipped_chunks(layout, layers, chunk_size, held, states)
        cuts = tail_cuts(layout, layers, chunk_size, held) if tails else {}
        starts = chunk_table(layers, chunk_size)
        return cls(store, manifest, held, state_key, states, skip, chunk_size, cuts, starts)

    def tail_of(self, layer: int) -> int | None:
        """The index of ``layer``'s tail chunk (the one after its skipped ones), if any."""
        index = self.starts[layer] + len(self.skip.get(layer, ()))
        return index if index in self.tails else None

    def prefix_bytes(self, layer: int) -> int:
        """Bytes at the start of ``layer`` that come from the store, not the wire."""
        whole = len(self.skip.get(layer, ())) * self.chunk_size
        tail = self.tail_of(layer)
        return whole + (self.tails[tail] if tail is not None else 0)

    async def restore(self, layer: int, view: memoryview) -> None:
        """Put the held prefix (or state) of ``layer`` into its buffer, then keep the
        layer's new full blocks (or its state) for the next request with this prefix.

        A long prompt has thousands of blocks per layer (~30 ms of store work per 8K
        blocks): the work goes in slices, yielding to the loop between them."""
        kind = self.manifest.layout.layers[layer]
        if not isinstance(kind, FullAttention):
            self._restore_state(layer, view)
            return
        bb, keys = kind.block_bytes, self.manifest.keys
        held = min(self.prefix_bytes(layer), len(view)) // bb
        for start in range(0, held, SLICE_BLOCKS):
            self._fill_blocks(layer, view, bb, range(start, min(held, start + SLICE_BLOCKS)))
            await asyncio.sleep(0)
        for start in range(self.blocks, len(keys), SLICE_BLOCKS):
            new = range(start, min(len(keys), start + SLICE_BLOCKS))
            if not self._remember_blocks(layer, view, bb, new):
                return  # the store is full of pinned blocks: keep no more
            await asyncio.sleep(0)

    def _fill_blocks(self, layer: int, view: memoryview, bb: int, blocks: range) -> None:
        for i in blocks:
            data = self.store.get(self.manifest.keys[i], layer)
            if data is None:  # pinned: cannot happen unless the store is broken
                raise StoreError(f"pinned block {i} of layer {layer} is gone")
            view[i * bb : (i + 1) * bb] = data

    def _remember_blocks(self, layer: int, view: memoryview, bb: int, blocks: range) -> bool:
        keys = self.manifest.keys
        try:
            for i in blocks:
                if not self.store.has(keys[i], layer):
                    self.store.put(keys[i], layer, view[i * bb : (i + 1) * bb])
        except StoreError:
            return False
        return True

    def _restore_state(self, layer: int, view: memoryview) -> None:
        if self.prefix_bytes(layer):
            state = self.store.get_state(self.state_key, layer)
            if state is None:
                raise StoreError(f"pinned state of layer {layer} is gone")
            view[: len(state)] = state
        elif not self.store.has_state(self.state_key, layer):
            with contextlib.suppress(StoreError):  # full of pinned entries: do not keep it
                self.store.put_state(self.state_key, layer, bytes(view))

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.store.unpin(self.manifest.keys[: self.blocks])
            if self.states:
                self.store.unpin([self.state_key])
