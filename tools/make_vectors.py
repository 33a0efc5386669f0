#!/usr/bin/env python3
"""Generate the kvship protocol v1 golden vectors in protocol/vectors/ (see protocol/SPEC.md).

The vectors come from the Python codec itself, so they are regenerated, never hand-edited:

    python tools/make_vectors.py            # (re)write protocol/vectors/*.json
    python tools/make_vectors.py --check    # exit 1 if the committed files differ

Each file holds one case: ``name``, ``kind`` (frame | stream | digest | dedup | error),
``hex`` and ``fields`` (SPEC.md §14); ``tests/test_protocol_vectors.py`` checks the committed
files both ways. Coded CHUNK vectors come from the reference encoder (python-zstandard's
libzstd): another zstd may encode the same bytes differently, and every valid encoding
decodes to the same ``raw``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from kvship.layout.dedup import Manifest, skipped_chunks
from kvship.layout.model import FullAttention, LinearState, ModelLayout
from kvship.layout.prefix import PREFIX_SEED, block_keys, full_prefix_key, namespace, root_key
from kvship.payload import Encoder
from kvship.protocol import (
    CAP_AUTH,
    CAP_CODECS,
    CAP_SHM,
    CAP_STRIPING,
    CODEC_SPLIT16,
    CODEC_ZSTD,
    FLAG_IGNORABLE,
    MAGIC,
    ROLE_ENGINE,
    ROLE_PEER,
    Abort,
    AuthChallenge,
    AuthProof,
    Chunk,
    ChunkMeta,
    Complete,
    Connection,
    Credit,
    End,
    ErrorCode,
    FrameType,
    GoAway,
    Have,
    Hello,
    HelloAck,
    Hold,
    LayerReady,
    LayerSpec,
    Limits,
    Open,
    Ping,
    Pong,
    Release,
    Role,
    ShmAttach,
    ShmAttached,
    ShmChunk,
    Skip,
    Subscribe,
    chunk_checksum,
    chunk_table,
    digest_of_checksums,
    frame_header,
)
from kvship.protocol.auth import PeerKey

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


def frame_case(
    name: str, frame: Any, description: str, *, raw: bytes | None = None
) -> dict[str, Any]:
    fields = to_fields(frame)
    if isinstance(frame, Open):  # on the wire, derived from the layers: listed for readers
        fields["total_bytes"] = frame.total_bytes
        fields["n_chunks"] = frame.n_chunks
    if isinstance(frame, Have):  # a u8 on the wire (0/1), not a JSON boolean
        fields["states"] = int(frame.states)
    if isinstance(frame, Hold):  # likewise
        fields["hold"] = int(frame.hold)
    if isinstance(frame, ShmChunk):  # on the wire, always equal to raw_length
        fields["wire_length"] = frame.meta.raw_length
    if raw is not None:  # a coded CHUNK: the bytes its data decodes to
        fields["raw"] = raw.hex()
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
    accept: bool = True,
) -> dict[str, Any]:
    fields: dict[str, Any] = {"limits": limits_fields(limits or Limits()), "eof": eof}
    if not accept:
        fields["accept"] = False
    return {
        "name": name,
        "kind": "error",
        "description": description,
        "hex": stream.hex(),
        "fields": fields,
        "expect_error": code.name,
    }


# ------------------------------------------------------------------------ the cases
DATA = b"kvship chunk 0\n"  # 15 bytes: the CHUNK example's payload
LAYERS = (
    LayerSpec("bfloat16", (2, 4, 2), 16),
    LayerSpec("float32", (3,), 12),
)
HELLO_PEER = Hello(ROLE_PEER, "prefill-a", capabilities=CAP_SHM | CAP_STRIPING)
HELLO_CODECS = Hello(ROLE_PEER, "prefill-a", capabilities=CAP_STRIPING | CAP_CODECS)
TID = 0x0123456789ABCDEF

# Coded chunks (SPEC §5.4.1): text for zstd; for split16, 256 bf16-like values (4 exponent
# bytes, noisy mantissas from a fixed LCG) and an odd tail byte, so every part is there.
ZSTD_RAW = (b"kvship zstd chunk: layer 0, block 0. " * 8)[:256]


def split16_raw() -> bytes:
    out = bytearray()
    x = 12345
    exponents = (0x3E, 0x3F, 0xBE, 0xBF)
    for _ in range(256):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out += bytes(((x >> 8) & 0xFF, exponents[(x >> 20) & 3]))  # little-endian value
    return bytes(out) + b"\x7f"


def coded(raw: bytes, codec: int) -> bytes:
    used, wire = Encoder().encode(raw, codec)
    assert used == codec, f"codec {codec} did not shrink the vector's bytes"
    return bytes(wire)


def coded_chunk(codec: int, raw: bytes) -> Chunk:
    return Chunk(ChunkMeta(TID, 0, 0, 0, len(raw), chunk_checksum(raw), codec), coded(raw, codec))


# Prefix dedup (SPEC §7.6): a tiny hybrid model. A GQA layer and an MLA layer of 32-byte
# blocks (4 tokens), two equal linear layers (a run: "repeat": 2) of 42-byte states. The
# manifest's tp_rank (1) differs from the model's own (0) on purpose: the manifest's counts.
DEDUP_MODEL = ModelLayout(
    "tiny-hybrid",
    "org/tiny-hybrid",
    (
        FullAttention(4, kv_heads=1, head_dim=2, dtype="bfloat16"),
        LinearState(((4, 4), (5,)), "bfloat16"),
        LinearState(((4, 4), (5,)), "bfloat16"),
        FullAttention(4, kv_heads=1, head_dim=4, dtype="bfloat16", mla_latent_dim=3, rope_dim=1),
    ),
    tp_rank=0,
)
DEDUP_TP_RANK = 1
DEDUP_TOKENS = (1, 2, 3, 65536, 4294967295, 7, 8, 9, 10, 11)  # 2 full blocks + 2 tail tokens
DEDUP_CHUNK = 32
DEDUP_LAYERS = (
    LayerSpec("bfloat16", (3, 4, 2, 1, 2), 96),  # 3 blocks x 4 tokens x (K, V) x 1 head x 2
    LayerSpec("bfloat16", (21,), 42),
    LayerSpec("bfloat16", (21,), 42),
    LayerSpec("bfloat16", (3, 4, 4), 96),  # 3 blocks x 4 tokens x (latent 3 + rope 1)
)
DEDUP_TID = 0x5EED0000000000D1


def dedup_manifest() -> Manifest:
    return Manifest(
        DEDUP_MODEL, DEDUP_TP_RANK, tuple(block_keys(DEDUP_TOKENS, DEDUP_MODEL, DEDUP_TP_RANK))
    )


def dedup_open() -> Open:
    return Open(
        DEDUP_TID,
        "req-dedup",
        DEDUP_LAYERS,
        DEDUP_CHUNK,
        token_ids=DEDUP_TOKENS,
        extra={"dedup": dedup_manifest().to_extra()},
    )


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
            "auth_challenge",
            AuthChallenge(bytes(range(32)), bytes(range(32, 64))),
            "AUTH_CHALLENGE: the acceptor's 32-byte nonce and its 32-byte MAC (SPEC §6.4)",
        ),
        frame_case(
            "auth_proof",
            AuthProof(bytes(range(64, 96))),
            "AUTH_PROOF: the initiator's 32-byte MAC (SPEC §6.4)",
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
            "hold",
            Hold(0x0123456789ABCDEF, True),
            "HOLD: the receiver asks the sender to stop sending this transfer's chunks",
        ),
        frame_case(
            "skip",
            Skip(0x0123456789ABCDEF, (3, 4, 5)),
            "SKIP: the daemon tells its engine that chunks 3-5 of its put need not be staged",
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
        frame_case(
            "chunk_zstd",
            coded_chunk(CODEC_ZSTD, ZSTD_RAW),
            "CHUNK with codec 1 (zstd): data is one zstd frame whose content (fields.raw, "
            "256 bytes) the checksum covers",
            raw=ZSTD_RAW,
        ),
        frame_case(
            "chunk_split16",
            coded_chunk(CODEC_SPLIT16, split16_raw()),
            "CHUNK with codec 2 (split16) of 513 raw bytes: 8-byte header, the high plane "
            "(256 bytes) as one zstd frame, the 256-byte low plane, the odd tail byte",
            raw=split16_raw(),
        ),
        frame_case(
            "open_dedup",
            dedup_open(),
            "OPEN carrying a dedup manifest in extra.dedup (the model of dedup_tiny_hybrid, "
            "tp_rank 1, the 2 full blocks' keys of its 10 token ids)",
        ),
    ]


def streams() -> list[dict[str, Any]]:
    ignorable = frame_header(0x30, 4, FLAG_IGNORABLE) + b"\x00\x01\x02\x03"
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
            "description": "After the handshake, an unknown type 0x30 with FLAG_IGNORABLE is "
            "skipped; the PING after it is decoded",
            "hex": (MAGIC + HELLO_PEER.encode() + ignorable + Ping(1).encode()).hex(),
            "fields": {
                "events": [
                    {"type": "HELLO", "fields": to_fields(HELLO_PEER)},
                    {"type": "PING", "fields": to_fields(Ping(1))},
                ]
            },
        },
        {
            "name": "ping_before_hello_ack",
            "kind": "stream",
            "description": "An initiator may pipeline a PING right after its HELLO: the "
            "acceptor has not answered the HELLO yet (accept false) and takes the PING",
            "hex": (MAGIC + HELLO_PEER.encode() + Ping(7).encode()).hex(),
            "fields": {
                "events": [
                    {"type": "HELLO", "fields": to_fields(HELLO_PEER)},
                    {"type": "PING", "fields": to_fields(Ping(7))},
                ],
                "accept": False,
            },
        },
    ]


AUTH_SECRET = bytes(range(0x40, 0x60))  # 32 bytes
AUTH_NONCE_I = bytes(range(0x00, 0x20))
AUTH_NONCE_A = bytes(range(0x80, 0xA0))


def auths() -> list[dict[str, Any]]:
    """One whole pre-shared-key handshake (SPEC §6.4) with fixed nonces."""
    key = PeerKey("cluster-1", AUTH_SECRET)
    initiator = Connection(
        role=Role.PEER, initiator=True, key=key, random_bytes=lambda n: AUTH_NONCE_I[:n]
    )
    acceptor = Connection(
        role=Role.PEER,
        initiator=False,
        keys={key.key_id: key.secret},
        random_bytes=lambda n: AUTH_NONCE_A[:n],
    )
    hello = initiator.initiate(Hello(ROLE_PEER, "prefill-a", capabilities=CAP_STRIPING))
    acceptor.receive_data(hello)
    challenge = acceptor.accept("decode-b", CAP_STRIPING)
    initiator.receive_data(challenge)
    proof = initiator.prove()
    acceptor.receive_data(proof)
    ack = acceptor.accept()
    initiator.receive_data(ack)
    assert initiator.authenticated_key == acceptor.authenticated_key == key.key_id
    assert initiator.negotiated.capabilities == CAP_STRIPING | CAP_AUTH
    return [
        {
            "name": "auth_psk",
            "kind": "auth",
            "description": "A pre-shared-key handshake (SPEC §6.4): hex is what the initiator "
            "sends (MAGIC, HELLO, AUTH_PROOF); the fields give the key, both nonces, each "
            "message and both MACs",
            "hex": (hello + proof).hex(),
            "fields": {
                "key_id": key.key_id,
                "secret": AUTH_SECRET.hex(),
                "nonce_i": AUTH_NONCE_I.hex(),
                "nonce_a": AUTH_NONCE_A.hex(),
                "hello": hello[len(MAGIC) :].hex(),
                "challenge": challenge.hex(),
                "proof": proof.hex(),
                "hello_ack": ack.hex(),
                "mac_a": challenge[8 + 32 :].hex(),
                "mac_i": proof[8:].hex(),
            },
        }
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


def dedups() -> list[dict[str, Any]]:
    manifest = dedup_manifest()
    layout, rank, tokens = DEDUP_MODEL, DEDUP_TP_RANK, DEDUP_TOKENS
    ns = namespace(layout, rank)
    root = root_key(ns)
    keys = list(manifest.keys)
    bt = layout.block_tokens
    n_full = len(tokens) // bt
    raw = b"".join(t.to_bytes(4, "little") for t in tokens)
    inputs, prev = [], root
    for i, key in enumerate(keys):
        inputs.append(prev + raw[4 * bt * i : 4 * bt * (i + 1)])
        prev = key
    state_input = prev + b"S" + raw[4 * bt * n_full :]
    state_key = full_prefix_key(tokens, layout, rank)
    n_blocks = -(-len(tokens) // bt)
    layers = []
    for kind, spec in zip(layout.layers, DEDUP_LAYERS, strict=True):
        if isinstance(kind, FullAttention):
            layers.append(
                {
                    "kind": "full",
                    "block_bytes": kind.block_bytes,
                    "nbytes": n_blocks * kind.block_bytes,
                }
            )
        else:
            layers.append(
                {"kind": "linear", "state_bytes": kind.state_bytes, "nbytes": kind.state_bytes}
            )
        assert layers[-1]["nbytes"] == spec.nbytes
    manifest.check(DEDUP_LAYERS, len(tokens), DEDUP_CHUNK)
    skips = []
    for blocks, states in ((2, 1), (1, 0), (0, 1), (0, 0)):
        skip = skipped_chunks(layout, DEDUP_LAYERS, DEDUP_CHUNK, blocks, bool(states))
        skips.append(
            {
                "blocks": blocks,
                "states": states,
                "skipped": sorted(i for c in skip.values() for i in c),
            }
        )
    return [
        {
            "name": "dedup_tiny_hybrid",
            "kind": "dedup",
            "description": "The prefix key chain of a tiny hybrid model (xxh3-128, seed "
            f"{PREFIX_SEED:#x}): hex = the namespace bytes (the root's input); the block "
            "geometry, the OPEN extra.dedup manifest (frame open_dedup) and which chunks "
            "each HAVE answer skips",
            "hex": ns.hex(),
            "fields": {
                "manifest": manifest.to_extra(),
                "token_ids": list(tokens),
                "namespace": ns.decode(),
                "root": root.hex(),
                "key_inputs": [b.hex() for b in inputs],
                "keys": [k.hex() for k in keys],
                "full_prefix_input": state_input.hex(),
                "full_prefix_key": state_key.hex(),
                "layers": layers,
                "chunk_size": DEDUP_CHUNK,
                "chunk_starts": chunk_table(DEDUP_LAYERS, DEDUP_CHUNK),
                "open": "open_dedup",
                "skips": skips,
            },
        }
    ]


def errors() -> list[dict[str, Any]]:
    hello = MAGIC + HELLO_PEER.encode()
    open_body = Open(1, "r", (LayerSpec("uint8", (16,), 16),), 8).encode()[8:]
    open_fixed = open_body[:36]
    good = ChunkMeta(1, 0, 0, 0, 8, chunk_checksum(b"\x00" * 8))
    small = Limits(max_frame=1024 + 64, max_chunk=8, max_transfers=1, initial_window=8)
    hello_codecs = MAGIC + HELLO_CODECS.encode()
    open64 = Open(1, "r", (LayerSpec("uint8", (64,), 64),), 64).encode()
    zraw = ZSTD_RAW[:64]
    zdata = coded(zraw, CODEC_ZSTD)
    zsum = chunk_checksum(zraw)
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
            hello + frame_header(0x30, 4) + b"\x00\x01\x02\x03",
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
            "unknown_auth_method",
            MAGIC + Hello(ROLE_PEER, "prefill-a", auth_method=1, auth=b"token").encode(),
            ErrorCode.AUTH_FAILED,
            "HELLO with auth_method 1: version 1 knows only 0 (none), so GOAWAY AUTH_FAILED",
        ),
        error_case(
            "open_before_hello_ack",
            hello + frame_header(FrameType.OPEN, len(open_body)) + open_body,
            ErrorCode.PROTOCOL_ERROR,
            "Before HELLO_ACK (the acceptor has not answered: accept false) only PING may follow "
            "HELLO",
            accept=False,
        ),
        error_case(
            "subscribe_on_peer",
            hello + Subscribe("req-42", 0).encode(),
            ErrorCode.PROTOCOL_ERROR,
            "SUBSCRIBE (an engine frame) on a peer connection (role rules, SPEC §4.1)",
        ),
        error_case(
            "complete_from_sender",
            hello + Complete(1, 16, 0).encode(),
            ErrorCode.PROTOCOL_ERROR,
            "COMPLETE from a peer connection's initiator, the sender of its transfers (§4.1)",
        ),
        error_case(
            "have_from_sender",
            hello + Have(1, 0, False).encode(),
            ErrorCode.PROTOCOL_ERROR,
            "HAVE from a peer connection's initiator, the sender of its transfers (§4.1)",
        ),
        error_case(
            "layer_ready_from_engine",
            MAGIC + Hello(ROLE_ENGINE, "engine-7").encode() + LayerReady(1, 0, 0, 0).encode(),
            ErrorCode.PROTOCOL_ERROR,
            "LAYER_READY (daemon -> engine only) sent by an engine (§4.1)",
        ),
        error_case(
            "open_names_peer_on_peer",
            hello
            + Open(1, "r", (LayerSpec("uint8", (16,), 16),), 8, peer="decode-b:7100").encode(),
            ErrorCode.PROTOCOL_ERROR,
            "An OPEN naming meta.peer on a peer connection: only an engine's OPEN names one (§4.1)",
        ),
        error_case(
            "shm_chunk_before_attach",
            MAGIC
            + Hello(ROLE_ENGINE, "engine-7", capabilities=CAP_SHM).encode()
            + Open(7, "r", (LayerSpec("uint8", (8,), 8),), 8, peer="decode-b:7100").encode()
            + ShmChunk(ChunkMeta(7, 0, 0, 0, 8, chunk_checksum(bytes(8))), 0).encode(),
            ErrorCode.PROTOCOL_ERROR,
            "SHM_CHUNK from an engine that never sent SHM_ATTACH (§4.1, §9.2)",
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
        error_case(
            "chunk_checksum_mismatch",
            hello
            + frame_header(FrameType.OPEN, len(open_body))
            + open_body
            + Chunk(dataclasses.replace(good, checksum=good.checksum ^ 1), b"\x00" * 8).encode(),
            ErrorCode.CHECKSUM_MISMATCH,
            "A raw chunk whose bytes do not match its xxh3-64: the harness's checksum step "
            "(the application's check, SPEC §14) fails it",
        ),
        error_case(
            "chunk_zstd_checksum_mismatch",
            hello_codecs
            + open64
            + Chunk(ChunkMeta(1, 0, 0, 0, 64, zsum ^ 1, CODEC_ZSTD), zdata).encode(),
            ErrorCode.CHECKSUM_MISMATCH,
            "A zstd chunk that decodes, but not to bytes matching its checksum",
        ),
        error_case(
            "chunk_zstd_corrupt",
            hello_codecs
            + open64
            + Chunk(ChunkMeta(1, 0, 0, 0, 64, zsum, CODEC_ZSTD), b"not a zstd frame").encode(),
            ErrorCode.MALFORMED_FRAME,
            "A zstd chunk whose data is not a zstd frame: the codec's error code",
        ),
        error_case(
            "chunk_codec_not_negotiated",
            hello + open64 + Chunk(ChunkMeta(1, 0, 0, 0, 64, zsum, CODEC_ZSTD), zdata).encode(),
            ErrorCode.UNSUPPORTED_CODEC,
            "A zstd chunk on a connection without CAP_CODECS (its HELLO offered none)",
        ),
    ]


def build() -> dict[str, dict[str, Any]]:
    """Every case by file name; the order of keys inside each case is fixed."""
    cases = frames() + streams() + auths() + digests() + dedups() + errors()
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
