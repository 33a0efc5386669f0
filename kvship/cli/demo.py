"""``kvship demo``: two real daemons on loopback ship a hybrid model's KV and prove it arrived.

It is the five-minute tour (``make demo``): every piece is the real one (two ``kvshipd``
subprocesses, the engine API over Unix sockets with shared-memory staging, the peer link
over TCP), and the report shows the figures an operator would look at.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..bench.spawn import DaemonProcess, daemon_pair
from ..client import Client, Receiver
from ..layout import layer_spec, layout_of
from ..protocol import LayerSpec
from .common import (
    CliError,
    UsageError,
    gbps,
    human_bytes,
    print_json,
    run_async,
    size_arg,
)

MAX_DEMO_BYTES = 8 << 30
# A real prefill produces one layer every few ms; pacing the puts so shows what the demo is
# about: layers travel while later ones are still being computed (layer-wise pipelining).
DEFAULT_LAYER_MS = 2.0


@dataclass(frozen=True)
class HybridModel:
    """A small hybrid-attention model, in the style of Qwen3-Next / Kimi Linear (3 linear-
    attention layers per full-attention layer). Its KV per request is:

    * full-attention layers (layer i with i % 4 == 3: 6 of 24): paged KV blocks
      ``[blocks, 2 (K/V), block_size 16, kv_heads 4, head_dim 128]`` fp16 —
      32 KiB per block, 2 KiB per token per layer, 12 KiB per prompt token in all;
      this part grows with the prompt.
    * linear-attention layers (the other 18): one recurrent state ``[heads 8, dk 64, dv 64]``
      fp32 each — 128 KiB per layer, 2.25 MiB in all, whatever the prompt length.

    That split is why hybrid models make shipping KV across datacenters affordable: only a
    quarter of the layers grow with the prompt.
    """

    n_layers: int = 24
    full_every: int = 4
    block_size: int = 16
    kv_heads: int = 4
    head_dim: int = 128
    heads: int = 8
    dk: int = 64
    dv: int = 64

    def is_full(self, layer: int) -> bool:
        return layer % self.full_every == self.full_every - 1

    @property
    def n_full(self) -> int:
        return sum(self.is_full(i) for i in range(self.n_layers))

    @property
    def n_linear(self) -> int:
        return self.n_layers - self.n_full

    @property
    def block_bytes(self) -> int:
        """One paged block of one full-attention layer (K and V)."""
        return 2 * self.block_size * self.kv_heads * self.head_dim * 2

    @property
    def bytes_per_token(self) -> int:
        """Full-attention KV per prompt token, all full-attention layers together."""
        return self.n_full * self.block_bytes // self.block_size

    @property
    def state_bytes(self) -> int:
        return self.heads * self.dk * self.dv * 4

    @property
    def fixed_bytes(self) -> int:
        """Linear-attention states: the same for any prompt length."""
        return self.n_linear * self.state_bytes

    def blocks_for(self, total_bytes: int) -> int:
        """The most blocks whose KV, states included, fits in ``total_bytes``."""
        return (total_bytes - self.fixed_bytes) // (self.n_full * self.block_bytes)

    def layout(self, blocks: int) -> tuple[LayerSpec, ...]:
        full = layer_spec(np.float16, (blocks, 2, self.block_size, self.kv_heads, self.head_dim))
        linear = layer_spec(np.float32, (self.heads, self.dk, self.dv))
        return tuple(full if self.is_full(i) else linear for i in range(self.n_layers))

    def make_kv(self, blocks: int, seed: int = 0) -> list[np.ndarray]:
        """Random KV of that layout: small normal values, like real K/V and states."""
        rng = np.random.default_rng(seed)
        out = []
        for spec in self.layout(blocks):
            values = rng.standard_normal(spec.shape, dtype=np.float32) * 0.5
            out.append(values.astype(spec.dtype))
        return out


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="two daemons on loopback ship a synthetic hybrid-model KV and report",
        description="Start two kvshipd (prefill, decode) on loopback, send a synthetic "
        "hybrid-model KV from the prefill side while a decode engine receives it, check it "
        "bit for bit, and report. Exit 0 only if it arrived bit-exact.",
    )
    p.add_argument("--bytes", type=size_arg, default=64 << 20, help="KV size (default 64MiB)")
    p.add_argument(
        "--layer-ms",
        type=float,
        default=DEFAULT_LAYER_MS,
        help="pause between layer puts, like a prefill computing each layer "
        f"(default {DEFAULT_LAYER_MS:g}; 0 = put as fast as memcpy allows)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    model = HybridModel()
    minimum = model.fixed_bytes + model.n_full * model.block_bytes
    if not minimum <= args.bytes <= MAX_DEMO_BYTES:
        raise UsageError(
            f"--bytes must be between {human_bytes(minimum)} and {human_bytes(MAX_DEMO_BYTES)}"
        )
    if not 0 <= args.layer_ms <= 1000:
        raise UsageError("--layer-ms must be between 0 and 1000")
    blocks = model.blocks_for(args.bytes)
    layers = model.make_kv(blocks)
    tokens = np.random.default_rng(1).integers(0, 151_000, blocks * model.block_size)
    with tempfile.TemporaryDirectory(prefix="kvship-demo-") as tmp:
        try:
            prefill, decode = daemon_pair(tmp, ["--log-level", "warning"])
        except RuntimeError as exc:
            raise CliError(f"could not start the demo daemons: {exc}") from exc
        try:
            shipped = run_async(
                ship(prefill, decode, "demo-0001", layers, tokens.tolist(), args.layer_ms)
            )
            figures = daemon_figures(prefill, decode, "demo-0001")
        finally:
            prefill.stop()
            decode.stop()
    report = build_report(model, blocks, shipped, figures, prefill, decode)
    report["layer_ms"] = args.layer_ms
    if args.json:
        print_json(report)
    else:
        print_report(report)
    return 0 if report["digest_match"] else 1


async def ship(
    prefill: DaemonProcess,
    decode: DaemonProcess,
    request_id: str,
    layers: list[np.ndarray],
    tokens: list[int],
    layer_ms: float,
) -> dict[str, Any]:
    """Subscribe a decode engine, then send from the prefill engine; check each layer."""
    arrivals: dict[int, float] = {}
    mismatched: list[int] = []

    async def decode_engine() -> Receiver:
        receiver = await Client(decode.socket_path).receive(request_id, timeout=30)
        async for layer, array in receiver:  # a view into the arena: check it now
            arrivals[layer] = time.perf_counter()
            if not same_bytes(array, layers[layer]):
                mismatched.append(layer)
        return receiver

    receiving = asyncio.create_task(decode_engine())
    await asyncio.sleep(0.1)  # a head start for SUBSCRIBE (early KV would be held anyway)
    try:
        t0 = time.perf_counter()
        sender = await Client(prefill.socket_path).send(
            request_id, layout_of(layers), peer=decode.peer, token_ids=tokens
        )
        try:
            for i, array in enumerate(layers):
                if i and layer_ms:  # the prefill computes the next layer meanwhile
                    await asyncio.sleep(layer_ms / 1000)
                await sender.put(i, array)
            t_last_put = time.perf_counter()
            sent = await sender.finish(60)
        except BaseException:
            await sender.abort()
            raise
        t_acked = time.perf_counter()
        receiver = await asyncio.wait_for(receiving, 60)
    finally:
        if not receiving.done():
            receiving.cancel()
    t_last_layer = max(arrivals.values())
    exact = not mismatched and len(arrivals) == len(layers)
    return {
        "payload_bytes": sent.total_bytes,
        "seconds": t_last_layer - t0,
        "ack_seconds": t_acked - t0,
        "tail_lag_s": t_last_layer - t_last_put,
        "layers_before_last_put": sum(t < t_last_put for t in arrivals.values()),
        "mismatched_layers": sorted(mismatched),
        "tokens_match": tuple(receiver.token_ids) == tuple(tokens),
        "sent_digest": sent.digest,
        "received_digest": receiver.digest,
        "bit_exact": exact,
    }


def same_bytes(got: np.ndarray, want: np.ndarray) -> bool:
    """Bit-exact: dtype, shape and every byte (NaN payloads included)."""
    return (
        got.dtype == want.dtype
        and got.shape == want.shape
        and np.array_equal(got.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8))
    )


def daemon_figures(prefill: DaemonProcess, decode: DaemonProcess, request_id: str) -> dict:
    """What the daemons themselves say: /metrics counters and their transfer records."""

    def record(d: DaemonProcess) -> dict[str, Any]:
        found = [
            t for t in d.get_json("/v1/transfers")["transfers"] if t["request_id"] == request_id
        ]
        return found[-1] if found else {}

    return {
        "prefill": {
            "payload_bytes_sent": int(prefill.metric("kvship_payload_sent_bytes")),
            "wire_bytes_sent": int(prefill.metric("kvship_wire_sent_bytes")),
            "chunks_sent": int(prefill.metric("kvship_chunks_sent")),
            "transfers_out_complete": int(
                prefill.metric("kvship_transfers", 'direction="out",outcome="complete"')
            ),
            "transfer": record(prefill),
        },
        "decode": {
            "payload_bytes_received": int(decode.metric("kvship_payload_received_bytes")),
            "chunks_received": int(decode.metric("kvship_chunks_received")),
            "protocol_errors": int(decode.metric("kvship_protocol_errors")),
            "transfer": record(decode),
        },
    }


def build_report(
    model: HybridModel,
    blocks: int,
    shipped: dict[str, Any],
    figures: dict[str, Any],
    prefill: DaemonProcess,
    decode: DaemonProcess,
) -> dict[str, Any]:
    digest_match = bool(
        shipped["bit_exact"]
        and shipped["tokens_match"]
        and shipped["received_digest"] == shipped["sent_digest"]
    )
    received = shipped["received_digest"]
    return {
        "layout": {
            "layers": model.n_layers,
            "full_attention_layers": model.n_full,
            "linear_attention_layers": model.n_linear,
            "full_attention_every": model.full_every,
            "full_attention_shape": [blocks, 2, model.block_size, model.kv_heads, model.head_dim],
            "linear_attention_shape": [model.heads, model.dk, model.dv],
            "prompt_tokens": blocks * model.block_size,
            "bytes_per_token": model.bytes_per_token,
            "fixed_bytes": model.fixed_bytes,
        },
        "daemons": {"prefill": prefill.addresses, "decode": decode.addresses},
        "payload_bytes": shipped["payload_bytes"],
        "seconds": round(shipped["seconds"], 6),
        "goodput_GBps": round(gbps(shipped["payload_bytes"], shipped["seconds"]), 4),
        "ack_seconds": round(shipped["ack_seconds"], 6),
        "tail_lag_ms": round(shipped["tail_lag_s"] * 1000, 3),
        "layers_before_last_put": shipped["layers_before_last_put"],
        "mismatched_layers": shipped["mismatched_layers"],
        "tokens_match": shipped["tokens_match"],
        "digest": f"{shipped['sent_digest']:016x}",
        "received_digest": None if received is None else f"{received:016x}",
        "digest_match": digest_match,
        "metrics": figures,
    }


def print_report(r: dict[str, Any]) -> None:
    """The human-readable report: one labelled line per fact, under 100 columns."""
    lay, pre, dec = r["layout"], r["metrics"]["prefill"], r["metrics"]["decode"]
    full, lin, n = lay["full_attention_shape"], lay["linear_attention_shape"], lay["layers"]
    lines = ["kvship demo: prefill kvshipd -> decode kvshipd, real processes on loopback"]
    for side in ("prefill", "decode"):
        addr = r["daemons"][side]
        lines.append(f"  {side:<8} peer {addr['peer']:<22} control {addr['control']}")
    lines += [
        "",
        f"model        hybrid example, {n} layers: {lay['full_attention_layers']} full attention "
        f"(every {lay['full_attention_every']}th), {lay['linear_attention_layers']} linear",
        f"  full       paged KV [{full[0]} blocks, 2, {full[2]}, {full[3]}, {full[4]}] fp16, "
        f"{human_bytes(lay['bytes_per_token'])} per prompt token",
        f"  linear     state [{lin[0]}, {lin[1]}, {lin[2]}] fp32, "
        f"{human_bytes(lay['fixed_bytes'])} fixed whatever the prompt",
        f"  prompt     {lay['prompt_tokens']} tokens",
        "",
        f"shipped      {human_bytes(r['payload_bytes'])} ({r['payload_bytes']} B) in {n} layers",
        f"time         {r['seconds'] * 1000:.1f} ms from open to the last layer in the decode "
        f"engine: {r['goodput_GBps']:.2f} GB/s",
        f"             (sender's ack after {r['ack_seconds'] * 1000:.1f} ms)",
        f"pipelining   {r['layers_before_last_put']} of {n} layers reached the decode engine "
        "before the last put",
        f"             (puts {r['layer_ms']:g} ms apart); the last one "
        f"{r['tail_lag_ms']:.1f} ms after it",
        f"integrity    {n - len(r['mismatched_layers'])}/{n} layers bit-exact, token ids "
        f"{'match' if r['tokens_match'] else 'DIFFER'}",
        f"             digest sent {r['digest']}, received {r['received_digest']}",
        "",
    ]
    ratio = pre["wire_bytes_sent"] / max(pre["payload_bytes_sent"], 1)
    lines += [
        f"prefill      /metrics: sent {human_bytes(pre['payload_bytes_sent'])} (wire/payload "
        f"{ratio:.3f}), {pre['chunks_sent']} chunks, {pre['transfers_out_complete']} complete",
        f"decode       /metrics: received {human_bytes(dec['payload_bytes_received'])}, "
        f"{dec['chunks_received']} chunks verified, {dec['protocol_errors']} protocol errors",
    ]
    for side, figs in (("prefill", pre), ("decode", dec)):
        t = figs["transfer"]
        if t:
            lines.append(
                f"{side:<12} /v1/transfers: {t['transfer_id']} {t['direction']} {t['state']}, "
                f"{human_bytes(t['bytes_done'])} in {t['seconds'] * 1000:.1f} ms"
            )
    verdict = "OK, bit-exact" if r["digest_match"] else "FAILED: not bit-exact"
    lines += ["", f"result       {verdict}"]
    print("\n".join(lines))
