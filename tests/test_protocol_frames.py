"""Frame codecs: every type round-trips, and no decoder accepts a body cut short or extended.

Decoders see untrusted bytes, so each one must turn anything that is not exactly a frame
body into a ProtocolError (never IndexError, struct.error, a silent partial decode, ...).
"""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from kvship.protocol import (
    CAP_SHM,
    CAP_STRIPING,
    CODEC_RAW,
    MAX_REQUEST_ID,
    ROLE_ENGINE,
    ROLE_PEER,
    Abort,
    Ack,
    AuthChallenge,
    AuthProof,
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
    Hold,
    LayerReady,
    LayerSpec,
    Open,
    Ping,
    Pong,
    ProtocolError,
    Release,
    Resume,
    ShmAttach,
    ShmAttached,
    ShmChunk,
    Skip,
    Subscribe,
    chunk_checksum,
    chunk_table,
    frame_header,
)
from kvship.protocol.frames import DECODERS, HEADER, HEADER_SIZE, MAX_WINDOW

LAYERS = (LayerSpec("bfloat16", (2, 8), 32), LayerSpec("float32", (5,), 20))

SAMPLES: list[Any] = [
    Hello(ROLE_PEER, "prefill-a", capabilities=CAP_SHM | CAP_STRIPING),
    Hello(ROLE_ENGINE, "é-engine", min_version=1, max_version=7, auth_method=0, auth=b"\x00\xff"),
    HelloAck(1, CAP_STRIPING, 1 << 20, (4 << 20) + 64, 4 << 20, 16, "decode-b"),
    Open(1, "req-1", LAYERS, 16),
    Open(
        2**64 - 1,
        "ré-2",
        LAYERS,
        7,
        token_ids=(0, 1, 2**32 - 1),
        n_stripes=4,
        stripe=3,
        priority=255,
        peer="decode-b:7100",
        extra={"a": [1, 2, {"b": None}], "z": "ü"},
    ),
    End(5, 3, 2**64 - 1),
    Complete(5, 52, 12345),
    Credit(1),
    Credit(2**32 - 1),
    Abort(5, ErrorCode.TIMEOUT, "stalled"),
    Abort(5, 999, ""),  # unknown codes are carried, not refused
    Ping(0),
    Pong(2**64 - 1),
    GoAway(ErrorCode.NO_ERROR),
    GoAway(ErrorCode.PROTOCOL_ERROR, "bad"),
    Have(7, 12, True),
    Have(8, 0),
    Hold(9, True),
    Hold(9, False),
    Subscribe("req-1", 0),
    ShmAttach(1 << 30, "/dev/shm/kvship-1"),
    ShmAttached(1 << 30),
    ShmChunk(ChunkMeta(5, 2, 1, 0, 16, 77), 4096),
    LayerReady(5, 1, 8192, 20),
    Release(8192, 20),
    AuthChallenge(bytes(range(32)), b"\xff" * 32),
    AuthProof(bytes(range(32, 64))),
    Ack(7, (0, 5, 2**20 - 1)),
    Skip(7, (1, 4)),
    Resume.of(7, 13, {0, 3, 12}),
    Resume.of(8, 0, set()),
]


def split(raw: bytes) -> tuple[int, int, int, memoryview]:
    length, ftype, flags, reserved = HEADER.unpack_from(raw)
    assert reserved == 0
    assert len(raw) == HEADER_SIZE + length
    return ftype, flags, length, memoryview(raw)[HEADER_SIZE:]


def sample_id(frame: Any) -> str:
    return type(frame).__name__


@pytest.mark.parametrize("frame", SAMPLES, ids=sample_id)
def test_round_trip(frame: Any) -> None:
    ftype, flags, _, body = split(frame.encode())
    assert ftype == frame.TYPE
    assert flags == 0
    decoded = DECODERS[ftype](body)
    assert type(decoded) is type(frame)
    assert decoded == frame


def test_every_frame_type_has_a_sample() -> None:
    types = {v for k, v in vars(FrameType).items() if k.isupper()}
    # CHUNK streams (see the connection); PAD is read and dropped, never decoded.
    assert {f.TYPE for f in SAMPLES} | {FrameType.CHUNK, FrameType.PAD} == types
    assert set(DECODERS) == types - {FrameType.CHUNK, FrameType.PAD}


def test_chunk_encoding() -> None:
    data = b"0123456789"
    meta = ChunkMeta(9, 4, 2, 30, len(data), chunk_checksum(data))
    raw = Chunk(meta, data).encode()
    ftype, _, length, body = split(raw)
    assert ftype == FrameType.CHUNK
    assert length == ChunkMeta.FIXED.size + len(data)
    assert ChunkMeta.unpack(body) == meta
    assert bytes(body[ChunkMeta.FIXED.size :]) == data
    assert raw.startswith(Chunk.header(meta, len(data)))
    assert Chunk(meta, memoryview(data)).encode() == raw


