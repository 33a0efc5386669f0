"""Golden vectors in protocol/vectors/: the committed files, checked both ways.

Decoding each ``hex`` must give its ``fields`` and encoding the ``fields`` must give the
``hex``; coded CHUNKs must decode to their ``raw``; stream and error vectors go through the
harness of SPEC §14 (a fresh acceptor plus the application's checksum step); dedup vectors'
keys must follow from their manifest and token ids. The fields are turned into frames and
keys here independently of tools/make_vectors.py, which is only used to check that the
committed files are up to date.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import xxhash

from kvship.layout.dedup import Manifest, skipped_chunks
from kvship.layout.model import FullAttention
from kvship.layout.prefix import PREFIX_SEED, block_keys, full_prefix_key, namespace, root_key
from kvship.payload import Decoder
from kvship.protocol import (
    CAP_STRIPING,
    CODEC_RAW,
    MAGIC,
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
    ProtocolError,
    Release,
    Role,
    ShmAttach,
    ShmAttached,
    ShmChunk,
    Skip,
    State,
    Subscribe,
    TransferDigest,
    chunk_checksum,
    chunk_table,
    digest_of_checksums,
)
from kvship.protocol.auth import PeerKey
from kvship.protocol.frames import DECODERS, HEADER, HEADER_SIZE

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "protocol" / "vectors"
CASES = {p.stem: json.loads(p.read_text()) for p in sorted(VECTORS.glob("*.json"))}

CLASSES: dict[str, type] = {
    "AUTH_CHALLENGE": AuthChallenge,
    "AUTH_PROOF": AuthProof,
    "HELLO": Hello,
    "HELLO_ACK": HelloAck,
    "OPEN": Open,
    "CHUNK": Chunk,
    "END": End,
    "COMPLETE": Complete,
    "CREDIT": Credit,
    "ABORT": Abort,
    "PING": Ping,
    "PONG": Pong,
    "GOAWAY": GoAway,
    "HAVE": Have,
    "HOLD": Hold,
    "SKIP": Skip,
    "SUBSCRIBE": Subscribe,
    "SHM_ATTACH": ShmAttach,
    "SHM_ATTACHED": ShmAttached,
    "SHM_CHUNK": ShmChunk,
    "LAYER_READY": LayerReady,
    "RELEASE": Release,
}


def of_kind(kind: str) -> list[str]:
    return [name for name, case in CASES.items() if case["kind"] == kind]


def from_fields(type_name: str, fields: dict[str, Any]) -> Any:
    """The frame a vector's ``fields`` describe (byte strings are hex in JSON)."""
    f = dict(fields)
    if type_name == "OPEN":
        total, n_chunks = f.pop("total_bytes"), f.pop("n_chunks")
        f["layers"] = tuple(
            LayerSpec(spec["dtype"], tuple(spec["shape"]), spec["nbytes"]) for spec in f["layers"]
        )
        f["token_ids"] = tuple(f["token_ids"])
        frame = Open(**f)
        assert (frame.total_bytes, frame.n_chunks) == (total, n_chunks)
        return frame
    if type_name in ("CHUNK", "SHM_CHUNK"):
        f["meta"] = ChunkMeta(**f["meta"])
    if type_name == "CHUNK":
        f["data"] = bytes.fromhex(f["data"])
        f.pop("raw", None)  # a coded chunk's decoded bytes: test_coded_chunk_vector
    if type_name == "SHM_CHUNK":
        assert f.pop("wire_length") == f["meta"].raw_length
    if type_name == "HAVE":
        assert type(f["states"]) is int and f["states"] in (0, 1)
    if type_name == "HOLD":
        assert type(f["hold"]) is int and f["hold"] in (0, 1)
    if type_name == "SKIP":
        f["chunks"] = tuple(f["chunks"])
    if type_name == "HELLO":
        f["auth"] = bytes.fromhex(f["auth"])
    for name in ("nonce", "mac"):  # AUTH_CHALLENGE, AUTH_PROOF
        if name in f:
            f[name] = bytes.fromhex(f[name])
    return CLASSES[type_name](**f)


