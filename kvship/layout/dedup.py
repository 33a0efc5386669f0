"""The dedup manifest a transfer carries, and which chunks a receiver's holdings cover.

Pure: both daemons compute the same skip set from the same inputs (the layout, the chunk
size and the receiver's answer), so nothing about skipped chunks needs to travel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..protocol.frames import LayerSpec, chunk_table
from .model import FullAttention, ModelLayout


class DedupError(ValueError):
    """A manifest that does not describe the transfer it came with."""


@dataclass(frozen=True)
class Manifest:
    """What OPEN's ``extra["dedup"]`` says: the model, and the prompt's block keys."""

    layout: ModelLayout
    tp_rank: int
    keys: tuple[bytes, ...]

    def to_extra(self) -> dict[str, Any]:
        return {
            "model": self.layout.to_dict(),
            "tp_rank": self.tp_rank,
            "keys": [k.hex() for k in self.keys],
        }

    @classmethod
    def from_extra(cls, extra: Any) -> Manifest:
        if not isinstance(extra, dict):
            raise DedupError("dedup: not an object")
        try:
            layout = ModelLayout.from_dict(extra["model"])
            tp_rank = extra.get("tp_rank", 0)
            if isinstance(tp_rank, bool) or not isinstance(tp_rank, int) or tp_rank < 0:
                raise ValueError(f"tp_rank must be an integer >= 0, got {tp_rank!r}")
            keys = tuple(bytes.fromhex(k) for k in extra["keys"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DedupError(f"dedup manifest: {exc}") from exc
        if any(len(k) != 16 for k in keys):
            raise DedupError("dedup manifest: block keys are 16 bytes")
        return cls(layout, tp_rank, keys)

    def check(self, layers: Sequence[LayerSpec], n_tokens: int, chunk_size: int) -> None:
        """The transfer's layers must be the model's, block-aligned, or dedup is refused."""
        model = self.layout.layers
        if len(layers) != len(model):
            raise DedupError(f"{len(layers)} layers sent, the model has {len(model)}")
        bt = self.layout.block_tokens
        if len(self.keys) != n_tokens // bt:
            raise DedupError(f"{len(self.keys)} keys for {n_tokens // bt} full blocks")
        n_blocks = -(-n_tokens // bt)
        for i, (spec, kind) in enumerate(zip(layers, model, strict=True)):
            want = (
                n_blocks * kind.block_bytes if isinstance(kind, FullAttention) else kind.state_bytes
            )
            if spec.nbytes != want:
                raise DedupError(f"layer {i}: {spec.nbytes} B sent, the model says {want} B")
            if isinstance(kind, FullAttention) and chunk_size % kind.block_bytes:
                raise DedupError(f"chunk_size {chunk_size} is not whole blocks of layer {i}")


def skipped_bytes(
    layers: Sequence[LayerSpec],
    skip: dict[int, list[int]],
    chunk_size: int,
    tails: dict[int, int] | None = None,
) -> int:
    """Bytes that do not travel: the skipped chunks (whole, except a linear layer's short
    last one) and the held heads of the chunks sent as tails."""
    whole = sum(min(len(chunks) * chunk_size, layers[i].nbytes) for i, chunks in skip.items())
    return whole + sum((tails or {}).values())


def skipped_chunks(
    layout: ModelLayout,
    layers: Sequence[LayerSpec],
    chunk_size: int,
    held_blocks: int,
    state_held: bool,
) -> dict[int, list[int]]:
    """Chunk indices the sender leaves out, by layer: full-attention chunks that lie wholly
    inside the first ``held_blocks`` blocks, and every chunk of the linear layers when the
    receiver holds the exact states."""
    starts = chunk_table(tuple(layers), chunk_size)
    skip: dict[int, list[int]] = {}
    for i, kind in enumerate(layout.layers):
        first, end = starts[i], starts[i + 1]
        if isinstance(kind, FullAttention):
            covered = held_blocks * kind.block_bytes
            n = min(end - first, covered // chunk_size)
        else:
            n = end - first if state_held else 0
        if n:
            skip[i] = list(range(first, first + n))
    return skip


def tail_cuts(
    layout: ModelLayout,
    layers: Sequence[LayerSpec],
    chunk_size: int,
    held_blocks: int,
) -> dict[int, int]:
    """With ``CAP_DEDUP_TAIL``: the chunk of each full-attention layer that straddles the
    first ``held_blocks`` blocks travels as its tail only. Chunk index -> bytes at its start
    the receiver fills from its store (0 < cut < the chunk's length; SPEC §7.6.5)."""
    starts = chunk_table(tuple(layers), chunk_size)
    cuts: dict[int, int] = {}
    for i, kind in enumerate(layout.layers):
        if not isinstance(kind, FullAttention):
            continue
        covered = held_blocks * kind.block_bytes
        whole = covered // chunk_size
        if starts[i] + whole >= starts[i + 1]:
            continue  # every chunk of the layer is skipped whole
        cut = covered - whole * chunk_size
        length = min(chunk_size, layers[i].nbytes - whole * chunk_size)
        if 0 < cut < length:
            cuts[starts[i] + whole] = cut
    return cuts
