"""kvship wire protocol v1, sans-IO (no sockets, no asyncio): see protocol/SPEC.md.

``frames`` (and the modules it gathers) encode and decode; ``connection`` is the state
machine, checking both what arrives and what this side sends; ``states`` and ``roles``
hold its rules as tables; ``transfers`` its per-direction bookkeeping.
"""

from .connection import Connection, Limits, PayloadSink
from .digest import TransferDigest, chunk_checksum, digest_of_checksums
from .errors import ErrorCode, LocalProtocolError, ProtocolError
from .frames import *  # noqa: F403
from .frames import __all__ as _frame_names
from .roles import Role, Side
from .states import TRANSITIONS, Event, State

__all__ = [
    "TRANSITIONS",
    "Connection",
    "ErrorCode",
    "Event",
    "Limits",
    "LocalProtocolError",
    "PayloadSink",
    "ProtocolError",
    "Role",
    "Side",
    "State",
    "TransferDigest",
    "chunk_checksum",
    "digest_of_checksums",
    *_frame_names,
]