def decode_frame(raw: bytes) -> Any:
    """One whole frame, header included, decoded without a connection."""
    length, ftype, _flags, reserved = HEADER.unpack_from(raw)
    assert reserved == 0
    assert len(raw) == HEADER_SIZE + length
    body = memoryview(raw)[HEADER_SIZE:]
    if ftype == FrameType.CHUNK:
        return Chunk(ChunkMeta.unpack(body), bytes(body[ChunkMeta.FIXED.size :]))
    return DECODERS[ftype](body)


def verify_chunk(chunk: Chunk) -> None:
    """The harness's application step (SPEC §14): a CHUNK's data decoded (§5.4.1) and its
    checksum verified (§8); the state machine leaves both to its user."""
    meta = chunk.meta
    if meta.codec == CODEC_RAW:
        if chunk_checksum(chunk.data) != meta.checksum:
            raise ProtocolError(ErrorCode.CHECKSUM_MISMATCH, f"chunk {meta.chunk_index}")
        return
    out = bytearray(meta.raw_length)
    Decoder().decode(meta.codec, chunk.data, meta.raw_length, meta.checksum, out)


def feed_acceptor(
    stream: bytes, limits: Limits, eof: bool = False, accept: bool = True
) -> tuple[Connection, list]:
    """The vector harness (SPEC §14): a fresh acceptor that answers HELLO at once (unless
    ``accept`` is False: then it never answers during the case), chunks verified."""
    conn = Connection(initiator=False, limits=limits)
    events: list[Any] = []
    pos = 0
    while pos < len(stream) and conn.state in (State.AWAIT_PREFACE, State.AWAIT_HELLO):
        events += conn.receive_data(stream[pos : pos + 1])
        pos += 1
    if conn.state is State.AWAIT_ACCEPT and accept:
        conn.accept("vectors")
    events += conn.receive_data(stream[pos:])
    if eof:
        conn.receive_eof()
    for event in events:
        if isinstance(event, Chunk):
            verify_chunk(event)
    return conn, events


def test_vectors_present() -> None:
    frame_types = {CASES[name]["type"] for name in of_kind("frame")}
    assert frame_types == set(CLASSES)
    errors = {CASES[name]["expect_error"] for name in of_kind("error")}
    assert {
        "BAD_MAGIC",
        "FRAME_TOO_LARGE",
        "UNKNOWN_FRAME",
        "MALFORMED_FRAME",
        "UNSUPPORTED_VERSION",
        "CHECKSUM_MISMATCH",
        "UNSUPPORTED_CODEC",
    } <= errors
    codecs = {
        CASES[n]["fields"]["meta"]["codec"] for n in of_kind("frame") if "raw" in CASES[n]["fields"]
    }
    assert codecs == {1, 2}
    assert of_kind("dedup")
    assert "malformed_open_meta" in CASES
    for name, case in CASES.items():
        assert case["name"] == name
        assert {"name", "kind", "hex", "fields"} <= case.keys()
        assert case["kind"] in ("frame", "stream", "auth", "digest", "dedup", "error")


@pytest.mark.parametrize("name", of_kind("frame"))
def test_frame_vector_decodes_to_fields(name: str) -> None:
    case = CASES[name]
    raw = bytes.fromhex(case["hex"])
    assert raw[4] == getattr(FrameType, case["type"])
    assert decode_frame(raw) == from_fields(case["type"], case["fields"])


@pytest.mark.parametrize("name", of_kind("frame"))
def test_frame_vector_fields_encode_to_hex(name: str) -> None:
    case = CASES[name]
    assert from_fields(case["type"], case["fields"]).encode().hex() == case["hex"]


@pytest.mark.parametrize("name", [n for n in of_kind("frame") if "raw" in CASES[n]["fields"]])
def test_coded_chunk_vector(name: str) -> None:
    fields = CASES[name]["fields"]
    meta, data, raw = fields["meta"], bytes.fromhex(fields["data"]), bytes.fromhex(fields["raw"])
    assert meta["codec"] != CODEC_RAW and 0 < len(data) < meta["raw_length"] == len(raw)
    assert chunk_checksum(raw) == meta["checksum"]
    out = bytearray(len(raw))
    Decoder().decode(meta["codec"], data, meta["raw_length"], meta["checksum"], out)
    assert bytes(out) == raw
    if meta["codec"] == 2:  # split16 (SPEC §5.4.1): header, high plane, low plane, tail
        m, t = divmod(len(raw), 2)
        assert data[:4] == b"\x01\x00\x00\x00"
        hi_len = int.from_bytes(data[4:8], "big")
        assert len(data) == 8 + hi_len + m + t
        assert data[8 + hi_len : 8 + hi_len + m] == raw[0 : 2 * m : 2]  # the low bytes
        assert data[len(data) - t :] == raw[len(raw) - t :]
        assert data[8:12] == b"\x28\xb5\x2f\xfd"  # a zstd frame's magic


