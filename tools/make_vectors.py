#!/usr/bin/env python3
"""Generate the kvship protocol v1 golden vectors in protocol/vectors/ (see protocol/SPEC.md).

The vectors come from the Python codec itself, so they are regenerated, never hand-edited:

    python tools/make_vectors.py            # (re)write protocol/vectors/*.json
    python tools/make_vectors.py --check    # exit 1 if the committed files differ

Each file holds one case: ``name``, ``kind`` (frame | stream | digest | error), ``hex`` and
``fields``; ``tests/test_protocol_vectors.py`` checks the committed files both ways.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from kvship.protocol import (
    CAP_SHM,
    CAP_STRIPING,
    FLAG_IGNORABLE,
    MAGIC,
    ROLE_ENGINE,
    ROLE_PEER,
    Abort,
    Chunk,
    ChunkMeta,
    Complete,
    Credit,
    End,
    ErrorCode,
    FrameType,
    GoAway,
    Have,
    Hello,
    HelloAck,
    LayerReady,
    LayerSpec,
    Limits,
    Open,
    Ping,
    Pong,
    Release,
    ShmAttach,
    ShmAttached,
    ShmChunk,
    Subscribe,
    chunk_checksum,
    digest_of_checksums,
    frame_header,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "protocol" / "vectors"

TYPE_NAMES = {
    value: name for name, value in vars(FrameType).items() if name.isupper() and name[0] != "_"
}


def to_fields(value: Any) -> Any:
    """A frame (or part of one) as JSON: dataclass -> object, bytes -> hex, tuple -> list."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_fields(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, tuple | list):
        return [to_fields(v) for v in value]
    if isinstance(value, dict):
        return {k: to_fields(v) for k, v in value.items()}
    return value


def frame_case(name: str, frame: Any, description: str) -> dict[str, Any]:
    fields = to_fields(frame)
    if isinstance(frame, Open):  # on the wire, derived from the layers: listed for readers
        fields["total_bytes"] = frame.total_bytes
        fields["n_chunks"] = frame.n_chunks
    return {
        "name": name,
        "kind": "frame",
        "type": TYPE_NAMES[frame.TYPE],
        "description": description,
        "hex": frame.encode().hex(),
        "fields": fields,
    }


def limits_fields(limits: Limits) -> dict[str, int]:
    return {f.name: getattr(limits, f.name) for f in dataclasses.fields(limits)}


def error_case(
    name: str,
    stream: bytes,
    code: ErrorCode,
    description: str,
    *,
    limits: Limits | None = None,
    eof: bool = False,
) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "error",
        "description": description,
        "hex": stream.hex(),
        "fields": {"limits": limits_fields(limits or Limits()), "eof": eof},
        "expect_error": code.name,
    }


# ------------------------------------------------------------------------ the cases
DATA = b"kvship chunk 0\n"  # 15 bytes: the CHUNK example's payload
LAYERS = (
    LayerSpec("bfloat16", (2, 4, 2), 16),
    LayerSpec("float32", (3,), 12),
)
HELLO_PEER = Hello(ROLE_PEER, "prefill-a", capabilities=CAP_SHM | CAP_STRIPING)
TID = 0x0123456789ABCDEF


