"""Chunk codecs: raw, zstd and split16, chosen per chunk and named by ChunkMeta's ``codec``.

Sans-IO and pure: an :class:`Encoder` or :class:`Decoder` owns its zstd contexts and its
reused buffers, so it is NOT thread-safe: give each worker thread its own. The wire formats
are in docs/codecs.md (and split16's in :mod:`kvship.payload.split`).

- ``CODEC_RAW`` (0): the chunk's bytes as they are.
- ``CODEC_ZSTD`` (1): one zstd frame (level 1 by default), content size in the frame
  header, no zstd checksum (ChunkMeta's xxh3 covers the bytes), no trailing bytes.
- ``CODEC_SPLIT16`` (2): byte planes of 2-byte values; the high plane is one zstd frame
  tuned to be an almost pure Huffman coder, the low plane goes raw.

A chunk whose coded form does not save at least ``MIN_SAVING`` of its size goes raw:
the receiver's decode time is not worth less than that.
"""

from __future__ import annotations

import numpy as np
import xxhash
import zstandard as zstd

from kvship.protocol import ErrorCode, ProtocolError
from kvship.protocol.frames import CODEC_RAW, CODEC_SPLIT16, CODEC_ZSTD

from . import split

__all__ = [
    "CODEC_NAMES",
    "CODEC_RAW",
    "CODEC_SPLIT16",
    "CODEC_ZSTD",
    "HIGH_PLANE_PARAMS",
    "MIN_SAVING",
    "Decoder",
    "Encoder",
    "choose_codec",
    "max_coded_length",
]

MIN_SAVING = 0.03
CODEC_NAMES = {CODEC_RAW: "raw", CODEC_ZSTD: "zstd", CODEC_SPLIT16: "split16"}

# Exponent bytes repeat in short runs: zstd-1 spends its time finding short matches that
# barely beat Huffman-coding the same bytes as literals. A tiny hash table (2^7 entries)
# and min_match 7 keep only cheap long matches, so the frame is mostly Huffman-coded
# literals. bf16 samples, one core: ratio 1.456 at ~1.4 GB/s encode, where zstd-1 on the
# same plane gives 1.449 at ~0.6 GB/s (docs/codecs.md has the sweep).
HIGH_PLANE_PARAMS = zstd.ZstdCompressionParameters(
    strategy=zstd.STRATEGY_FAST,
    min_match=7,
    hash_log=7,
    chain_log=6,
    search_log=1,
    window_log=17,
    target_length=0,  # >0 turns fast into "negative levels": no Huffman literals
    write_content_size=True,
    write_checksum=False,
    write_dict_id=False,
)

# Defence in depth: the output buffer always holds the (checked) content size, so zstd
# decodes in one pass with no window buffer; were it ever to stream, this caps its memory.
MAX_WINDOW = 1 << 24

_TWO_BYTE_DTYPES = frozenset(
    {"float16", "bfloat16", "uint16", "int16", "fp16", "bf16", "half", "<f2", "<u2", "<i2"}
)


def choose_codec(dtype: str) -> int:
    """split16 for 2-byte dtypes, zstd for everything else (fp8, fp32, unknown)."""
    return CODEC_SPLIT16 if dtype.lower() in _TWO_BYTE_DTYPES else CODEC_ZSTD


def max_coded_length(raw_length: int, min_saving: float = MIN_SAVING) -> int:
    """The longest coded form a chunk of ``raw_length`` bytes may travel as (else raw)."""
    return int(raw_length * (1.0 - min_saving))


def _bytes_view(buf: memoryview | bytes | bytearray) -> memoryview:
    """A flat unsigned-byte view of any C-contiguous buffer (numpy arrays included)."""
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _malformed(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.MALFORMED_FRAME, message)


def _zstd_frame_length(src: memoryview) -> int:
    """Bytes taken by the zstd frame at the start of ``src``, from its block headers.

    zstandard's one-shot API silently ignores bytes after a frame; walking the block
    headers (RFC 8878 §3.1.1.2) lets the decoder insist on exactly one frame.
    """
    pos = zstd.frame_header_size(src)
    has_checksum = src[4] & 0x04
    end = len(src)
    while True:
        if pos + 3 > end:
            raise _malformed("zstd frame truncated in a block header")
        header = src[pos] | src[pos + 1] << 8 | src[pos + 2] << 16
        block_type = (header >> 1) & 3
        if block_type == 3:
            raise _malformed("zstd block of reserved type")
        pos += 3 + (1 if block_type == 1 else header >> 3)
        if header & 1:
            return pos + (4 if has_checksum else 0)


