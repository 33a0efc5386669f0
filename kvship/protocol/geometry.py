"""Transfer geometry (SPEC §7.2): layers, and where each chunk of a transfer lies.

Both ends derive every chunk's (layer, offset, length) from its index alone, so a chunk
whose header claims anything else is refused (``LAYOUT_MISMATCH``) on either side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ErrorCode, ProtocolError


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One layer's bytes as the wire sees them; dtype and shape let the far side rebuild it."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes}


def chunk_table(layers: tuple[LayerSpec, ...], chunk_size: int) -> list[int]:
    """First chunk index of each layer, plus the total as the last entry.

    Layers are cut into ``ceil(nbytes / chunk_size)`` chunks, numbered layer by layer, so
    both ends derive every chunk's (layer, offset, length) from its index alone.
    """
    starts = [0]
    for spec in layers:
        starts.append(starts[-1] + -(-spec.nbytes // chunk_size))
    return starts


def check_place(
    layers: tuple[LayerSpec, ...],
    starts: list[int],
    chunk_size: int,
    chunk_index: int,
    layer: int,
    offset: int,
    raw_length: int,
    tails: bool = False,
) -> None:
    """Raise ``LAYOUT_MISMATCH`` unless chunk ``chunk_index`` lies in ``layer`` at
    ``offset`` with ``raw_length`` bytes, as the layout says (SPEC §5.4, §7.2). With
    ``tails`` (``CAP_DEDUP_TAIL``) it may also be the chunk's tail: from an offset inside
    its range to its end (whether that is the tail dedup expects is the transfer's check,
    §7.6.5)."""
    if layer >= len(layers) or not starts[layer] <= chunk_index < starts[layer + 1]:
        raise ProtocolError(
            ErrorCode.LAYOUT_MISMATCH,
            f"chunk {chunk_index} is not in layer {layer} of the declared layout",
        )
    expect_offset = (chunk_index - starts[layer]) * chunk_size
    expect_length = min(chunk_size, layers[layer].nbytes - expect_offset)
    end = expect_offset + expect_length
    if tails and expect_offset < offset < end and offset + raw_length == end:
        return
    if offset != expect_offset or raw_length != expect_length:
        raise ProtocolError(
            ErrorCode.LAYOUT_MISMATCH,
            f"chunk {chunk_index} claims offset {offset} length {raw_length}, "
            f"the layout puts it at {expect_offset} length {expect_length}",
        )
