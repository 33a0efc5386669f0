"""Wire constants of kvship protocol v1 (normative: protocol/SPEC.md §2–§4, §6, §11, §13)."""

from __future__ import annotations

import struct

MAGIC = b"\x89KVSHIP\n"  # connection preface: high bit catches 7-bit links, \n catches text modes
PROTOCOL_VERSION = 1
MIN_VERSION = 1

HEADER = struct.Struct(">IBBH")  # length:u32 type:u8 flags:u8 reserved:u16
HEADER_SIZE = HEADER.size  # 8

FLAG_IGNORABLE = 0x80  # a receiver that does not know this frame type may skip it

HANDSHAKE_MAX_BODY = 64 * 1024  # bodies allowed before limits are negotiated
MAX_WINDOW = 2**31 - 1
MAX_CHUNKS = 1 << 20  # per transfer: bounds the receiver's per-chunk bookkeeping (~9 MiB)
MAX_REQUEST_ID = 256  # code points
MAX_MESSAGE = 1000  # characters of an ABORT / GOAWAY message the reference writes

ROLE_PEER = 1  # another kvshipd (the data plane between clusters)
ROLE_ENGINE = 2  # an inference engine's kvship.Client on the local API

AUTH_NONE = 0  # auth_method: none; 1 = AUTH_PSK (protocol.auth, §6.4)

CODEC_RAW = 0
CODEC_ZSTD = 1  # zstd frame of the chunk's bytes (kvship.payload)
CODEC_SPLIT16 = 2  # 2-byte values split into planes; high plane entropy-coded (kvship.payload)
KNOWN_CODECS = (CODEC_RAW, CODEC_ZSTD, CODEC_SPLIT16)

# Capability bits (HELLO / HELLO_ACK). Unknown bits are ignored; the ACK holds the intersection.
CAP_SHM = 1 << 0  # shared-memory staging arena on the local API (Unix socket only)
CAP_STRIPING = 1 << 1  # a transfer may be striped over several connections
CAP_CODECS = 1 << 2  # chunks may carry codecs other than raw (zstd, split16)
CAP_DEDUP = 1 << 3  # OPEN may carry a dedup manifest; the receiver answers HAVE
CAP_AUTH = 1 << 4  # the handshake authenticated both ends by a pre-shared key (§6.4)
CAP_RESUME = 1 << 5  # per-chunk ACK; a transfer survives its connections (RESUME, §7.7)
CAP_OPEN_CHECK = 1 << 6  # END carries a check of its stripe's OPEN body (§7.4)
CAP_HOLD = 1 << 7  # the receiver may pause one transfer's chunks (HOLD, §7.8)
CAP_DEDUP_TAIL = 1 << 8  # dedup sends the chunk straddling the held prefix in part (§7.6.5)
CAP_SKIP = 1 << 9  # engine API: the daemon names chunks of a put the engine may omit (§9.1.1)
KNOWN_CAPS = (
    CAP_SHM
    | CAP_STRIPING
    | CAP_CODECS
    | CAP_DEDUP
    | CAP_AUTH
    | CAP_RESUME
    | CAP_OPEN_CHECK
    | CAP_HOLD
    | CAP_DEDUP_TAIL
    | CAP_SKIP
)


class FrameType:
    HELLO = 0x01
    HELLO_ACK = 0x02
    OPEN = 0x03
    CHUNK = 0x04
    END = 0x05
    COMPLETE = 0x06
    CREDIT = 0x07
    ABORT = 0x08
    PING = 0x09
    PONG = 0x0A
    GOAWAY = 0x0B
    ACK = 0x0C  # receiver: these chunks are held (CAP_RESUME, §7.7)
    RESUME = 0x0D  # receiver: the chunks it holds, answering a resuming OPEN
    AUTH_CHALLENGE = 0x0E  # acceptor: its nonce and its proof of the key (§6.4)
    AUTH_PROOF = 0x0F  # initiator: its proof of the key
    HAVE = 0x10  # dedup: the receiver holds the first N blocks (and maybe the states)
    # 0x11-0x1F reserved for more of the dedup exchange
    SUBSCRIBE = 0x20
    SHM_ATTACH = 0x21
    SHM_ATTACHED = 0x22
    SHM_CHUNK = 0x23
    LAYER_READY = 0x24
    RELEASE = 0x25
    HOLD = 0x26  # receiver: stop (or go on) sending one transfer's chunks (CAP_HOLD, §7.8)
    PAD = 0x27  # bytes to drop, after the handshake; always FLAG_IGNORABLE (§5.23)
    SKIP = 0x28  # daemon -> engine: chunks of a put the receiver holds (CAP_SKIP, §9.1.1)


FRAME_NAMES: dict[int, str] = {
    value: name for name, value in vars(FrameType).items() if name.isupper()
}


def frame_name(frame_type: int) -> str:
    """``OPEN``, ``SHM_CHUNK``, ... or ``0x3f`` for a type this side does not know."""
    return FRAME_NAMES.get(frame_type, f"0x{frame_type:02x}")
