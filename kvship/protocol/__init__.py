"""kvship wire protocol v1, sans-IO (no sockets, no asyncio): see protocol/SPEC.md."""

from .connection import Connection, Limits, PayloadSink, State
from .digest import TransferDigest, chunk_checksum, digest_of_checksums
from .errors import ErrorCode, ProtocolError
from .frames import *  # noqa: F403
from .frames import __all__ as _frame_names

__all__ = [
    "Connection",
    "ErrorCode",
    "Limits",
    "PayloadSink",
    "ProtocolError",
    "State",
    "TransferDigest",
    "chunk_checksum",
    "digest_of_checksums",
    *_frame_names,
]
