"""The staging budget: received KV held in daemon memory stays under ``staging_bytes``.

A chunk that cannot go straight into an engine's arena waits in daemon memory. Its credit
(the window bytes it used) goes back to the sending peer only while the memory held stays
under the bound; past it, credit waits here, so the sender slows down instead of the
daemon growing.

Credit is per connection and every transfer of a link shares its connections, so credit
withheld for one transfer stops them all. That could deadlock: a budget full of *parts* of
layers (transfers that arrived before their engines, connections that ran ahead of the
others) completes no layer, so none is delivered, so nothing is freed, while the chunks
that would complete one wait for credit. Hence the *finishing* rule, for the transfer an
engine has waited for longest and the connections carrying the missing chunks of its
first incomplete layer (``finishing``, from the registry):

- a chunk of another transfer arriving on one of those connections gets its credit back,
  and that transfer is paused at its sender (HOLD, SPEC §7.8: ``owner.pause_sender``)
  until there is room again or its engine claims it;
- a chunk of that layer (each stripe sends in order) that had to go to daemon memory gets
  its credit back when none of the transfer's layers can be handed over meanwhile
  (``needs_memory_to_finish``; a resumed transfer, say, lands in memory only); otherwise
  its engine's reading frees the room it waits for;
- withheld credit of those connections is granted (``reconsider``) on that same condition,
  when it may have changed: an engine claims a transfer, a layer completes, a delivery
  finds no arena space for any ready layer while incomplete layers hold regions (form b
  of the stall: only finishing one frees space), or memory is freed. A delivery blocked
  by layers its engine has not released yet is not such a case: its reading frees room.

So staging overshoots its bound by at most what was in flight when it filled (a window per
connection, plus what the windows grew: at most ``staging_bytes`` together, daemon.window),
what a HOLD overtakes (another), and the rest of one layer (never above
``staging_bytes``: larger layers are refused at OPEN). Without ``CAP_HOLD`` on the link
the second point cannot apply, and credit is withheld as before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection
from typing import Any, Protocol


class Grantor(Protocol):
    """What the budget needs of a peer connection: the way to return credit."""

    def grant(self, nbytes: int) -> None: ...


class Owner(Protocol):
    """What the budget needs of the transfer a held chunk belongs to."""

    def pause_sender(self, conn: Any) -> bool:
        """Ask the sender to stop sending this transfer, on the peer connection ``conn``
        (True if it is paused now)."""
        ...

    def needs_memory_to_finish(self) -> bool:
        """None of its layers can be handed to its engine now: only memory lets it finish
        one (else its engine's reading frees room, and its chunks may wait for it)."""
        ...


class Gauge(Protocol):
    def set(self, value: float) -> None: ...


Finishing = Callable[[], tuple[Owner | None, Collection[object]]]


def _none_finishing() -> tuple[Owner | None, Collection[object]]:
    return None, ()


def _nothing() -> None:
    pass


class StagingBudget:
    def __init__(
        self,
        limit_bytes: int,
        gauge: Gauge | None = None,
        finishing: Finishing = _none_finishing,
        on_room: Callable[[], None] = _nothing,
    ) -> None:
        self.limit = limit_bytes
        self.staged = 0
        self._gauge = gauge
        self._finishing = finishing
        self._on_room = on_room  # under the bound again: paused senders may go on
        self._deferred: deque[tuple[Grantor, int]] = deque()

    @property
    def deferred_bytes(self) -> int:
        """Credit waiting for room (what a stall report shows)."""
        return sum(n for _, n in self._deferred)

    def hold(self, conn: Grantor, nbytes: int, credit: int, owner: Owner | None = None) -> None:
        """``nbytes`` of ``owner`` now sit in daemon memory; ``credit`` returns when there
        is room, or at once where the finishing rule says so."""
        self.staged += nbytes
        self._show()
        if self.staged <= self.limit and not self._deferred:
            conn.grant(credit)
            return
        if owner is not None and self._finishes(owner, conn):
            conn.grant(credit)
        else:
            self._deferred.append((conn, credit))

    def _finishes(self, owner: Owner, conn: Grantor) -> bool:
        """Past the bound: does this chunk's credit go back at once (the finishing rule)?"""
        transfer, conns = self._finishing()
        if conn not in conns:
            return False
        if owner is transfer:
            return owner.needs_memory_to_finish()
        return owner.pause_sender(conn)

    def unhold(self, nbytes: int) -> None:
        self.staged -= nbytes
        self._show()
        while self._deferred and self.staged <= self.limit:
            conn, credit = self._deferred.popleft()
            conn.grant(credit)
        if self.staged <= self.limit:
            self._on_room()
        self.reconsider()

    def reconsider(self) -> None:
        """Grant the withheld credit of the connections that finish the oldest incomplete
        layer, when that transfer needs memory to finish one (call when that may have
        changed: an engine claimed a transfer, a layer completed or was delivered, memory
        was freed). While its engine can take a completed layer, reading frees the room:
        granting then would let a link faster than the engine fill memory layer by layer."""
        if not self._deferred:
            return
        transfer, conns = self._finishing()
        if not conns or (transfer is not None and not transfer.needs_memory_to_finish()):
            return
        kept: deque[tuple[Grantor, int]] = deque()
        for conn, credit in self._deferred:
            if conn in conns:
                conn.grant(credit)
            else:
                kept.append((conn, credit))
        self._deferred = kept

    def forget(self, conn: Grantor) -> None:
        """A peer connection closed: its deferred credit has nobody to go to."""
        self._deferred = deque((c, n) for c, n in self._deferred if c is not conn)

    def _show(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self.staged)
