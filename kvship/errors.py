"""Typed exceptions that engines see; each says what happened and carries the wire code."""

from __future__ import annotations

from .protocol.errors import ErrorCode, ProtocolError


class KvshipError(Exception):
    """Base of everything kvship raises to its users."""


class DaemonUnavailable(KvshipError):
    """The local daemon could not be reached (not running, wrong socket path or port)."""


class TransferError(KvshipError):
    """A transfer ended without its KV delivered; ``code`` says why (see SPEC.md)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class PeerUnreachable(TransferError):
    """The local daemon could not reach, or lost, the destination daemon."""


class RequestNotFound(TransferError):
    """``receive`` waited its timeout and no transfer of that request arrived."""


class IntegrityError(TransferError):
    """Bytes arrived corrupted (checksum or digest mismatch); nothing was delivered."""


def error_for(code: int, message: str) -> TransferError:
    """The most specific exception for a wire error code."""
    try:
        ec = ErrorCode(code)
    except ValueError:
        ec = ErrorCode.INTERNAL_ERROR
        message = f"unknown error code {code}: {message}"
    cls: type[TransferError] = {
        ErrorCode.PEER_UNREACHABLE: PeerUnreachable,
        ErrorCode.NOT_FOUND: RequestNotFound,
        ErrorCode.CHECKSUM_MISMATCH: IntegrityError,
        ErrorCode.DIGEST_MISMATCH: IntegrityError,
    }.get(ec, TransferError)
    return cls(ec, message)


__all__ = [
    "DaemonUnavailable",
    "ErrorCode",
    "IntegrityError",
    "KvshipError",
    "PeerUnreachable",
    "ProtocolError",
    "RequestNotFound",
    "TransferError",
    "error_for",
]
