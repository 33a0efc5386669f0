"""Paged-KV engines on kvship: a request's pages leave layer by layer and land in the far
engine's pages.

Engine-neutral on purpose (numpy, no engine import): the vLLM connector
(:mod:`kvship.integrations.vllm`) is thin glue over it, and another engine with a paged KV
cache maps onto the same calls (docs/engines.md). One layer's cache is an array whose first
axis is the block ("page"): ``[num_blocks, *page_shape]``. A request's layer travels as its
pages in prompt order, ``[n_pages, *page_shape]``; page ``j`` holds tokens
``[j * block_tokens, (j + 1) * block_tokens)``, so the far daemon's prefix dedup (whole
blocks keyed by the prompt's token ids) skips the pages it already holds, and whole pages
are copied, never tokens (a page's inner order is the attention backend's business).

The engine's threads never wait on the network: :class:`PagedTransfers` runs a
:class:`~kvship.SyncClient`'s loop thread; saves and loads are queued to it and their
outcomes collected by polling. Every wait is bounded (``load_timeout``, ``layer_timeout``,
``save_timeout``), so a lost transfer becomes an error outcome, never a hung engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

import numpy as np

from ..client.sync import SyncClient
from ..errors import KvshipError
from ..layout import layer_spec, storage_dtype
from ..layout.model import DTYPE_SIZES, FullAttention, ModelLayout
from ..protocol import LayerSpec

log = logging.getLogger("kvship.integrations")

MIB = 1024 * 1024
MAX_CHUNK = 4 * MIB
# Chunks of whole pages, as large as kvship takes: the chunk straddling a held prefix
# travels as its tail (SPEC §7.6.5), so large chunks cost dedup nothing.
CHUNK_TARGET = MAX_CHUNK


class LayoutMismatch(KvshipError):
    """The far engine's pages are not this engine's (block size, dtype, heads, layers)."""


@dataclass(frozen=True)
class PagedGeometry:
    """One engine's paged KV cache (one tensor-parallel rank's share): every layer is
    full attention with pages of ``page_shape`` holding ``block_tokens`` tokens' K and V."""

    model_id: str
    n_layers: int
    block_tokens: int
    kv_heads: int
    head_dim: int
    dtype: str  # kvship's name: "float32", "bfloat16", ...
    page_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(
                f"dtype {self.dtype!r} is not one kvship ships ({sorted(DTYPE_SIZES)})"
            )
        if min(self.n_layers, self.block_tokens, self.kv_heads, self.head_dim) < 1:
            raise ValueError(f"a geometry needs positive sizes: {self}")
        want = 2 * self.kv_heads * self.head_dim * self.block_tokens
        if math.prod(self.page_shape) != want:
            raise ValueError(
                f"a page of shape {self.page_shape} does not hold K and V of {self.block_tokens} "
                f"tokens x {self.kv_heads} heads x {self.head_dim} ({want} elements)"
            )

    @cached_property
    def model(self) -> ModelLayout:
        """The kvship layout: what the prefix keys and the daemons' dedup are computed on."""
        kind = FullAttention(self.block_tokens, self.kv_heads, self.head_dim, self.dtype)
        return ModelLayout(self.model_id, self.model_id, (kind,) * self.n_layers)

    @property
    def page_bytes(self) -> int:
        return math.prod(self.page_shape) * DTYPE_SIZES[self.dtype]

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_tokens)

    def layer(self, n_tokens: int) -> LayerSpec:
        return layer_spec(self.dtype, (self.pages_for(n_tokens), *self.page_shape))

    def layout(self, n_tokens: int) -> tuple[LayerSpec, ...]:
        return (self.layer(n_tokens),) * self.n_layers

    def chunk_bytes(self, target: int = CHUNK_TARGET) -> int:
        """Whole pages per chunk, at most ``target`` bytes (and at least one page)."""
        if self.page_bytes > MAX_CHUNK:
            raise ValueError(f"a page of {self.page_bytes} B exceeds kvship's largest chunk")
        pages = max(1, min(target, MAX_CHUNK) // self.page_bytes)
        return pages * self.page_bytes

    def describe(self) -> str:
        return (
            f"{self.n_layers} layers, block {self.block_tokens} tokens, {self.kv_heads} KV heads "
            f"x {self.head_dim}, {self.dtype}, page {list(self.page_shape)}"
        )

    def mismatch(self, layout: Sequence[LayerSpec], n_tokens: int) -> str | None:
        """Why a transfer's layout cannot land in this engine's pages, or None if it can."""
        want = self.layer(n_tokens)
        if len(layout) != self.n_layers:
            return f"the producer sent {len(layout)} layers; this engine has {self.n_layers}"
        for i, spec in enumerate(layout):
            if spec != want:
                return (
                    f"layer {i}: the producer sent {spec.dtype} {list(spec.shape)}; this engine "
                    f"({self.describe()}) expects {want.dtype} {list(want.shape)} for "
                    f"{n_tokens} tokens (different block size, dtype or heads)"
                )
        return None


@dataclass
class SaveOutcome:
    """How one request's save ended (``error`` None: the far daemon acknowledged it)."""

    key: str
    layers: int
    started: float
    queued_times: list[float] = field(default_factory=list)  # save_layer calls
    opened: float | None = None  # the local daemon took the transfer's OPEN
    put_times: list[float] = field(default_factory=list)  # each layer with the daemon
    prefill_end: float | None = None  # when the engine's step that ended prefill returned
    finished: float | None = None
    payload_bytes: int = 0
    error: str | None = None

    @property
    def layers_put_before_prefill_end(self) -> int:
        """Layers whose bytes were with the local daemon before the engine's prefill step
        ended: the evidence of layer-wise pipelining."""
        end = self.prefill_end
        return 0 if end is None else sum(t <= end for t in self.put_times)

    def timeline_ms(self) -> dict[str, float | None]:
        """When things happened, in ms after the save began (for pipelining questions)."""

        def ms(t: float | None) -> float | None:
            return None if t is None else round(1000 * (t - self.started), 2)

        first = self.queued_times[0] if self.queued_times else None
        last = self.queued_times[-1] if self.queued_times else None
        return {
            "opened": ms(self.opened),
            "first_layer_queued": ms(first),
            "last_layer_queued": ms(last),
            "first_layer_put": ms(self.put_times[0] if self.put_times else None),
            "last_layer_put": ms(self.put_times[-1] if self.put_times else None),
            "prefill_end": ms(self.prefill_end),
            "acknowledged": ms(self.finished) if self.error is None else None,
        }

    def summary(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "layers": self.layers,
            "layers_put": len(self.put_times),
            "layers_put_before_prefill_end": self.layers_put_before_prefill_end,
            "timeline_ms": self.timeline_ms(),
            "seconds": None if self.finished is None else round(self.finished - self.started, 4),
            "payload_bytes": self.payload_bytes,
            "error": self.error,
        }


@dataclass
class LoadOutcome:
    """How one request's load ended (``error`` None: every page of every layer landed)."""

    key: str
    block_ids: tuple[int, ...]
    started: float
    layers_written: int = 0
    finished: float | None = None
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "blocks": len(self.block_ids),
            "layers_written": self.layers_written,
            "seconds": None if self.finished is None else round(self.finished - self.started, 4),
            "error": self.error,
        }


