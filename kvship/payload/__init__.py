"""Chunk payload codecs (raw, zstd, split16) on memoryviews: see docs/codecs.md.

Layer rule: imports only ``kvship.protocol``, numpy, zstandard, xxhash and the stdlib.
"""

from .codecs import (
    CODEC_NAMES,
    CODEC_RAW,
    CODEC_SPLIT16,
    CODEC_ZSTD,
    MIN_SAVING,
    Decoder,
    Encoder,
    choose_codec,
    max_coded_length,
)

__all__ = [
    "CODEC_NAMES",
    "CODEC_RAW",
    "CODEC_SPLIT16",
    "CODEC_ZSTD",
    "MIN_SAVING",
    "Decoder",
    "Encoder",
    "choose_codec",
    "max_coded_length",
]
