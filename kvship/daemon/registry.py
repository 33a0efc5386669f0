"""Every transfer the daemon runs or holds: by id, by request, the engines waiting for a
request, and a bounded history of finished ones for the control plane.

The registry owns the bookkeeping and nothing else: transfers call back into it when they
are received or finished (callbacks, so they never need to import it).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ..protocol import Complete, ErrorCode
from .metrics import Metrics
from .records import TransferRecord, TransferState

if TYPE_CHECKING:
    from .incoming import Destination, IncomingTransfer
    from .outgoing import OutgoingTransfer

HISTORY = 1000  # finished transfers kept for /v1/transfers
COMPLETED_MAX = 1024  # COMPLETEs remembered for senders that resume after the last one


class TransferRegistry:
    def __init__(self, metrics: Metrics | None = None, history: int = HISTORY) -> None:
        self.metrics = metrics
        self.outgoing: dict[int, OutgoingTransfer] = {}
        self.incoming: dict[int, IncomingTransfer] = {}
        self.by_request: dict[str, IncomingTransfer] = {}
        self.history: OrderedDict[int, TransferRecord] = OrderedDict()
        self._history_max = history
        self._waiters: dict[str, list[asyncio.Future[IncomingTransfer]]] = {}
        # COMPLETEs sent lately, by transfer id: a sender whose connections dropped before
        # the COMPLETE reached it resumes, and gets it again (SPEC §7.7).
        self.completed: OrderedDict[int, Complete] = OrderedDict()

    # ------------------------------------------------------------- adding
    def add_outgoing(self, transfer: OutgoingTransfer) -> None:
        self.outgoing[transfer.id] = transfer
        self._in_flight("out", +1)

    def arriving(self, request_id: str) -> IncomingTransfer | None:
        """The transfer of ``request_id`` still arriving, if any (one at a time)."""
        transfer = self.by_request.get(request_id)
        return transfer if transfer is not None and transfer.state is TransferState.OPEN else None

    def add_incoming(self, transfer: IncomingTransfer) -> None:
        """A new arrival; the engine waiting longest for its request gets it."""
        self.incoming[transfer.id] = transfer
        self.by_request[transfer.request_id] = transfer
        self._in_flight("in", +1)
        for fut in self._waiters.pop(transfer.request_id, []):
            if not fut.done():
                fut.set_result(transfer)
                break

    # ----------------------------------------------------------- claiming
    async def claim(
        self, request_id: str, destination: Destination, timeout: float
    ) -> IncomingTransfer | None:
        """The transfer of ``request_id``, attached to ``destination``; waits up to
        ``timeout`` s for one nobody else claimed (None if none came)."""
        transfer = self.by_request.get(request_id)
        if transfer is None or not transfer.claimable:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[IncomingTransfer] = loop.create_future()
            waiting = self._waiters.setdefault(request_id, [])
            waiting.append(fut)
            try:
                transfer = await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                return None
            finally:
                if fut in waiting:
                    waiting.remove(fut)
                if not waiting and self._waiters.get(request_id) is waiting:
                    del self._waiters[request_id]
        transfer.attach(destination)
        return transfer

    def waiting(self, request_id: str) -> int:
        return len(self._waiters.get(request_id, ()))

    # ------------------------------------------------------------ endings
    def received(self, transfer: IncomingTransfer) -> None:
        self._in_flight("in", -1)
        if transfer.completion is not None:
            self.completed[transfer.id] = transfer.completion
            while len(self.completed) > COMPLETED_MAX:
                self.completed.popitem(last=False)

    def outgoing_finished(self, transfer: OutgoingTransfer) -> None:
        if self.outgoing.pop(transfer.id, None) is not None:
            self._in_flight("out", -1)
        self._record(transfer.record)

    def incoming_finished(self, transfer: IncomingTransfer, was_open: bool) -> None:
        self.incoming.pop(transfer.id, None)
        if self.by_request.get(transfer.request_id) is transfer:
            del self.by_request[transfer.request_id]
        if was_open:
            self._in_flight("in", -1)
        self._record(transfer.record)

    def _record(self, record: TransferRecord) -> None:
        if self.metrics is not None:
            outcome = str(record.state)
            self.metrics.transfers.labels(record.direction, outcome).inc()
            if record.finished is not None:
                seconds = max(0.0, record.finished - record.started)
                self.metrics.transfer_seconds.labels(record.direction, outcome).observe(seconds)
        self.history[record.transfer_id] = record
        while len(self.history) > self._history_max:
            self.history.popitem(last=False)

    def _in_flight(self, direction: str, delta: int) -> None:
        if self.metrics is not None:
            self.metrics.in_flight.labels(direction).inc(delta)

    # ------------------------------------------------------------ queries
    def finishing(self) -> tuple[IncomingTransfer | None, set[object]]:
        """The transfer an engine has waited for longest that still lacks chunks (arrival
        order), and the peer connections carrying the missing chunks of its first
        incomplete layer: the staging budget never starves them
        (:mod:`kvship.daemon.budget`)."""
        for transfer in self.incoming.values():  # a dict keeps arrival order
            conns = transfer.finishing_connections()
            if conns:
                return transfer, conns
        return None, set()

    def resume_paused_senders(self) -> None:
        """Staging has room again: every transfer paused by HOLD may go on (§7.8)."""
        for transfer in list(self.incoming.values()):
            transfer.resume_sender()

    def running(self) -> bool:
        """Whether any transfer still moves bytes (what a drain waits for)."""
        return bool(self.outgoing) or any(
            t.state is TransferState.OPEN for t in self.incoming.values()
        )

    def reap(self, retention_s: float, now: float | None = None) -> list[IncomingTransfer]:
        """Fail incoming transfers idle for ``retention_s``: unclaimed ones, stalled ones,
        and orphans (claimed by a delivery that ended without finishing them)."""
        now = time.monotonic() if now is None else now
        reaped = []
        for transfer in list(self.incoming.values()):
            idle = now - transfer.last_activity
            if idle > retention_s and not transfer.being_delivered:
                transfer.fail(ErrorCode.TIMEOUT, f"unclaimed or stalled for {idle:.0f} s")
                reaped.append(transfer)
        return reaped

    def newly_stalled(self, after_s: float, now: float | None = None) -> list[IncomingTransfer]:
        """Arriving transfers that moved nothing for ``after_s`` with their connections up,
        each returned once (the daemon reports them; the reaper still decides)."""
        now = time.monotonic() if now is None else now
        stalled = []
        for transfer in self.incoming.values():
            if (
                transfer.state is TransferState.OPEN
                and not transfer.suspended
                and not transfer.stall_reported
                and now - transfer.last_activity > after_s
            ):
                transfer.stall_reported = True
                stalled.append(transfer)
        return stalled

    def reap_suspended(self, resume_timeout_s: float, now: float | None = None) -> None:
        """Fail incoming transfers whose sender lost every connection and did not resume
        within ``resume_timeout_s`` (SPEC §7.7): the engine gets TIMEOUT, not a hang."""
        now = time.monotonic() if now is None else now
        for transfer in list(self.incoming.values()):
            idle = now - transfer.last_activity
            if transfer.suspended and idle > resume_timeout_s:
                transfer.fail(
                    ErrorCode.TIMEOUT,
                    f"its sender lost its connections and did not resume within {idle:.0f} s",
                    tell_sender=False,
                )

    def to_json(self) -> list[dict[str, Any]]:
        transfers: tuple[OutgoingTransfer | IncomingTransfer, ...] = (
            *self.outgoing.values(),
            *self.incoming.values(),
        )
        live = [t.record for t in transfers]
        records = {r.transfer_id: r for r in (*self.history.values(), *live)}
        return [r.to_json() for r in records.values()]