def test_chunk_meta_layout() -> None:
    meta = ChunkMeta(0x0102030405060708, 9, 10, 11, 12, 0xAABBCCDDEEFF0011, codec=CODEC_RAW)
    packed = meta.pack()
    assert len(packed) == 40
    assert packed[:8] == bytes.fromhex("0102030405060708")
    assert packed[32:] == bytes.fromhex("aabbccddeeff0011")
    assert ChunkMeta.unpack(packed) == meta


@pytest.mark.parametrize("frame", SAMPLES, ids=sample_id)
def test_truncated_bodies_raise(frame: Any) -> None:
    ftype, _, _, body = split(frame.encode())
    for cut in range(len(body)):
        with pytest.raises(ProtocolError) as info:
            DECODERS[ftype](body[:cut])
        assert info.value.code is ErrorCode.MALFORMED_FRAME


@pytest.mark.parametrize("extra", [b"\x00", b"x", b"\x00" * 9])
@pytest.mark.parametrize("frame", SAMPLES, ids=sample_id)
def test_extended_bodies_raise(frame: Any, extra: bytes) -> None:
    ftype, _, _, body = split(frame.encode())
    with pytest.raises(ProtocolError) as info:
        DECODERS[ftype](memoryview(bytes(body) + extra))
    assert info.value.code is ErrorCode.MALFORMED_FRAME


def test_header_layout() -> None:
    assert frame_header(0x24, 0x01020304, 0x80) == bytes.fromhex("0102030424800000")


# ----------------------------------------------------------------------- HELLO / ACK
def hello_body(lo: int = 1, hi: int = 1, role: int = 1, name: bytes = b"n") -> memoryview:
    fixed = Hello.FIXED.pack(lo, hi, role, 0, 0, 0)
    return memoryview(fixed + struct.pack(">H", len(name)) + name + b"\x00\x00")


def test_hello_checks() -> None:
    assert Hello.decode(hello_body()).node_name == "n"
    for body in (hello_body(lo=2, hi=1), hello_body(role=0), hello_body(role=3)):
        with pytest.raises(ProtocolError) as info:
            Hello.decode(body)
        assert info.value.code is ErrorCode.MALFORMED_FRAME
    with pytest.raises(ProtocolError, match="UTF-8"):
        Hello.decode(hello_body(name=b"\xff"))


def test_hello_reserved_field_ignored() -> None:
    body = bytearray(hello_body())
    body[6:8] = b"\xff\xff"
    assert Hello.decode(memoryview(bytes(body))) == Hello(ROLE_PEER, "n")


def ack_body(window: int, max_frame: int, max_chunk: int) -> memoryview:
    return memoryview(HelloAck.FIXED.pack(1, 0, 0, 0, window, max_frame, max_chunk, 1) + b"\0\0")


def test_hello_ack_checks() -> None:
    assert HelloAck.decode(ack_body(MAX_WINDOW, 1040, 1000)).initial_window == MAX_WINDOW
    with pytest.raises(ProtocolError) as info:
        HelloAck.decode(ack_body(MAX_WINDOW + 1, 1040, 1000))
    assert info.value.code is ErrorCode.FLOW_CONTROL
    for max_frame, max_chunk in ((1039, 1000), (1000, 0)):
        with pytest.raises(ProtocolError) as info:
            HelloAck.decode(ack_body(1, max_frame, max_chunk))
        assert info.value.code is ErrorCode.MALFORMED_FRAME


# ------------------------------------------------------------------------------- OPEN
def open_body(
    meta: Any,
    *,
    chunk_size: int = 8,
    total: int = 16,
    n_chunks: int = 2,
    n_stripes: int = 1,
    stripe: int = 0,
) -> memoryview:
    raw = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    fixed = Open.FIXED.pack(7, total, n_chunks, chunk_size, n_stripes, stripe, 0, 0, 0, 0)
    return memoryview(fixed + raw)


GOOD_META: dict[str, Any] = {
    "request_id": "r",
    "layers": [{"dtype": "uint8", "shape": [16], "nbytes": 16}],
}


def with_meta(**changes: Any) -> dict[str, Any]:
    meta = json.loads(json.dumps(GOOD_META))
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    return meta


def layer(**changes: Any) -> list[dict[str, Any]]:
    item: dict[str, Any] = {"dtype": "uint8", "shape": [16], "nbytes": 16}
    item.update(changes)
    return [item]


def test_open_good_meta_and_unknown_keys_ignored() -> None:
    frame = Open.decode(open_body(with_meta(future={"x": 1}, extra={"k": 1})))
    assert frame.request_id == "r"
    assert frame.extra == {"k": 1}
    assert frame.layers == (LayerSpec("uint8", (16,), 16),)
    # whitespace is valid JSON: receivers accept it even though encoders write compact JSON
    assert (
        Open.decode(
            open_body(b' {"request_id" : "r", "layers": [{"dtype":"u8","shape":[],"nbytes":16}]}\n')
        ).request_id
        == "r"
    )


