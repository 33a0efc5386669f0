"""Protocol error codes and the two ways the protocol layer refuses (as h11 does).

Every malformed, truncated, oversized or out-of-order *input* surfaces as
:class:`ProtocolError` with a specific :class:`ErrorCode`, so the IO layer can log it,
count it, send a GOAWAY with the same code and close just that connection (the
connection is CLOSED from then on).

Every frame *this side* may not send now raises :class:`LocalProtocolError` instead,
before anything is encoded or changed: the connection stays as it was and the
application may go on. Its code is the one the peer would have answered the frame with.
It is also a :class:`RuntimeError`, what the sending API raised before it had a type.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Wire error codes (GOAWAY and ABORT frames carry them). See protocol/SPEC.md."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1  # a frame that makes no sense in the current state
    BAD_MAGIC = 2  # the peer is not speaking kvship
    UNSUPPORTED_VERSION = 3  # no common protocol version
    FRAME_TOO_LARGE = 4  # a length above the negotiated limit
    MALFORMED_FRAME = 5  # a frame whose body does not parse
    UNKNOWN_FRAME = 6  # a non-ignorable frame type this side does not know
    FLOW_CONTROL = 7  # the peer sent more chunk bytes than its credit
    TOO_MANY_TRANSFERS = 8  # more concurrent transfers than max_transfers
    UNKNOWN_TRANSFER = 9  # a frame for a transfer that is not open
    CHECKSUM_MISMATCH = 10  # chunk bytes do not match their xxh3-64
    DIGEST_MISMATCH = 11  # whole-transfer digest does not match
    AUTH_FAILED = 12  # reserved for the authentication issue
    LAYOUT_MISMATCH = 13  # chunk outside the declared layout
    NOT_FOUND = 14  # a subscribe for a request that never arrived in time
    CANCELLED = 15  # the transfer was cancelled by its owner
    SHUTTING_DOWN = 16  # the daemon is draining and takes no new transfers
    INTERNAL_ERROR = 17  # a bug or resource failure on the sending side
    PEER_UNREACHABLE = 18  # the daemon could not reach the destination daemon
    UNSUPPORTED_CODEC = 19  # a chunk codec this side cannot decode
    TIMEOUT = 20  # a transfer stalled past its deadline
    TRANSFER_TOO_LARGE = 21  # more chunks in one transfer than MAX_CHUNKS


def code_name(code: int) -> str:
    """``AUTH_FAILED`` for 12; a code this side does not know, as its number."""
    return ErrorCode(code).name if code in ErrorCode._value2member_map_ else str(code)


class ProtocolError(Exception):
    """The peer broke the protocol. ``code`` is what goes into the GOAWAY frame."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class LocalProtocolError(ProtocolError, RuntimeError):
    """This side tried to send something the protocol forbids now; nothing was sent and
    the connection's state is unchanged. ``code`` is what the peer would have replied."""