class Encoder:
    """Encodes chunks (one encoder per worker thread).

    A coded result is the caller's to keep (its bytes are written once: by zstd itself, or
    into an exact-size buffer for split16), so no one copies it again on its way out.
    """

    def __init__(
        self,
        level: int = 1,
        min_saving: float = MIN_SAVING,
        high_params: zstd.ZstdCompressionParameters = HIGH_PLANE_PARAMS,
    ) -> None:
        """``level``: zstd level of CODEC_ZSTD; ``high_params``: split16's high-plane zstd
        (any parameters decode the same; tools/bench_codecs.py compares against level 1)."""
        self.min_saving = min_saving
        self._zstd = zstd.ZstdCompressor(
            level=level, write_checksum=False, write_content_size=True, write_dict_id=False
        )
        self._high_zstd = zstd.ZstdCompressor(compression_params=high_params)
        self._high = np.empty(0, np.uint8)

    def encode(self, data: memoryview | bytes | bytearray, codec: int) -> tuple[int, memoryview]:
        """(codec actually used, wire bytes). Falls back to raw (``data`` itself)."""
        if codec not in CODEC_NAMES:
            raise ValueError(f"unknown codec {codec}")
        src = _bytes_view(data)
        limit = max_coded_length(len(src), self.min_saving)
        wire: memoryview | None = None
        if codec == CODEC_ZSTD and limit > 0:
            wire = self._encode_zstd(src, limit)
        elif codec == CODEC_SPLIT16 and limit > 0:
            wire = self._encode_split16(src, limit)
        return (CODEC_RAW, src) if wire is None else (codec, wire)

    def _encode_zstd(self, src: memoryview, limit: int) -> memoryview | None:
        frame = self._zstd.compress(src)
        return None if len(frame) > limit else memoryview(frame)

    def _encode_split16(self, src: memoryview, limit: int) -> memoryview | None:
        n = len(src)
        m, tail = divmod(n, 2)
        if len(self._high) < m:
            self._high = np.empty(m, np.uint8)
        high = self._high[:m]
        vals = split.values(src, m)
        split.split_high(vals, high)
        frame = self._high_zstd.compress(high.data)
        hi_len = len(frame)
        total = split.HEADER_SIZE + hi_len + m + tail
        if total > limit:  # decided before the low plane is touched
            return None
        out = np.empty(total, np.uint8)
        split.HEADER.pack_into(out.data, 0, split.CODER_ZSTD, 0, 0, hi_len)
        low_at = split.HEADER_SIZE + hi_len
        out[split.HEADER_SIZE : low_at] = np.frombuffer(frame, np.uint8)
        split.split_low(vals, out[low_at : low_at + m])
        if tail:
            out[total - 1] = src[n - 1]
        return out.data


class Decoder:
    """Decodes chunks straight into a caller's buffer and verifies their xxh3 checksum.

    One per worker thread. Every fault in the wire bytes surfaces as
    :class:`~kvship.protocol.ProtocolError`; after one, ``out`` holds garbage and the
    caller must not publish (store) it.
    """

    def __init__(self) -> None:
        self._dctx = zstd.ZstdDecompressor(max_window_size=MAX_WINDOW)
        self._high = np.empty(0, np.uint8)

    def decode(
        self,
        codec: int,
        wire: memoryview | bytes | bytearray,
        raw_length: int,
        checksum: int,
        out: memoryview | bytearray,
    ) -> None:
        """Write exactly ``raw_length`` bytes into ``out[:raw_length]`` and verify them."""
        dst = _bytes_view(out)
        if dst.readonly or len(dst) < raw_length:
            raise ValueError(f"out must be a writable buffer of at least {raw_length} B")
        dst = dst[:raw_length]
        src = _bytes_view(wire)
        if codec == CODEC_RAW:
            if len(src) != raw_length:
                raise _malformed(f"raw chunk of {len(src)} B, raw_length is {raw_length}")
            dst[:] = src
        elif codec not in (CODEC_ZSTD, CODEC_SPLIT16):
            raise ProtocolError(ErrorCode.UNSUPPORTED_CODEC, f"chunk codec {codec}")
        elif not 0 < len(src) < raw_length:
            raise _malformed(f"{CODEC_NAMES[codec]} chunk of {len(src)} B for {raw_length} B")
        elif codec == CODEC_ZSTD:
            self._unzstd(src, dst)
        else:
            self._unsplit16(src, dst)
        if xxhash.xxh3_64_intdigest(dst) != checksum:
            raise ProtocolError(ErrorCode.CHECKSUM_MISMATCH, "chunk bytes do not match xxh3-64")

    def _unzstd(self, src: memoryview, dst: memoryview) -> None:
        """Exactly one zstd frame whose content is exactly ``len(dst)`` bytes, into dst."""
        try:
            if zstd.frame_content_size(src) != len(dst):
                raise _malformed(f"zstd frame content size is not {len(dst)}")
            if _zstd_frame_length(src) != len(src):
                raise _malformed("zstd frame length does not match the chunk")
            reader = self._dctx.stream_reader(src, read_size=len(src), closefd=False)
            got = reader.readinto(dst) if len(dst) else 0
        except zstd.ZstdError as exc:
            raise _malformed(f"zstd: {exc}") from exc
        if got != len(dst):
            raise _malformed(f"zstd frame gave {got} B, expected {len(dst)}")

    def _unsplit16(self, src: memoryview, dst: memoryview) -> None:
        n = len(dst)
        m, tail = divmod(n, 2)
        if len(src) < split.HEADER_SIZE:
            raise _malformed("split16 chunk shorter than its header")
        coder, reserved8, reserved16, hi_len = split.HEADER.unpack_from(src)
        if coder != split.CODER_ZSTD or reserved8 or reserved16:
            raise _malformed(f"split16 header coder {coder}, reserved {reserved8}/{reserved16}")
        low_at = split.HEADER_SIZE + hi_len
        if len(src) != low_at + m + tail:
            raise _malformed(f"split16 chunk of {len(src)} B, header says {low_at + m + tail}")
        if len(self._high) < m:
            self._high = np.empty(m, np.uint8)
        high = self._high[:m]
        self._unzstd(src[split.HEADER_SIZE : low_at], high.data)
        low = np.frombuffer(src, np.uint8, count=m, offset=low_at)
        split.join(high, low, split.values(dst, m))
        if tail:
            dst[n - 1] = src[len(src) - 1]
