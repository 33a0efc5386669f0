"""kvship as a vLLM KV connector: disaggregated prefill, the KV crossing between kvshipd's.

Select it in both engines (docs/engines.md has the whole recipe)::

    --kv-transfer-config '{"kv_connector": "KvshipConnector",
        "kv_connector_module_path": "kvship.integrations.vllm",
        "kv_role": "kv_producer",            # the decode engine: "kv_consumer"
        "kv_connector_extra_config": {"engine_socket": "/run/kvship/engine.sock",
                                      "peer": "decode-host:7470"}}'

A request is prefilled remotely when its ``kv_transfer_params`` say so: to the producer
``{"do_remote_decode": true}`` (optional ``kvship_request``, ``kvship_peer``); the
producer's response carries the params for the consumer (``do_remote_prefill``,
``kvship_request``). The producer ships each layer's pages as soon as that layer's
attention has run (``save_kv_layer``) and holds the request's blocks until the far daemon
acknowledged the whole transfer. The consumer loads asynchronously: the request waits in
WAITING_FOR_REMOTE_KVS while the other requests run, its pages are written in place as
layers arrive, and vLLM then computes only the last prompt token. A load that fails (never
arrives, dead daemon, layout mismatch, truncated) reports the request's blocks as failed and
vLLM applies ``kv_load_failure_policy`` ("fail" or "recompute").

This module is the only one in kvship that imports vLLM; the work is in
:mod:`kvship.integrations.paged`.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from .ledger import SaveLedger
from .paged import PagedConfig, PagedGeometry, PagedTransfers, StatsLog

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger("vllm.kvship")  # in vLLM's log stream, with its handlers

TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class SaveStart:
    req_id: str
    key: str
    peer: str | None
    token_ids: list[int]


@dataclass
class SaveEnd:
    req_id: str
    key: str
    block_ids: list[int]  # the prompt's pages, in order


@dataclass
class Load:
    req_id: str
    key: str
    n_tokens: int
    page_ids: list[int]
    block_ids: list[int]


@dataclass
class KvshipConnectorMetadata(KVConnectorMetadata):
    """One step's work for the worker: saves to open, saves whose prefill ends in this
    step (their layers go out as the step computes them), loads to start, saves to drop."""

    starts: list[SaveStart] = field(default_factory=list)
    ends: list[SaveEnd] = field(default_factory=list)
    loads: list[Load] = field(default_factory=list)
    cancels: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Producing:
    key: str
    peer: str | None
    token_ids: list[int]
    started: bool = False
    ended: bool = False


@dataclass
class _Consuming:
    key: str
    n_tokens: int
    loaded_tokens: int
    computed_prompt_tokens: int = 0
    reported: bool = False


class KvshipConnector(KVConnectorBase_V1):
    """vLLM's ``KVConnectorBase_V1`` over kvship (see the module docstring)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        self._config = PagedConfig.from_extra(transfer.kv_connector_extra_config or {})
        self._producer = bool(transfer.is_kv_producer)
        self._consumer = bool(transfer.is_kv_consumer)
        self._block_size = vllm_config.cache_config.block_size
        self._model_id = self._config.model_id or _model_id(vllm_config)
        self._stats = StatsLog(self._config.stats_path)
        # scheduler side
        self._producing: dict[str, _Producing] = {}
        self._consuming: dict[str, _Consuming] = {}
        self._loads: list[Load] = []
        self._cancels: list[tuple[str, str]] = []
        # worker side
        self._transfers: PagedTransfers | None = None
        self._layer_of: dict[str, int] = {}
        self._ends: dict[str, SaveEnd] = {}  # by key: saves whose layers this step ships
        self._ledger = SaveLedger()  # when a saved request's blocks may go
        self._load_req: dict[str, str] = {}
        self._load_errors: set[int] = set()

    # ================================================================ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = sorted(kv_caches, key=_layer_number)
        tensors = [kv_caches[n] for n in names]
        first = tensors[0]
        for name, t in zip(names, tensors, strict=True):
            if t.dim() != 4 or t.shape[1:] != first.shape[1:] or t.dtype != first.dtype:
                raise ValueError(
                    f"kvship's vLLM connector ships full-attention pages of one shape "
                    f"[num_blocks, kv_heads, block_size, 2*head_dim] (vLLM's CPU backend); "
                    f"layer {name} has {t.dtype} {list(t.shape)}, the first {first.dtype} "
                    f"{list(first.shape)}"
                )
        if first.dtype not in TORCH_DTYPES:
            raise ValueError(f"kvship cannot ship a KV cache of {first.dtype}")
        _, kv_heads, block_size, two_head_dim = first.shape
        if block_size != self._block_size:
            raise ValueError(
                f"cache pages hold {block_size} tokens, the config says {self._block_size}"
            )
        geometry = PagedGeometry(
            model_id=self._model_id,
            n_layers=len(names),
            block_tokens=int(block_size),
            kv_heads=int(kv_heads),
            head_dim=int(two_head_dim) // 2,
            dtype=TORCH_DTYPES[first.dtype],
            page_shape=tuple(int(d) for d in first.shape[1:]),
        )
        self._layer_of = {name: i for i, name in enumerate(names)}
        self._transfers = PagedTransfers.from_config(
            geometry,
            [_numpy_view(t) for t in tensors],
            self._config,
            max_tokens=self._vllm_config.model_config.max_model_len,
            producer=self._producer,
            consumer=self._consumer,
        )
        logger.info(
            "kvship connector (%s): %s, engine socket %s, peer %s",
            "producer" if self._producer else "consumer",
            geometry.describe(),
            self._config.engine_socket,
            self._config.peer,
        )

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        # The saves are set up here, not in start_load_kv: vLLM starts asynchronous loads
        # after the forward pass, whose save_kv_layer calls need this step's saves.
        super().bind_connector_metadata(connector_metadata)
        meta, transfers = self._meta(), self._transfers
        if meta is None or transfers is None:
            return
        for key, reason in meta.cancels:
            self._ledger.cancelled(key)
            transfers.cancel_save(key, reason)
        for start in meta.starts:
            self._ledger.started(start.req_id, start.key)
            try:
                transfers.begin_save(start.key, start.token_ids, peer=start.peer)
            except ValueError as exc:
                logger.error("kvship: cannot save %s: %s", start.req_id, exc)
                self._ledger.over(start.key)  # its blocks go when the request ends
        self._ends = {end.key: end for end in meta.ends}

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta, transfers = self._meta(), self._transfers
        if meta is None or transfers is None:
            return
        for load in meta.loads:
            self._load_req[load.key] = load.req_id
            try:
                transfers.begin_load(load.key, load.n_tokens, load.page_ids, load.block_ids)
            except ValueError as exc:
                logger.error("kvship: cannot load %s: %s", load.req_id, exc)
                self._load_errors.update(load.block_ids)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Loads are asynchronous: a request runs only once all its pages landed.
        return

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        transfers = self._transfers
        if not self._ends or transfers is None:
            return
        layer = self._layer_of[layer_name]
        for end in self._ends.values():
            # A copy of the request's pages of this layer (whole pages: their inner order
            # is the backend's); the engine may overwrite its blocks from the next step on.
            pages = np.take(transfers.caches[layer], end.block_ids, axis=0)
            with contextlib.suppress(KeyError):  # it could not start: logged already
                transfers.save_layer(end.key, layer, pages)

    def wait_for_save(self) -> None:
        # Never blocks: the blocks stay held (request_finished) until the far daemon
        # acknowledged, which get_finished reports.
        if self._transfers is None:
            return
        for end in self._ends.values():
            self._transfers.prefill_ended(end.key)
            self._ledger.ended(end.req_id)
        self._ends = {}

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        transfers = self._transfers
        if transfers is None:
            return None, None
        for out in transfers.finished_saves():
            self._stats.write("save", out.summary())
            self._ledger.over(out.key)
        sending = self._ledger.engine_finished(finished_req_ids)
        recving: set[str] = set()
        for load in transfers.finished_loads():
            req_id = self._load_req.pop(load.key, load.key)
            self._stats.write("load", load.summary())
            if load.error is not None:
                logger.error("kvship: KV of request %s did not load: %s", req_id, load.error)
                self._load_errors.update(load.block_ids)
            recving.add(req_id)
        return (sending or None), (recving or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self._transfers is not None:
            self._transfers.close()
            self._transfers = None

    def _meta(self) -> KvshipConnectorMetadata | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvshipConnectorMetadata)
        return meta

    # ============================================================= scheduler side
    def on_new_request(self, request: Request) -> None:
        params = request.kv_transfer_params or {}
        if self._producer and params.get("do_remote_decode"):
            key = str(params.get("kvship_request") or request.request_id)
            peer = params.get("kvship_peer") or self._config.peer
            tokens = list(request.prompt_token_ids or ())
            self._producing[request.request_id] = _Producing(key, peer, tokens)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        params = request.kv_transfer_params or {}
        if not (self._consumer and params.get("do_remote_prefill")):
            return 0, False
        if not params.get("kvship_request"):
            logger.warning(
                "request %s: do_remote_prefill without kvship_request: computed here",
                request.request_id,
            )
            return 0, False
        count = len(request.prompt_token_ids or ()) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        params = request.kv_transfer_params or {}
        if not (self._consumer and params.get("do_remote_prefill")):
            return
        params["do_remote_prefill"] = False  # one transfer per request
        if num_external_tokens <= 0:
            return
        n_tokens = len(request.prompt_token_ids or ())
        n_pages = -(-n_tokens // self._block_size)
        held = set(blocks.get_unhashed_block_ids())  # not already in the local prefix cache
        plan = [(j, b) for j, b in enumerate(blocks.get_block_ids()[0][:n_pages]) if b in held]
        key = str(params["kvship_request"])
        self._loads.append(
            Load(request.request_id, key, n_tokens, [j for j, _ in plan], [b for _, b in plan])
        )
        self._consuming[request.request_id] = _Consuming(key, n_tokens, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KvshipConnectorMetadata(loads=self._loads, cancels=self._cancels)
        self._loads, self._cancels = [], []
        steps = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            self._step(meta, new.req_id, new.num_computed_tokens, steps.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            self._step(meta, req_id, cached.num_computed_tokens[i], steps.get(req_id, 0))
        return meta

    def _step(self, meta: KvshipConnectorMetadata, req_id: str, computed: int, n: int) -> None:
        """What this step means for a request's transfer (computed: tokens before it)."""
        produce = self._producing.get(req_id)
        if produce is not None and not produce.ended:
            if not produce.started:
                meta.starts.append(SaveStart(req_id, produce.key, produce.peer, produce.token_ids))
                produce.started = True
            if computed + n >= len(produce.token_ids):
                assert self._kv_cache_manager is not None
                n_pages = -(-len(produce.token_ids) // self._block_size)
                blocks = self._kv_cache_manager.get_block_ids(req_id)[0][:n_pages]
                meta.ends.append(SaveEnd(req_id, produce.key, list(blocks)))
                produce.ended = True
        consume = self._consuming.get(req_id)
        if consume is not None and not consume.reported:
            consume.computed_prompt_tokens += max(0, min(n, consume.n_tokens - computed))
            if computed + n >= consume.n_tokens:
                self._report(consume, "prefilled")

    def _report(self, consume: _Consuming, outcome: str) -> None:
        consume.reported = True
        self._stats.write(
            "consume",
            {
                "key": consume.key,
                "prompt_tokens": consume.n_tokens,
                "loaded_tokens": consume.loaded_tokens,
                "computed_prompt_tokens": consume.computed_prompt_tokens,
                "outcome": outcome,
            },
        )

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        consume = self._consuming.pop(request.request_id, None)
        if consume is not None and not consume.reported:
            self._report(consume, f"finished {request.status.name} before prefill")
        produce = self._producing.pop(request.request_id, None)
        if produce is None:
            return False, None
        if not produce.ended:
            if produce.started:
                self._cancels.append((produce.key, f"request {request.status.name}"))
            return False, None
        return True, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "kvship_request": produce.key,
            "kvship_prompt_tokens": len(produce.token_ids),
        }


def _layer_number(name: str) -> tuple[int, str]:
    found = LAYER_INDEX.search(name)
    return (int(found.group(1)) if found else 1 << 30, name)


def _numpy_view(tensor: torch.Tensor) -> np.ndarray:
    """The CPU cache tensor as numpy, sharing its memory (bf16 as its uint16 bits)."""
    if tensor.device.type != "cpu":
        raise ValueError(
            f"kvship's vLLM connector reads and writes pages on the CPU; this cache is on "
            f"{tensor.device} (GPU engines: see docs/engines.md)"
        )
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def _model_id(vllm_config: VllmConfig) -> str:
    served = vllm_config.model_config.served_model_name
    if isinstance(served, list | tuple):
        served = served[0] if served else None
    return str(served or vllm_config.model_config.model)