def frames() -> list[dict[str, Any]]:
    chunk_meta = ChunkMeta(TID, 0, 0, 0, len(DATA), chunk_checksum(DATA))
    shm_meta = ChunkMeta(TID, 3, 1, 0, 8, chunk_checksum(bytes(range(8))))
    return [
        frame_case(
            "hello_engine",
            Hello(ROLE_ENGINE, "engine-7", capabilities=CAP_SHM),
            "HELLO from an engine on the local API, offering CAP_SHM, no auth",
        ),
        frame_case(
            "hello_ack",
            HelloAck(1, CAP_STRIPING, 16 * 2**20, 16 * 2**20 + 64, 4 * 2**20, 64, "decode-b"),
            "HELLO_ACK: version 1, the capability intersection, the acceptor's limits",
        ),
        frame_case(
            "open_striped",
            Open(
                TID,
                "req-42",
                LAYERS,
                8,
                token_ids=(1, 2, 65536, 2**32 - 1),
                n_stripes=2,
                stripe=1,
                priority=3,
                extra={"model": "toy"},
            ),
            "OPEN of stripe 1 of 2: two layers of 16 and 12 bytes, chunk_size 8 -> 2+2 chunks",
        ),
        frame_case(
            "open_engine_put",
            Open(7, "req-43", (LayerSpec("uint8", (15,), 15),), 15, peer="decode-b:7100"),
            "OPEN from an engine: meta.peer names the destination daemon",
        ),
        frame_case(
            "chunk",
            Chunk(chunk_meta, DATA),
            "CHUNK 0 (layer 0, offset 0) of 15 raw bytes with its xxh3-64",
        ),
        frame_case(
            "end",
            End(TID, 2, digest_of_checksums([1, 2, 3, 4])),
            "END: 2 chunks went on this stripe; the digest of the whole transfer",
        ),
        frame_case(
            "complete",
            Complete(TID, 28, digest_of_checksums([1, 2, 3, 4])),
            "COMPLETE: the receiver verified all 28 bytes and the digest",
        ),
        frame_case("credit", Credit(1 << 20), "CREDIT: 1 MiB more chunk data"),
        frame_case(
            "abort",
            Abort(TID, ErrorCode.CHECKSUM_MISMATCH, "chunk 3"),
            "ABORT of one transfer with CHECKSUM_MISMATCH",
        ),
        frame_case("ping", Ping(0xDEADBEEF), "PING with an opaque value"),
        frame_case("pong", Pong(0xDEADBEEF), "PONG echoes the PING's opaque value"),
        frame_case(
            "goaway",
            GoAway(ErrorCode.SHUTTING_DOWN, "draining"),
            "GOAWAY: the sender closes the connection after this frame",
        ),
        frame_case(
            "have",
            Have(0x0123456789ABCDEF, 115, True),
            "HAVE: the receiver holds the first 115 blocks and the exact linear states",
        ),
        frame_case(
            "subscribe",
            Subscribe("req-42", 5000),
            "SUBSCRIBE: an engine waits up to 5 s for a request's KV",
        ),
        frame_case(
            "shm_attach",
            ShmAttach(1 << 26, "/dev/shm/kvship-engine-7"),
            "SHM_ATTACH: a 64 MiB arena under /dev/shm",
        ),
        frame_case("shm_attached", ShmAttached(1 << 26), "SHM_ATTACHED: the daemon mapped it"),
        frame_case(
            "shm_chunk",
            ShmChunk(shm_meta, 4096),
            "SHM_CHUNK: chunk 3 (layer 1, offset 0, 8 bytes) lies in the arena at 4096",
        ),
        frame_case(
            "layer_ready",
            LayerReady(TID, 1, 8192, 12),
            "LAYER_READY: layer 1 (12 bytes) lies verified in the arena at 8192",
        ),
        frame_case("release", Release(4096, 8), "RELEASE: arena bytes 4096..4104 are free again"),
    ]


def streams() -> list[dict[str, Any]]:
    ignorable = frame_header(0x0C, 4, FLAG_IGNORABLE) + b"\x00\x01\x02\x03"
    return [
        {
            "name": "handshake",
            "kind": "stream",
            "description": "What the connecting side sends first: MAGIC then HELLO",
            "hex": (MAGIC + HELLO_PEER.encode()).hex(),
            "fields": {"events": [{"type": "HELLO", "fields": to_fields(HELLO_PEER)}]},
        },
        {
            "name": "ignorable_unknown_frame",
            "kind": "stream",
            "description": "After the handshake, an unknown type 0x0C with FLAG_IGNORABLE is "
            "skipped; the PING after it is decoded",
            "hex": (MAGIC + HELLO_PEER.encode() + ignorable + Ping(1).encode()).hex(),
            "fields": {
                "events": [
                    {"type": "HELLO", "fields": to_fields(HELLO_PEER)},
                    {"type": "PING", "fields": to_fields(Ping(1))},
                ]
            },
        },
    ]


def digests() -> list[dict[str, Any]]:
    chunks = [b"layer0-chunk0", b"layer0-chunk1", b"", b"\x00" * 8]
    sums = [chunk_checksum(c) for c in chunks]
    raw = b"".join(s.to_bytes(8, "big") for s in sums)
    return [
        {
            "name": "transfer_digest",
            "kind": "digest",
            "description": "Chunk checksums are xxh3-64 (seed 0); the digest is xxh3-64 of "
            "the checksums as u64 big-endian in chunk-index order (hex = that input)",
            "hex": raw.hex(),
            "fields": {
                "chunks": [c.hex() for c in chunks],
                "checksums": sums,
                "digest": digest_of_checksums(sums),
            },
        }
    ]


