"""kvship wire frames, version 1 (normative: protocol/SPEC.md): one import for all of them.

Every frame is an 8-byte header ``length:u32 type:u8 flags:u8 reserved:u16`` (big-endian)
followed by ``length`` body bytes. Frames double as the events the connection state
machine emits. The code lives by concern:

=================== ==========================================================
``constants``       magic, versions, header, flags, limits, roles, codecs, caps
``base``            header/length/str16 helpers, :class:`FixedFrame` (struct + fields)
``geometry``        :class:`LayerSpec`, :func:`chunk_table`, chunk placement checks
``meta``            OPEN: fixed part, token ids, the JSON meta and its validator
``peer_frames``     HELLO … GOAWAY, HAVE, CHUNK/ChunkMeta
``engine_frames``   SUBSCRIBE, SHM_ATTACH(ED), SHM_CHUNK, LAYER_READY, RELEASE
``auth``            AUTH_CHALLENGE, AUTH_PROOF, the pre-shared-key MACs
``resume``          ACK, RESUME (a transfer that survives its connections), SKIP
=================== ==========================================================
"""

from __future__ import annotations

from collections.abc import Callable

from .auth import AuthChallenge, AuthProof
from .base import frame_header, pad_header
from .constants import (  # noqa: F401 - importable from here as before (tests, tools)
    CAP_AUTH,
    CAP_CODECS,
    CAP_DEDUP,
    CAP_DEDUP_TAIL,
    CAP_HOLD,
    CAP_OPEN_CHECK,
    CAP_RESUME,
    CAP_SHM,
    CAP_SKIP,
    CAP_STRIPING,
    CODEC_RAW,
    CODEC_SPLIT16,
    CODEC_ZSTD,
    FLAG_IGNORABLE,
    HANDSHAKE_MAX_BODY,
    HEADER,
    HEADER_SIZE,
    KNOWN_CAPS,
    KNOWN_CODECS,
    MAGIC,
    MAX_CHUNKS,
    MAX_REQUEST_ID,
    MAX_WINDOW,
    MIN_VERSION,
    PROTOCOL_VERSION,
    ROLE_ENGINE,
    ROLE_PEER,
    FrameType,
)
from .engine_frames import LayerReady, Release, ShmAttach, ShmAttached, ShmChunk, Subscribe
from .geometry import LayerSpec, chunk_table
from .meta import Open
from .peer_frames import (
    Abort,
    Chunk,
    ChunkMeta,
    Complete,
    Credit,
    End,
    GoAway,
    Have,
    Hello,
    HelloAck,
    Hold,
    Ping,
    Pong,
    ReceivedChunk,
)
from .resume import Ack, Resume, Skip

Frame = (
    Hello
    | HelloAck
    | Open
    | Chunk
    | End
    | Complete
    | Credit
    | Abort
    | Ping
    | Pong
    | GoAway
    | Have
    | Hold
    | Subscribe
    | ShmAttach
    | ShmAttached
    | ShmChunk
    | LayerReady
    | Release
    | AuthChallenge
    | AuthProof
    | Ack
    | Resume
    | Skip
)

DECODERS: dict[int, Callable[[memoryview], Frame]] = {
    cls.TYPE: cls.decode
    for cls in (
        Hello,
        HelloAck,
        Open,
        End,
        Complete,
        Credit,
        Abort,
        Ping,
        Pong,
        GoAway,
        Have,
        Hold,
        Subscribe,
        ShmAttach,
        ShmAttached,
        ShmChunk,
        LayerReady,
        Release,
        AuthChallenge,
        AuthProof,
        Ack,
        Resume,
        Skip,
    )
}
"""Body decoders by frame type; CHUNK has none (the connection streams its data)."""

__all__ = [
    "CAP_AUTH",
    "CAP_CODECS",
    "CAP_DEDUP",
    "CAP_DEDUP_TAIL",
    "CAP_HOLD",
    "CAP_OPEN_CHECK",
    "CAP_RESUME",
    "CAP_SHM",
    "CAP_SKIP",
    "CAP_STRIPING",
    "CODEC_RAW",
    "CODEC_SPLIT16",
    "CODEC_ZSTD",
    "FLAG_IGNORABLE",
    "HEADER_SIZE",
    "KNOWN_CAPS",
    "KNOWN_CODECS",
    "MAGIC",
    "MAX_REQUEST_ID",
    "PROTOCOL_VERSION",
    "ROLE_ENGINE",
    "ROLE_PEER",
    "Abort",
    "Ack",
    "AuthChallenge",
    "AuthProof",
    "Chunk",
    "ChunkMeta",
    "Complete",
    "Credit",
    "End",
    "Frame",
    "FrameType",
    "GoAway",
    "Have",
    "Hello",
    "HelloAck",
    "Hold",
    "LayerReady",
    "LayerSpec",
    "Open",
    "Ping",
    "Pong",
    "ReceivedChunk",
    "Release",
    "Resume",
    "ShmAttach",
    "ShmAttached",
    "ShmChunk",
    "Skip",
    "Subscribe",
    "chunk_table",
    "frame_header",
    "pad_header",
]