@dataclass(frozen=True)
class PagedConfig:
    """An engine integration's settings, from its config map (vLLM's
    ``kv_connector_extra_config``). Unknown keys are refused, so a typo never silently
    falls back to a default."""

    engine_socket: str | None = None  # the local kvshipd (default: $KVSHIP_ENGINE_SOCKET...)
    peer: str | None = None  # the far daemon's peer address host:port (producer)
    model_id: str | None = None  # prefix-key namespace; must match on both sides
    load_timeout_s: float = 30.0  # a whole load, from its start to its last page
    layer_timeout_s: float = 10.0  # the first layer, and each next one
    save_timeout_s: float = 60.0  # a whole save, from its open to the far daemon's ack
    chunk_bytes: int | None = None  # default: whole pages, up to 4 MiB
    stats_path: str | None = None  # JSON lines, one per save / load / consumed request

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> PagedConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"kvship: unknown setting(s) {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for name, value in extra.items():
            if name.endswith("_s"):
                if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                    raise ValueError(f"kvship: {name} must be a positive number, got {value!r}")
                value = float(value)
            elif name == "chunk_bytes" and value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise ValueError(
                        f"kvship: chunk_bytes must be a positive integer, got {value!r}"
                    )
            elif value is not None and not isinstance(value, str):
                raise ValueError(f"kvship: {name} must be a string, got {value!r}")
            values[name] = value
        return cls(**values)


