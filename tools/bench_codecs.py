#!/usr/bin/env python3
"""Ratio and per-core speed of the chunk codecs on the real KV samples (tests/data/kv).

Each sample file is cut into chunks of its own bytes (the last chunk may be short); a
chunk size larger than a file is filled by tiling whole copies of it, flagged ``tiled``
because a coder that sees the repeat would report a ratio the real data never gives.
Speeds are one thread (one core), the median of ``--repeats`` passes over the file, in GB/s
of raw (uncompressed) bytes; decode includes the xxh3-64 verification.

Rows: ``zstd`` is CODEC_ZSTD, i.e. plain zstd level 1 on the raw bytes: the baseline.
``split16`` is CODEC_SPLIT16 (tuned high-plane zstd). ``shuffle+zstd1`` is the same byte
split with zstd level 1 on the high plane, for comparison (not a codec).

The samples are the repo's own (``tests/data/kv``, made by ``make capture``: documents
``prose`` and ``code``, each in bf16, fp16 and fp8); ``--samples DIR`` takes another folder of
them, or one in the older single-document naming (``smollm2_kv_bf16_as_uint16.npy`` ...).

    python tools/bench_codecs.py [--samples DIR] [--chunk-sizes 262144,1048576] [--repeats 7]
                                 [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xxhash
import zstandard as zstd

from kvship.payload import CODEC_RAW, CODEC_SPLIT16, CODEC_ZSTD, Decoder, Encoder
from kvship.payload import split as split16

SAMPLES = Path(__file__).resolve().parents[1] / "tests" / "data" / "kv"
DTYPE_FILES = (
    ("bf16", "bf16_as_uint16.npy"),
    ("fp16", "fp16.npy"),
    ("fp8", "fp8e4m3_as_uint8.npy"),
)
# (sample, dtype, file name): the repo's two documents (tools/capture_kv.py) ...
FILES = tuple(
    (f"{doc}-{dtype}", dtype, f"{doc}_{suffix}")
    for doc in ("prose", "code")
    for dtype, suffix in DTYPE_FILES
)
# ... or one document in the older naming (a larger capture passed with --samples).
LEGACY_FILES = tuple((dtype, dtype, f"smollm2_kv_{suffix}") for dtype, suffix in DTYPE_FILES)
LEVEL1_HIGH = zstd.ZstdCompressionParameters.from_level(
    1, write_content_size=True, write_checksum=False, write_dict_id=False
)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cut(data: bytes, chunk_size: int) -> tuple[list[memoryview], bool]:
    """Chunks of the file's own bytes; tiled whole copies only if one chunk outgrows it."""
    tiled = chunk_size > len(data)
    if tiled:
        data = (data * (chunk_size // len(data) + 1))[:chunk_size]
    view = memoryview(data)
    return [view[i : i + chunk_size] for i in range(0, len(view), chunk_size)], tiled


def bench_codec(
    chunks: list[memoryview], codec: int, enc: Encoder, repeats: int
) -> dict[str, float | int]:
    dec = Decoder()
    raw_bytes = sum(len(c) for c in chunks)
    coded = []
    for chunk in chunks:
        used, wire = enc.encode(chunk, codec)
        coded.append((used, bytes(wire), len(chunk), xxhash.xxh3_64_intdigest(chunk)))
    wire_bytes = sum(len(w) for _, w, _, _ in coded)
    out = memoryview(bytearray(max(len(c) for c in chunks)))

    def encode_all() -> None:
        for chunk in chunks:
            enc.encode(chunk, codec)

    def decode_all() -> None:
        for used, wire, n, checksum in coded:
            dec.decode(used, wire, n, checksum, out[:n])

    decode_all()  # also proves the round trip: decode verifies every checksum
    return {
        "ratio": round(raw_bytes / wire_bytes, 4),
        "encode_gbps": round(raw_bytes / median_seconds(encode_all, repeats) / 1e9, 3),
        "decode_gbps": round(raw_bytes / median_seconds(decode_all, repeats) / 1e9, 3),
        "chunks": len(chunks),
        "raw_chunks": sum(1 for used, *_ in coded if used == CODEC_RAW),
    }


def bench_transforms(chunks: list[memoryview], repeats: int) -> dict[str, float]:
    """The numpy byte split (both planes) and join alone, into reused buffers."""
    biggest = max(len(c) for c in chunks) // 2
    high, low = np.empty(biggest, np.uint8), np.empty(biggest, np.uint8)
    out = np.empty(biggest, np.dtype("<u2"))
    raw_bytes = sum(len(c) // 2 * 2 for c in chunks)

    def split_all() -> None:
        for chunk in chunks:
            m = len(chunk) // 2
            vals = split16.values(chunk, m)
            split16.split_high(vals, high[:m])
            split16.split_low(vals, low[:m])

    def join_all() -> None:
        for chunk in chunks:
            m = len(chunk) // 2
            split16.join(high[:m], low[:m], out[:m])

    return {
        "split_gbps": round(raw_bytes / median_seconds(split_all, repeats) / 1e9, 2),
        "join_gbps": round(raw_bytes / median_seconds(join_all, repeats) / 1e9, 2),
    }


def sample_files(samples: Path) -> list[tuple[str, str, Path]]:
    """(sample, dtype, path) of the KV files in ``samples``: the repo's names, else the older."""
    for table in (FILES, LEGACY_FILES):
        found = [(name, dtype, samples / f) for name, dtype, f in table if (samples / f).is_file()]
        if found:
            return found
    return []


def run(samples: Path, chunk_sizes: list[int], repeats: int, level: int) -> dict[str, object]:
    rows: list[dict[str, object]] = []
    for name, dtype, path in sample_files(samples):
        data = np.load(path).tobytes()
        two_byte = dtype in ("bf16", "fp16")
        for chunk_size in chunk_sizes:
            chunks, tiled = cut(data, chunk_size)
            base = {"sample": name, "dtype": dtype, "file_bytes": len(data)}
            base["chunk_size"] = chunk_size
            base["tiled"] = tiled
            xxh = median_seconds(lambda c=chunks: [xxhash.xxh3_64_intdigest(x) for x in c], 5)
            base["xxh3_gbps"] = round(sum(map(len, chunks)) / xxh / 1e9, 2)
            cases = [("zstd", CODEC_ZSTD, Encoder(level=level))]
            if two_byte:
                cases.append(("split16", CODEC_SPLIT16, Encoder(level=level)))
                cases.append(
                    ("shuffle+zstd1", CODEC_SPLIT16, Encoder(level=level, high_params=LEVEL1_HIGH))
                )
            for label, codec, enc in cases:
                row = {**base, "codec": label, **bench_codec(chunks, codec, enc, repeats)}
                if label == "split16":
                    row.update(bench_transforms(chunks, repeats))
                rows.append(row)
    return {
        "samples": str(samples),
        "repeats": repeats,
        "zstd_level": level,
        "zstandard": zstd.__version__,
        "zstd_lib": ".".join(map(str, zstd.ZSTD_VERSION)),
        "numpy": np.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores_online": os.cpu_count(),
        "notes": [
            "GB/s = raw bytes per second on one thread (one core), median of repeats",
            "decode includes xxh3-64 verification of the output",
            "zstd row = plain zstd level 1 on raw bytes = the baseline",
            "chunks are the file's own bytes; tiled=true means a chunk was filled by "
            "repeating the file, which can inflate the ratio",
        ],
        "results": rows,
    }


def print_table(report: dict[str, object]) -> None:
    cols = ("sample", "chunk_size", "codec", "ratio", "encode_gbps", "decode_gbps", "raw_chunks")
    print(
        f"{'sample':10} {'chunk':>8} {'codec':14} {'ratio':>7} {'enc GB/s':>9} "
        f"{'dec GB/s':>9} {'raw':>5}  notes"
    )
    for row in report["results"]:  # type: ignore[attr-defined]
        s, cs, codec, ratio, e, d, raw = (row[c] for c in cols)
        notes = [f"{row['raw_chunks']}/{row['chunks']} raw" if raw else ""]
        if "split_gbps" in row:
            notes.append(f"split {row['split_gbps']} join {row['join_gbps']} GB/s")
        if row["tiled"]:
            notes.append("TILED (ratio may be inflated)")
        print(
            f"{s:10} {cs // 1024:>6}Ki {codec:14} {ratio:>6.3f}x {e:>9.2f} {d:>9.2f} "
            f"{raw:>5}  {'; '.join(n for n in notes if n)}"
        )
    print(
        f"(one core, median of {report['repeats']} repeats; decode includes xxh3 check; "
        f"zstandard {report['zstandard']}, libzstd {report['zstd_lib']})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--samples",
        type=Path,
        default=SAMPLES,
        help="folder of KV samples (default: the repo's tests/data/kv; a larger capture in the "
        "older smollm2_kv_*.npy naming, e.g. a shared kv-samples folder, works too)",
    )
    ap.add_argument("--chunk-sizes", default="262144,1048576", help="comma-separated bytes")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--level", type=int, default=1, help="zstd level of the zstd codec")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if not sample_files(args.samples):
        print(f"no KV samples at {args.samples}", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.chunk_sizes.split(",") if s]
    report = run(args.samples, sizes, max(1, args.repeats), args.level)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
