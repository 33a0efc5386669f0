"""The protocol package's shape: frames split by concern behind one facade, one base for
the fixed-layout frames, the same names as before, and sans-IO imports only."""

from __future__ import annotations

import ast
import dataclasses
import re
import struct
from pathlib import Path

import pytest

import kvship.protocol as protocol
from kvship.protocol import engine_frames, frames, meta, peer_frames
from kvship.protocol.base import FixedFrame, Packed

PACKAGE = Path(protocol.__file__).parent

# What kvship.protocol exported before the split (tools, daemon, client and tests use them).
EXPORTED_BEFORE = [
    "Abort", "CAP_CODECS", "CAP_DEDUP", "CAP_SHM", "CAP_STRIPING", "CODEC_RAW", "CODEC_SPLIT16",
    "CODEC_ZSTD", "Chunk", "ChunkMeta", "Complete", "Connection", "Credit", "End", "ErrorCode",
    "FLAG_IGNORABLE", "Frame", "FrameType", "GoAway", "HEADER_SIZE", "Have", "Hello",
    "HelloAck", "KNOWN_CAPS", "KNOWN_CODECS", "LayerReady", "LayerSpec", "Limits", "MAGIC",
    "MAX_REQUEST_ID", "Open", "PROTOCOL_VERSION", "PayloadSink", "Ping", "Pong",
    "ProtocolError", "ROLE_ENGINE", "ROLE_PEER", "Release", "ShmAttach", "ShmAttached",
    "ShmChunk", "State", "Subscribe", "TransferDigest", "chunk_checksum", "chunk_table",
    "digest_of_checksums", "frame_header",
]  # fmt: skip
# ... and what was imported from the modules themselves
FROM_FRAMES = ["DECODERS", "HEADER", "HEADER_SIZE", "MAX_WINDOW", "HANDSHAKE_MAX_BODY"]
FROM_CONNECTION = ["MAX_CHUNKS", "Connection", "Limits", "PayloadSink", "State"]


def test_every_name_is_still_importable() -> None:
    for name in EXPORTED_BEFORE:
        assert hasattr(protocol, name), name
        assert name in protocol.__all__, name
    for name in FROM_FRAMES:
        assert hasattr(frames, name), name
    from kvship.protocol import connection

    for name in FROM_CONNECTION:
        assert hasattr(connection, name), name
    for name in ("LocalProtocolError", "Role", "Side", "TRANSITIONS", "Event", "ReceivedChunk"):
        assert name in protocol.__all__, name


def fixed_frames() -> list[type[FixedFrame]]:
    found = []
    for module in (peer_frames, engine_frames):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, FixedFrame):
                found.append(value)
    return [cls for cls in found if cls is not FixedFrame]


def struct_items(fmt: str) -> int:
    """Values a struct format packs (pad bytes ``x`` take none)."""
    return sum(int(n or 1) for n, code in re.findall(r"(\d*)([a-zA-Z?])", fmt) if code != "x")


@pytest.mark.parametrize("cls", [*fixed_frames(), peer_frames.ChunkMeta], ids=lambda c: c.__name__)
def test_fixed_frames_are_a_struct_and_field_names(cls: type[Packed]) -> None:
    assert len(cls.FIELDS) == struct_items(cls.FIXED.format)
    named = [f for f in cls.FIELDS if f is not None]
    tails = [t.name for t in getattr(cls, "TAIL", ())]
    assert sorted(named + tails) == sorted(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    assert isinstance(cls.FIXED, struct.Struct) and cls.FIXED.format.startswith(">")


def test_the_fixed_frames_use_the_base() -> None:
    names = {cls.__name__ for cls in fixed_frames()}
    assert names == {
        "Hello", "HelloAck", "End", "Complete", "Credit", "Abort", "Ping", "Pong", "GoAway",
        "Have", "Hold", "Subscribe", "ShmAttach", "ShmAttached", "LayerReady", "Release",
    }  # fmt: skip
    for cls in fixed_frames():  # no per-class encode/decode boilerplate left
        assert "encode" not in vars(cls) and "decode" not in vars(cls), cls.__name__
    # the rest is written out: OPEN (tokens + JSON), CHUNK (streams), SHM_CHUNK (nested meta)
    assert {frames.Open, frames.Chunk, frames.ShmChunk}.isdisjoint(fixed_frames())
    assert frames.Open is meta.Open


def test_frames_module_is_a_facade() -> None:
    lines = (PACKAGE / "frames.py").read_text().count("\n")
    assert lines < 200  # it was 800: the code lives in the concern modules
    for name in frames.__all__:
        assert getattr(frames, name) is getattr(protocol, name)


ALLOWED = {"xxhash"}


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_sans_io_imports_only(path: Path) -> None:
    """The protocol layer imports the standard library and xxhash, nothing else (DESIGN)."""
    import sys

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots = [(node.module or "").split(".")[0]]
        else:
            continue
        for root in roots:
            assert root in sys.stdlib_module_names or root in ALLOWED, (path.name, root)
            assert root not in {"asyncio", "socket", "threading", "selectors"}, (path.name, root)