BAD_METAS: list[Any] = [
    b"",
    b"not json",
    b"[]",
    json.dumps([GOOD_META]).encode(),
    b"\xff\xfe",
    json.dumps(GOOD_META).encode("utf-16"),  # JSON must be UTF-8
    b'{"request_id":"r","request_id":"s","layers":[{"dtype":"u8","shape":[],"nbytes":16}]}',
    b'{"request_id":"\\ud800","layers":[{"dtype":"u8","shape":[],"nbytes":16}]}',
    b'{"request_id":"r","layers":[{"dtype":"u8","shape":[],"nbytes":16}],"extra":{"x":NaN}}',
    b"[" * 100_000 + b"]" * 100_000,
    with_meta(request_id=None),
    with_meta(request_id=""),
    with_meta(request_id="x" * (MAX_REQUEST_ID + 1)),
    with_meta(request_id=5),
    with_meta(layers=None),
    with_meta(layers=[]),
    with_meta(layers={"dtype": "u8"}),
    with_meta(layers=["u8"]),
    with_meta(layers=layer(dtype="")),
    with_meta(layers=layer(dtype="x" * 33)),
    with_meta(layers=layer(dtype=3)),
    with_meta(layers=layer(shape=16)),
    with_meta(layers=layer(shape=[-1])),
    with_meta(layers=layer(shape=[True])),
    with_meta(layers=layer(shape=[2**40])),
    with_meta(layers=layer(nbytes=16.0)),
    with_meta(layers=layer(nbytes=True)),
    with_meta(layers=layer(nbytes=-16)),
    with_meta(layers=layer(nbytes=2**48)),
    with_meta(peer=7),
    with_meta(extra=[1]),
]


@pytest.mark.parametrize("meta", BAD_METAS, ids=range(len(BAD_METAS)))
def test_open_bad_meta(meta: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        Open.decode(open_body(meta))
    assert info.value.code is ErrorCode.MALFORMED_FRAME


@pytest.mark.parametrize(
    "fixed",
    [
        {"chunk_size": 0},
        {"n_stripes": 0},
        {"n_stripes": 2, "stripe": 2},
        {"total": 17},
        {"n_chunks": 3},
        {"chunk_size": 16},  # 1 chunk, not the 2 declared
    ],
    ids=str,
)
def test_open_fixed_part_checks(fixed: dict[str, int]) -> None:
    with pytest.raises(ProtocolError) as info:
        Open.decode(open_body(GOOD_META, **fixed))
    assert info.value.code is ErrorCode.MALFORMED_FRAME


def test_open_token_ids_are_big_endian() -> None:
    raw = Open(1, "r", LAYERS, 16, token_ids=(0x01020304,)).encode()
    assert raw[HEADER_SIZE + 36 : HEADER_SIZE + 40] == bytes.fromhex("01020304")


def test_open_token_count_beyond_body() -> None:
    fixed = Open.FIXED.pack(7, 16, 2, 8, 1, 0, 0, 0, 0, 2**32 - 1)
    with pytest.raises(ProtocolError, match="token_ids"):
        Open.decode(memoryview(fixed + json.dumps(GOOD_META).encode()))


def test_chunk_table() -> None:
    specs = tuple(LayerSpec("u8", (n,), n) for n in (10, 0, 8, 1))
    assert chunk_table(specs, 4) == [0, 3, 3, 5, 6]
    assert Open(1, "r", specs, 4).n_chunks == 6
    assert Open(1, "r", specs, 4).total_bytes == 19


# ------------------------------------------------------------------------ the rest
def test_credit_zero_is_flow_control() -> None:
    with pytest.raises(ProtocolError) as info:
        Credit.decode(memoryview(b"\x00\x00\x00\x00"))
    assert info.value.code is ErrorCode.FLOW_CONTROL


def test_messages_are_capped_at_1000_characters() -> None:
    for frame, decoded_type in ((Abort(1, 1, "é" * 5000), Abort), (GoAway(1, "x" * 5000), GoAway)):
        _, _, _, body = split(frame.encode())
        assert decoded_type.decode(body).message == frame.message[:1000]


def test_str16_longer_than_65535_refused_on_encode() -> None:
    with pytest.raises(ValueError):
        ShmAttach(1, "x" * 70000).encode()


@pytest.mark.parametrize("request_id", ["", "x" * (MAX_REQUEST_ID + 1)], ids=["empty", "long"])
def test_subscribe_request_id_length(request_id: str) -> None:
    _, _, _, body = split(Subscribe(request_id, 1).encode())
    with pytest.raises(ProtocolError):
        Subscribe.decode(body)


@pytest.mark.parametrize("change", [{"codec": 1}, {"wire": 15}], ids=str)
def test_shm_chunk_raw_only(change: dict[str, int]) -> None:
    meta = ChunkMeta(1, 0, 0, 0, 16, 0, codec=change.get("codec", CODEC_RAW))
    body = meta.pack() + ShmChunk.TAIL.pack(4096, change.get("wire", 16))
    with pytest.raises(ProtocolError) as info:
        ShmChunk.decode(memoryview(body))
    assert info.value.code is ErrorCode.MALFORMED_FRAME


def test_pong_is_not_a_ping_on_the_wire() -> None:
    assert split(Ping(3).encode())[0] == FrameType.PING
    assert split(Pong(3).encode())[0] == FrameType.PONG
    assert type(DECODERS[FrameType.PONG](memoryview(bytes(8)))) is Pong
