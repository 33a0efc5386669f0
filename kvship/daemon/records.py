"""What the control plane shows of a transfer, shared by both directions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class TransferState(StrEnum):
    """Where a transfer is; the values are what /v1/transfers and /metrics show."""

    OPEN = "open"  # running: chunks still coming (in) or going (out)
    RECEIVED = "received"  # in: every byte here and verified, not yet handed to an engine
    COMPLETE = "complete"  # out: the peer acknowledged; in: delivered to an engine
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (TransferState.COMPLETE, TransferState.FAILED)


@dataclass
class TransferRecord:
    transfer_id: int
    direction: str  # "out" (engine -> peer) or "in" (peer -> engine)
    request_id: str
    peer: str
    total_bytes: int
    n_chunks: int
    n_layers: int
    state: TransferState = TransferState.OPEN
    bytes_done: int = 0
    skipped_bytes: int = 0  # not sent: the receiver held them already (dedup)
    chunks_done: int = 0
    error: str = ""
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def finish(self, state: TransferState, error: str = "") -> None:
        if self.finished is None:
            self.state, self.error, self.finished = state, error, time.time()

    def to_json(self) -> dict[str, Any]:
        end = self.finished or time.time()
        seconds = max(end - self.started, 1e-9)
        return {
            "transfer_id": f"{self.transfer_id:016x}",
            "direction": self.direction,
            "request_id": self.request_id,
            "peer": self.peer,
            "state": str(self.state),
            "total_bytes": self.total_bytes,
            "bytes_done": self.bytes_done,
            "skipped_bytes": self.skipped_bytes,
            "n_chunks": self.n_chunks,
            "chunks_done": self.chunks_done,
            "n_layers": self.n_layers,
            "seconds": round(seconds, 6),
            "goodput_GBps": round(self.bytes_done / seconds / 1e9, 4),
            "error": self.error,
        }