@pytest.mark.parametrize("name", of_kind("auth"))
def test_auth_vector(name: str) -> None:
    """The MACs from SPEC §6.4's formulas alone (hashlib, hmac), and the reference state
    machine with the same nonces reproducing every byte."""
    f = {k: bytes.fromhex(v) if k != "key_id" else v for k, v in CASES[name]["fields"].items()}
    k = hashlib.sha256(f["secret"]).digest()

    def framed(*parts: bytes) -> bytes:
        return b"".join(len(p).to_bytes(4, "big") + p for p in parts)

    hello, ack = f["hello"][8:], f["hello_ack"][8:]  # bodies: after the 8-byte header
    assert hello.endswith(f["nonce_i"] + f["key_id"].encode())  # HELLO's auth, last field
    mac_a = hmac.digest(
        k, b"kvship-auth-v1 acceptor\0" + framed(f["nonce_a"], hello, ack), "sha256"
    )
    mac_i = hmac.digest(k, b"kvship-auth-v1 initiator\0" + framed(f["nonce_a"], hello), "sha256")
    assert (mac_a, mac_i) == (f["mac_a"], f["mac_i"])
    assert f["challenge"][8:] == f["nonce_a"] + mac_a and f["proof"][8:] == mac_i
    assert bytes.fromhex(CASES[name]["hex"]) == MAGIC + f["hello"] + f["proof"]
    initiator = Connection(
        role=Role.PEER,
        initiator=True,
        key=PeerKey(f["key_id"], f["secret"]),
        random_bytes=lambda n: f["nonce_i"],
    )
    acceptor = Connection(
        role=Role.PEER,
        initiator=False,
        keys={f["key_id"]: f["secret"]},
        random_bytes=lambda n: f["nonce_a"],
    )
    sent = initiator.initiate(Hello(ROLE_PEER, "prefill-a", capabilities=CAP_STRIPING))
    assert sent == MAGIC + f["hello"]
    acceptor.receive_data(sent)
    assert acceptor.accept("decode-b", CAP_STRIPING) == f["challenge"]
    initiator.receive_data(f["challenge"])
    assert initiator.prove() == f["proof"]
    acceptor.receive_data(f["proof"])
    assert acceptor.accept() == f["hello_ack"]
    initiator.receive_data(f["hello_ack"])
    assert initiator.state is acceptor.state is State.OPEN


@pytest.mark.parametrize("name", of_kind("stream"))
def test_stream_vector(name: str) -> None:
    case = CASES[name]
    accept = case["fields"].get("accept", True)
    conn, events = feed_acceptor(bytes.fromhex(case["hex"]), Limits(), accept=accept)
    assert not conn.closed
    expected = [from_fields(e["type"], e["fields"]) for e in case["fields"]["events"]]
    assert events == expected
    # and the other way: the known frames re-encode to the bytes after the preface
    raw = bytes.fromhex(case["hex"])
    assert raw.startswith(b"\x89KVSHIP\n" + expected[0].encode())
    assert raw.endswith(expected[-1].encode())


@pytest.mark.parametrize("name", of_kind("digest"))
def test_digest_vector(name: str) -> None:
    fields = CASES[name]["fields"]
    chunks = [bytes.fromhex(c) for c in fields["chunks"]]
    sums = [chunk_checksum(c) for c in chunks]
    assert sums == fields["checksums"]
    assert b"".join(s.to_bytes(8, "big") for s in sums).hex() == CASES[name]["hex"]
    assert digest_of_checksums(sums) == fields["digest"]
    digest = TransferDigest(len(sums))
    for i in reversed(range(len(sums))):
        digest.add(i, sums[i])
    assert digest.value() == fields["digest"]


