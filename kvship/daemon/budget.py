"""The staging budget: received KV held in daemon memory stays under ``staging_bytes``.

A chunk that cannot go straight into an engine's arena waits in daemon memory. Its credit
(the window bytes it used) goes back to the sending peer only while the memory held stays
under the bound; past it, credit waits here, so the sender slows down instead of the
daemon growing.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from prometheus_client import Gauge


class Grantor(Protocol):
    """What the budget needs of a peer connection: the way to return credit."""

    def grant(self, nbytes: int) -> None: ...


class StagingBudget:
    def __init__(self, limit_bytes: int, gauge: Gauge | None = None) -> None:
        self.limit = limit_bytes
        self.staged = 0
        self._gauge = gauge
        self._deferred: deque[tuple[Grantor, int]] = deque()

    def hold(self, conn: Grantor, nbytes: int, credit: int) -> None:
        """``nbytes`` now sit in daemon memory; ``credit`` returns when there is room."""
        self.staged += nbytes
        self._show()
        if self.staged <= self.limit and not self._deferred:
            conn.grant(credit)
        else:
            self._deferred.append((conn, credit))

    def unhold(self, nbytes: int) -> None:
        self.staged -= nbytes
        self._show()
        while self._deferred and self.staged <= self.limit:
            conn, credit = self._deferred.popleft()
            conn.grant(credit)

    def forget(self, conn: Grantor) -> None:
        """A peer connection closed: its deferred credit has nobody to go to."""
        self._deferred = deque((c, n) for c, n in self._deferred if c is not conn)

    def _show(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self.staged)
