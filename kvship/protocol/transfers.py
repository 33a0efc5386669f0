"""Per-connection bookkeeping of transfers, one table per direction (SPEC §7.3, §7.4).

* **receiving** (the peer sent OPEN): open until END or ABORT (either way) arrives or goes
  out; the ABORTed ones are remembered (``FORGOTTEN_MAX``) so their late chunks are read,
  credited and dropped instead of failing the connection.
* **sending** (this side sent OPEN): ``OPEN sent -> chunks -> END sent -> (COMPLETE or
  ABORT)``. Open ones count against the acceptor's ``max_transfers`` until END or ABORT;
  ENDed ones wait for their COMPLETE; ABORTed ones (sent or received) may still see late
  CHUNK/END from a racing task, which go out unchecked (the receiver drops them, §7.3).

The two directions are separate id spaces: on an engine connection the engine picks its
puts' ids and the daemon its deliveries' ids.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from .constants import CAP_CODECS, CAP_DEDUP_TAIL, CODEC_RAW, KNOWN_CODECS
from .errors import ErrorCode, ProtocolError
from .geometry import check_place, chunk_table
from .meta import Open
from .peer_frames import ChunkMeta

FORGOTTEN_MAX = 1024  # ended transfers whose late frames are still dropped quietly


@dataclass(slots=True)
class Receiving:
    """A transfer the peer opened here (one stripe of it)."""

    open: Open
    starts: list[int]
    chunks_seen: int = 0
    open_check: int = 0  # of the OPEN body as it arrived (CAP_OPEN_CHECK)


@dataclass(slots=True)
class Sending:
    """A transfer this side opened here (one stripe of it)."""

    open: Open
    starts: list[int]
    sent: bytearray = field(default_factory=bytearray)  # one bit per chunk index
    chunks_sent: int = 0
    open_check: int = 0  # of the OPEN body as it went out (CAP_OPEN_CHECK)

    @classmethod
    def of(cls, frame: Open, open_check: int = 0) -> Sending:
        starts = chunk_table(frame.layers, frame.chunk_size)
        return cls(frame, starts, bytearray((starts[-1] + 7) // 8), open_check=open_check)

    def was_sent(self, index: int) -> bool:
        return bool(self.sent[index >> 3] & (1 << (index & 7)))

    def mark_sent(self, index: int) -> None:
        self.sent[index >> 3] |= 1 << (index & 7)
        self.chunks_sent += 1


class Recent:
    """A bounded, insertion-ordered set of transfer ids (the oldest fall out)."""

    __slots__ = ("_ids", "limit")

    def __init__(self, limit: int = FORGOTTEN_MAX) -> None:
        self._ids: OrderedDict[int, None] = OrderedDict()
        self.limit = limit

    def add(self, tid: int) -> None:
        self._ids[tid] = None
        self._ids.move_to_end(tid)
        while len(self._ids) > self.limit:
            self._ids.popitem(last=False)

    def discard(self, tid: int) -> None:
        self._ids.pop(tid, None)

    def __contains__(self, tid: object) -> bool:
        return tid in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> tuple[int, ...]:
        return tuple(self._ids)


def check_chunk(
    opened: Open, starts: list[int], meta: ChunkMeta, wire_length: int, capabilities: int
) -> None:
    """A chunk's meta against its transfer's layout and the negotiated codecs (§5.4), in
    the SPEC's order: layer/index, offset/length, codec, wire length."""
    check_place(
        opened.layers,
        starts,
        opened.chunk_size,
        meta.chunk_index,
        meta.layer,
        meta.offset,
        meta.raw_length,
        tails=bool(capabilities & CAP_DEDUP_TAIL),
    )
    if meta.codec == CODEC_RAW:
        if wire_length != meta.raw_length:
            raise ProtocolError(
                ErrorCode.MALFORMED_FRAME,
                f"raw chunk carries {wire_length} B, raw_length is {meta.raw_length}",
            )
    elif meta.codec not in KNOWN_CODECS or not capabilities & CAP_CODECS:
        raise ProtocolError(ErrorCode.UNSUPPORTED_CODEC, f"chunk codec {meta.codec}")
    elif not 0 < wire_length < meta.raw_length:
        # Coded chunks exist only because they are smaller (else they travel raw).
        raise ProtocolError(
            ErrorCode.MALFORMED_FRAME,
            f"codec {meta.codec} chunk of {wire_length} B for {meta.raw_length} raw bytes",
        )
