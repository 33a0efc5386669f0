"""Golden vectors in protocol/vectors/: the committed files, checked both ways.

Decoding each ``hex`` must give its ``fields`` and encoding the ``fields`` must give the
``hex``; error vectors must fail with their ``expect_error`` code. The fields are turned into
frames here independently of tools/make_vectors.py, which is only used to check that the
committed files are up to date.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from kvship.protocol import (
    Abort,
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
    LayerReady,
    LayerSpec,
    Limits,
    Open,
    Ping,
    Pong,
    ProtocolError,
    Release,
    ShmAttach,
    ShmAttached,
    ShmChunk,
    State,
    Subscribe,
    TransferDigest,
    chunk_checksum,
    digest_of_checksums,
)
from kvship.protocol.frames import DECODERS, HEADER, HEADER_SIZE

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "protocol" / "vectors"
CASES = {p.stem: json.loads(p.read_text()) for p in sorted(VECTORS.glob("*.json"))}

CLASSES: dict[str, type] = {
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
    if type_name == "HELLO":
        f["auth"] = bytes.fromhex(f["auth"])
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


def feed_acceptor(stream: bytes, limits: Limits, eof: bool = False) -> tuple[Connection, list]:
    """The vector harness (SPEC.md, "Test vectors"): a fresh acceptor, HELLO accepted at once."""
    conn = Connection(initiator=False, limits=limits)
    events: list[Any] = []
    pos = 0
    while pos < len(stream) and conn.state in (State.AWAIT_PREFACE, State.AWAIT_HELLO):
        events += conn.receive_data(stream[pos : pos + 1])
        pos += 1
    if conn.state is State.AWAIT_ACCEPT:
        conn.accept("vectors")
    events += conn.receive_data(stream[pos:])
    if eof:
        conn.receive_eof()
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
    } <= errors
    assert "malformed_open_meta" in CASES
    for name, case in CASES.items():
        assert case["name"] == name
        assert {"name", "kind", "hex", "fields"} <= case.keys()


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


@pytest.mark.parametrize("name", of_kind("stream"))
def test_stream_vector(name: str) -> None:
    case = CASES[name]
    conn, events = feed_acceptor(bytes.fromhex(case["hex"]), Limits())
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
    with pytest.raises(ProtocolError) as info:
        feed_acceptor(bytes.fromhex(case["hex"]), limits, eof=case["fields"]["eof"])
    assert info.value.code is ErrorCode[case["expect_error"]]


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