class StatsLog:
    """Appends one JSON line per event to a file (several processes may share it: each
    line is one O_APPEND write). No path: nothing is written."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def write(self, event: str, fields_: Mapping[str, Any]) -> None:
        if not self.path:
            return
        line = json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **fields_})
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


_CANCEL = object()


@dataclass
class _Save:
    outcome: SaveOutcome
    tokens: tuple[int, ...]
    peer: str
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancel_reason: str = ""


class PagedTransfers:
    """The kvship side of a paged engine's worker: saves (producer) and loads (consumer).

    ``caches``: this worker's per-layer KV cache arrays, in model layer order, each
    ``[num_blocks, *page_shape]`` of the geometry's storage dtype (numpy views of the
    engine's tensors: pages are read and written in place). Thread use: every public
    method is called from the engine's thread(s); the transfers run on the client's loop.
    """

    def __init__(
        self,
        geometry: PagedGeometry,
        caches: Sequence[Any],
        *,
        address: str | None = None,
        peer: str | None = None,
        load_timeout: float = 30.0,
        layer_timeout: float = 10.0,
        save_timeout: float = 60.0,
        chunk_bytes: int | None = None,
        warm_sends: int = 0,
        warm_receives: int = 0,
        **client_kwargs: Any,
    ) -> None:
        if len(caches) != geometry.n_layers:
            raise ValueError(f"{len(caches)} cache arrays for {geometry.n_layers} layers")
        want = storage_dtype(geometry.dtype)
        for i, cache in enumerate(caches):
            if tuple(cache.shape[1:]) != geometry.page_shape or cache.dtype != want:
                raise ValueError(
                    f"cache {i}: {cache.dtype} {list(cache.shape)} is not pages of "
                    f"{want} {list(geometry.page_shape)}"
                )
        self.geometry = geometry
        self.caches = list(caches)
        self.peer = peer
        self.load_timeout = load_timeout
        self.layer_timeout = layer_timeout
        self.save_timeout = save_timeout
        self._sync = SyncClient(
            address, chunk_bytes=chunk_bytes or geometry.chunk_bytes(), **client_kwargs
        )
        self._lock = threading.Lock()
        self._saves: dict[str, _Save] = {}
        self._done_saves: list[SaveOutcome] = []
        self._loads: set[str] = set()
        self._done_loads: list[LoadOutcome] = []
        self._tasks: set[Any] = set()
        self._warming: Any = None
        if warm_sends or warm_receives:
            # Connections and arenas made now, in the background: the first request's
            # transfer pays no set-up (a failure here only means the first one will).
            self._warming = self._submit(self._warm(warm_sends, warm_receives))

    @classmethod
    def from_config(
        cls,
        geometry: PagedGeometry,
        caches: Sequence[Any],
        config: PagedConfig,
        *,
        max_tokens: int | None = None,
        producer: bool = True,
        consumer: bool = True,
    ) -> PagedTransfers:
        """``max_tokens``: the longest prompt (the model's context): the receive arena
        holds three of its layers, made at start with the warm connections."""
        arena = None
        if max_tokens:
            arena = min(256 * MIB, 3 * geometry.pages_for(max_tokens) * geometry.page_bytes)
        return cls(
            geometry,
            caches,
            address=config.engine_socket,
            peer=config.peer,
            load_timeout=config.load_timeout_s,
            layer_timeout=config.layer_timeout_s,
            save_timeout=config.save_timeout_s,
            chunk_bytes=config.chunk_bytes,
            warm_sends=1 if producer else 0,
            warm_receives=1 if consumer else 0,
            receive_arena_bytes=arena,
        )

    async def _warm(self, sends: int, receives: int) -> None:
        try:
            await self._sync.client.prepare(send=sends, receive=receives)
        except (KvshipError, ValueError) as exc:
            log.warning("kvship: could not open connections ahead: %s", exc)

    # ------------------------------------------------------------------ producer
    def begin_save(self, key: str, token_ids: Sequence[int], *, peer: str | None = None) -> None:
        """Open the transfer of a request's KV (at its first prefill step: the far daemon
        starts its dedup check while prefill runs)."""
        where = peer or self.peer
        if not where:
            raise ValueError(f"save {key!r}: no destination (peer) in the config or the request")
        outcome = SaveOutcome(key, self.geometry.n_layers, time.monotonic())
        job = _Save(outcome, tuple(int(t) for t in token_ids), where)
        with self._lock:
            if key in self._saves:
                raise ValueError(f"save {key!r} is already under way")
            self._saves[key] = job
        self._submit(self._run_save(job))

    def save_layer(self, key: str, layer: int, pages: Any) -> None:
        """Hand one layer of the request's pages (``[n_pages, *page_shape]``, an array this
        call's caller gives up) to the transfer; returns at once."""
        job = self._saves.get(key)
        if job is None:
            raise KeyError(f"no save {key!r} under way")
        job.outcome.queued_times.append(time.monotonic())
        self._sync.loop.call_soon_threadsafe(job.queue.put_nowait, (layer, pages))

    def prefill_ended(self, key: str) -> None:
        """The engine's step that computed the request's last prompt token returned."""
        now = time.monotonic()
        with self._lock:  # the save may have ended already (acknowledged, not collected)
            job = self._saves.get(key)
            outcomes = [job.outcome] if job else [o for o in self._done_saves if o.key == key]
        for outcome in outcomes:
            if outcome.prefill_end is None:
                outcome.prefill_end = now

    def cancel_save(self, key: str, reason: str) -> None:
        """Abort a save whose request went away before its KV was complete."""
        job = self._saves.get(key)
        if job is not None:
            job.cancel_reason = reason
            self._sync.loop.call_soon_threadsafe(job.queue.put_nowait, _CANCEL)

    def finished_saves(self) -> list[SaveOutcome]:
        """Saves that ended (acknowledged or failed) since the last call."""
        with self._lock:
            done, self._done_saves = self._done_saves, []
        return done

    async def _run_save(self, job: _Save) -> None:
        out = job.outcome
        try:
            async with asyncio.timeout(self.save_timeout):
                await self._save(job)
        except TimeoutError:
            out.error = f"not acknowledged within {self.save_timeout} s"
        except (KvshipError, ValueError) as exc:
            out.error = str(exc)
        finally:
            out.finished = time.monotonic()
            with self._lock:
                self._saves.pop(out.key, None)
                self._done_saves.append(out)
            if out.error:
                log.warning("kvship: save of %s failed: %s", out.key, out.error)

    async def _save(self, job: _Save) -> None:
        out, geometry = job.outcome, self.geometry
        layout = geometry.layout(len(job.tokens))
        async with self._sync.client.send(
            out.key, layout, peer=job.peer, token_ids=job.tokens, model=geometry.model
        ) as sender:
            out.opened = time.monotonic()
            for _ in range(geometry.n_layers):
                item = await job.queue.get()
                if item is _CANCEL:
                    raise KvshipError(f"cancelled: {job.cancel_reason}")
                layer, pages = item
                await sender.put(layer, pages)
                out.put_times.append(time.monotonic())
            result = await sender.finish()
            out.payload_bytes = result.total_bytes

    # ------------------------------------------------------------------ consumer
    def begin_load(
        self, key: str, n_tokens: int, page_ids: Sequence[int], block_ids: Sequence[int]
    ) -> None:
        """Receive request ``key`` (a prompt of ``n_tokens``) and write its page
        ``page_ids[k]`` of every layer into block ``block_ids[k]`` of that layer's cache."""
        if len(page_ids) != len(block_ids):
            raise ValueError(f"{len(page_ids)} pages for {len(block_ids)} blocks")
        n_pages = self.geometry.pages_for(n_tokens)
        if any(not 0 <= p < n_pages for p in page_ids):
            raise ValueError(f"load {key!r}: page ids outside the prompt's {n_pages} pages")
        outcome = LoadOutcome(key, tuple(int(b) for b in block_ids), time.monotonic())
        with self._lock:
            if key in self._loads:
                raise ValueError(f"load {key!r} is already under way")
            self._loads.add(key)
        pages: slice | np.ndarray = np.asarray(page_ids, dtype=np.intp)
        if len(page_ids) and list(page_ids) == list(range(page_ids[0], page_ids[-1] + 1)):
            # The usual plan (the prompt's pages past a local prefix hit): a view of the
            # layer, so each page is copied once, straight into its block.
            pages = slice(page_ids[0], page_ids[-1] + 1)
        blocks = np.asarray(block_ids, dtype=np.intp)
        self._submit(self._run_load(outcome, n_tokens, pages, blocks))

    def finished_loads(self) -> list[LoadOutcome]:
        """Loads that ended (every page written, or failed) since the last call."""
        with self._lock:
            done, self._done_loads = self._done_loads, []
        return done

    async def _run_load(
        self, out: LoadOutcome, n_tokens: int, pages: slice | np.ndarray, blocks: np.ndarray
    ) -> None:
        try:
            async with asyncio.timeout(self.load_timeout):
                await self._load(out, n_tokens, pages, blocks)
        except TimeoutError:
            out.error = f"incomplete after {self.load_timeout} s ({out.layers_written} layers)"
        except (KvshipError, ValueError) as exc:
            out.error = f"{type(exc).__name__}: {exc}"
        finally:
            out.finished = time.monotonic()
            with self._lock:
                self._loads.discard(out.key)
                self._done_loads.append(out)
            if out.error:
                log.warning("kvship: load of %s failed: %s", out.key, out.error)

    async def _load(
        self, out: LoadOutcome, n_tokens: int, pages: slice | np.ndarray, blocks: np.ndarray
    ) -> None:
        async with self._sync.client.receive(out.key, timeout=self.layer_timeout) as rx:
            reason = self.geometry.mismatch(rx.layout, n_tokens)
            if reason is not None:
                raise LayoutMismatch(reason)
            if len(rx.token_ids) not in (0, n_tokens):
                raise LayoutMismatch(
                    f"the producer's prompt has {len(rx.token_ids)} tokens, this one {n_tokens}"
                )
            async for layer, array in rx.layers():
                # Whole pages, from the arena view into the engine's blocks (one copy).
                self.caches[layer][blocks] = array[pages]
                out.layers_written += 1
            if not rx.complete:
                raise KvshipError("the transfer ended before every layer arrived")

    # ------------------------------------------------------------------ both
    def _submit(self, coro: Any) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._sync.loop)
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)
        return future

    def wait_warm(self, timeout: float) -> bool:
        """Block until the connections opened ahead are pooled (True), or ``timeout``."""
        if self._warming is None:
            return True
        try:
            self._warming.result(timeout)
        except TimeoutError:
            return False
        return True

    def pending(self) -> int:
        """Saves and loads not ended yet."""
        with self._lock:
            return len(self._saves) + len(self._loads)

    def close(self, wait: float = 5.0) -> None:
        """Let running transfers end (up to ``wait`` seconds), then close the client."""
        deadline = time.monotonic() + wait
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._sync.close()
