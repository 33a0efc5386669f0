"""split16: the byte-split codec for 2-byte dtypes (bf16, fp16, int16, uint16).

Why: in a 2-byte float the high byte (sign + exponent) holds nearly all the redundancy,
while the low byte (mantissa) is noise (~7.96 bits/byte on real KV). Entropy-coding only
the high plane gets the ratio of "shuffle + zstd" without paying to compress noise.

Wire format of a split16 chunk (the CHUNK ``data``; ``raw_length`` = *n* from ChunkMeta,
*m* = *n* // 2 values, *t* = *n* mod 2; multi-byte fields big-endian like the rest of
the protocol)::

    offset        size     field
    0             1        coder      1 = the high plane is one zstd frame (RFC 8878);
                                      anything else is rejected (MALFORMED_FRAME)
    1             1        reserved   0, else rejected
    2             2        reserved   0, else rejected
    4             4        hi_len     u32, size of the compressed high plane
    8             hi_len   high plane one zstd frame, frame content size present and
                                      equal to m, no trailing bytes, no dictionary
    8+hi_len      m        low plane  raw, byte 0 of each little-endian value
    8+hi_len+m    t        tail       the odd last byte of the chunk, raw

The planes are defined on the little-endian byte order of the values: value *i* is the
bytes ``raw[2i], raw[2i+1]``; ``high[i] = raw[2i+1]`` and ``low[i] = raw[2i]``. The
whole data is exactly ``8 + hi_len + m + t`` bytes, else MALFORMED_FRAME.

The functions below are the numpy transforms (each one pass, no temporaries): on one
core the split runs at ~10 GB/s and the join at ~8 GB/s, far above the entropy coder.
"""

from __future__ import annotations

import struct

import numpy as np

HEADER = struct.Struct(">BBHI")
HEADER_SIZE = HEADER.size  # 8
CODER_ZSTD = 1

_LE16 = np.dtype("<u2")


def values(data: memoryview, m: int) -> np.ndarray:
    """The first ``m`` 2-byte values of ``data`` as little-endian uint16 (zero-copy)."""
    return np.frombuffer(data, dtype=_LE16, count=m)


def split_high(vals: np.ndarray, high: np.ndarray) -> None:
    """high[i] = vals[i] >> 8, written into ``high`` (uint8, same length)."""
    np.right_shift(vals, 8, out=high, casting="unsafe")


def split_low(vals: np.ndarray, low: np.ndarray) -> None:
    """low[i] = vals[i] & 0xFF: the unsafe uint16 -> uint8 cast keeps the low byte."""
    np.copyto(low, vals, casting="unsafe")


def join(high: np.ndarray, low: np.ndarray, out_vals: np.ndarray) -> None:
    """out_vals[i] = high[i] << 8 | low[i], computed in place in ``out_vals``."""
    np.copyto(out_vals, high)
    np.left_shift(out_vals, 8, out=out_vals)
    np.bitwise_or(out_vals, low, out=out_vals)