@pytest.mark.parametrize("name", of_kind("error"))
def test_error_vector(name: str) -> None:
    case = CASES[name]
    limits = Limits(**case["fields"]["limits"])
    fields = case["fields"]
    with pytest.raises(ProtocolError) as info:
        feed_acceptor(
            bytes.fromhex(case["hex"]), limits, eof=fields["eof"], accept=fields.get("accept", True)
        )
    assert info.value.code is ErrorCode[case["expect_error"]]


@pytest.mark.parametrize("name", of_kind("dedup"))
def test_dedup_vector(name: str) -> None:
    """The key chain and the skip rule (SPEC §7.6), recomputed from the manifest alone."""
    case = CASES[name]
    fields = case["fields"]
    manifest = Manifest.from_extra(fields["manifest"])
    layout, rank, tokens = manifest.layout, manifest.tp_rank, tuple(fields["token_ids"])
    ns = namespace(layout, rank)
    assert ns.hex() == case["hex"] and ns.decode() == fields["namespace"]
    assert root_key(ns).hex() == fields["root"]
    # Each key by hand: xxh3-128 (seed PREFIX_SEED) of previous key || 4 u32 LE token ids.
    bt, prev = layout.block_tokens, root_key(ns)
    for i, (inp, key) in enumerate(zip(fields["key_inputs"], fields["keys"], strict=True)):
        block = b"".join(t.to_bytes(4, "little") for t in tokens[i * bt : (i + 1) * bt])
        assert bytes.fromhex(inp) == prev + block
        prev = xxhash.xxh3_128_digest(prev + block, PREFIX_SEED)
        assert prev.hex() == key
    assert [k.hex() for k in block_keys(tokens, layout, rank)] == fields["keys"]
    assert [k.hex() for k in manifest.keys] == fields["keys"]
    n_full = len(tokens) // bt
    tail = b"".join(t.to_bytes(4, "little") for t in tokens[n_full * bt :])
    assert bytes.fromhex(fields["full_prefix_input"]) == prev + b"S" + tail
    assert (
        xxhash.xxh3_128_digest(prev + b"S" + tail, PREFIX_SEED).hex() == fields["full_prefix_key"]
    )
    assert full_prefix_key(tokens, layout, rank).hex() == fields["full_prefix_key"]
    # Geometry: the OPEN vector's layers are the model's.
    opened = from_fields("OPEN", CASES[fields["open"]]["fields"])
    assert opened.extra["dedup"] == fields["manifest"] and opened.token_ids == tokens
    assert opened.chunk_size == fields["chunk_size"]
    n_blocks = -(-len(tokens) // bt)
    for kind, spec, want in zip(layout.layers, opened.layers, fields["layers"], strict=True):
        if isinstance(kind, FullAttention):
            assert want["kind"] == "full" and want["block_bytes"] == kind.block_bytes
            assert spec.nbytes == want["nbytes"] == n_blocks * kind.block_bytes
        else:
            assert want["kind"] == "linear" and want["state_bytes"] == kind.state_bytes
            assert spec.nbytes == want["nbytes"] == kind.state_bytes
    manifest.check(opened.layers, len(tokens), opened.chunk_size)
    starts = chunk_table(opened.layers, opened.chunk_size)
    assert starts == fields["chunk_starts"]
    size = opened.chunk_size
    for answer in fields["skips"]:
        skip = skipped_chunks(layout, opened.layers, size, answer["blocks"], answer["states"] == 1)
        assert sorted(i for c in skip.values() for i in c) == answer["skipped"]
        # The rule as arithmetic (SPEC §7.6), independently of skipped_chunks.
        mine = []
        for i, want in enumerate(fields["layers"]):
            if want["kind"] == "full":
                n = min(starts[i + 1] - starts[i], answer["blocks"] * want["block_bytes"] // size)
            else:
                n = starts[i + 1] - starts[i] if answer["states"] else 0
            mine += range(starts[i], starts[i] + n)
        assert mine == answer["skipped"]


def test_committed_vectors_are_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("make_vectors", ROOT / "tools/make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.build()
    assert sorted(built) == sorted(f"{name}.json" for name in CASES)
    for filename, case in built.items():
        assert json.loads(module.render(case)) == CASES[filename[:-5]], filename
        assert module.render(case) == (VECTORS / filename).read_text(), filename


def test_limits_fields_match_dataclass() -> None:
    names = {f.name for f in dataclasses.fields(Limits)}
    for name in of_kind("error"):
        assert set(CASES[name]["fields"]["limits"]) == names