def errors() -> list[dict[str, Any]]:
    hello = MAGIC + HELLO_PEER.encode()
    open_body = Open(1, "r", (LayerSpec("uint8", (16,), 16),), 8).encode()[8:]
    open_fixed = open_body[:36]
    good = ChunkMeta(1, 0, 0, 0, 8, chunk_checksum(b"\x00" * 8))
    small = Limits(max_frame=1024 + 64, max_chunk=1024, max_transfers=1, initial_window=8)
    return [
        error_case(
            "bad_magic",
            b"GET / HT",  # an HTTP client: 8 bytes decide
            ErrorCode.BAD_MAGIC,
            "The first 8 bytes are not MAGIC (checked once all 8 are in)",
        ),
        error_case(
            "oversized_handshake_frame",
            MAGIC + frame_header(FrameType.HELLO, 65537),
            ErrorCode.FRAME_TOO_LARGE,
            "Before the handshake no body may exceed 65536 bytes (checked on the header)",
        ),
        error_case(
            "oversized_frame",
            hello + frame_header(FrameType.PING, 1024 + 65),
            ErrorCode.FRAME_TOO_LARGE,
            "After the handshake no body may exceed the acceptor's max_frame",
            limits=small,
        ),
        error_case(
            "unknown_frame",
            hello + frame_header(0x0C, 4) + b"\x00\x01\x02\x03",
            ErrorCode.UNKNOWN_FRAME,
            "An unknown frame type without FLAG_IGNORABLE",
        ),
        error_case(
            "truncated_body",
            hello + frame_header(FrameType.PING, 4) + b"\x00\x00\x00\x01",
            ErrorCode.MALFORMED_FRAME,
            "A PING body of 4 bytes (it must be 8)",
        ),
        error_case(
            "truncated_stream",
            hello + Ping(1).encode()[:12],
            ErrorCode.MALFORMED_FRAME,
            "The stream ends (EOF) inside a frame",
            eof=True,
        ),
        error_case(
            "malformed_open_meta",
            hello + frame_header(FrameType.OPEN, 36 + 8) + open_fixed + b"not json",
            ErrorCode.MALFORMED_FRAME,
            "OPEN whose meta is not a JSON object",
        ),
        error_case(
            "unsupported_version",
            MAGIC + Hello(ROLE_PEER, "future", min_version=2, max_version=3).encode(),
            ErrorCode.UNSUPPORTED_VERSION,
            "HELLO offering versions 2..3 only",
        ),
        error_case(
            "chunk_before_open",
            hello + Chunk(good, b"\x00" * 8).encode(),
            ErrorCode.UNKNOWN_TRANSFER,
            "CHUNK for a transfer that was never opened on this connection",
        ),
        error_case(
            "chunk_layout_mismatch",
            hello
            + frame_header(FrameType.OPEN, len(open_body))
            + open_body
            + Chunk(ChunkMeta(1, 1, 0, 4, 8, 0), b"\x00" * 8).encode(),
            ErrorCode.LAYOUT_MISMATCH,
            "Chunk 1 of a 16-byte layer cut in 8-byte chunks must sit at offset 8, not 4",
        ),
        error_case(
            "chunk_flow_control",
            hello
            + frame_header(FrameType.OPEN, len(open_body))
            + open_body
            + Chunk(good, b"\x00" * 8).encode()
            + Chunk(ChunkMeta(1, 1, 0, 8, 8, good.checksum), b"\x00" * 8).encode(),
            ErrorCode.FLOW_CONTROL,
            "initial_window 8: the second 8-byte chunk exceeds the credit",
            limits=small,
        ),
    ]


def build() -> dict[str, dict[str, Any]]:
    """Every case by file name; the order of keys inside each case is fixed."""
    cases = frames() + streams() + digests() + errors()
    names = [case["name"] for case in cases]
    assert len(set(names)) == len(names), "duplicate vector names"
    return {f"{case['name']}.json": case for case in cases}


def render(case: dict[str, Any]) -> str:
    return json.dumps(case, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="vector folder")
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args(argv)
    wanted = {name: render(case) for name, case in build().items()}
    present = {p.name: p.read_text() for p in args.out.glob("*.json")} if args.out.exists() else {}
    if args.check:
        stale = sorted(n for n in wanted.keys() | present.keys() if wanted.get(n) != present.get(n))
        for name in stale:
            print(f"differs: {name}", file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name in present.keys() - wanted.keys():
        (args.out / name).unlink()
    for name, text in wanted.items():
        if present.get(name) != text:
            (args.out / name).write_text(text)
    print(f"{len(wanted)} vectors in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
