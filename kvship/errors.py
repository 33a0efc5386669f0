"""Typed exceptions that engines see; each says what happened and carries the wire code.

Every failure of a :class:`kvship.Client` call reaches the caller as a
:class:`KvshipError`, never as a bare ``OSError``/``ConnectionError``/``TimeoutError``::

    KvshipError
    ├── DaemonUnavailable          the local daemon cannot be reached
    │   └── DaemonConnectionLost   ... or its connection dropped in the middle of a call
    └── TransferError (.code)      the transfer ended without its KV delivered
        ├── PeerUnreachable        the far daemon could not be reached, or was lost
        ├── RequestNotFound        receive(): no such transfer arrived in time
        └── IntegrityError         checksum or digest mismatch: nothing was delivered

A timeout of a call (``finish(timeout=...)``, ``receive(timeout=...)``) is a
``TransferError`` whose ``code`` is ``ErrorCode.TIMEOUT``. The original low-level
exception, where there was one, is the ``__cause__``.
"""

from __future__ import annotations

from .protocol.errors import ErrorCode, ProtocolError


class KvshipError(Exception):
    """Base of everything kvship raises to its users."""


class DaemonUnavailable(KvshipError):
    """The local daemon could not be reached (not running, wrong socket path or port)."""


class DaemonConnectionLost(DaemonUnavailable):
    """The connection to the *local* daemon dropped while a call used it (the daemon died,
    restarted, or closed the connection): the transfer on it is over.

    Not the far side: losing the destination daemon is :class:`PeerUnreachable`. A
    :class:`DaemonUnavailable` too, so one ``except DaemonUnavailable`` covers "the local
    daemon is gone" whether it was gone before the call or went during it.
    """


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
    "DaemonConnectionLost",
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
