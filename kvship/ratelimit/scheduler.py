"""Send permission for chunks: one :class:`Scheduler` per peer link, over two buckets.

Every grant takes its bytes from the link's bucket *and* the shared global egress bucket,
in one step, so the lower of the two limits governs and neither is overdrawn.

Order of service
    * On one link, every waiting ``latency`` request goes before any ``bulk`` one.
    * Within a class, transfers share bytes fairly: start-time fair queueing (a byte-fair
      round robin). Each transfer carries a tag = bytes granted to it; the backlogged
      transfer with the lowest tag goes next, and a transfer that becomes backlogged starts
      at the class's current tag, so it neither starves the others nor is starved by a
      transfer that queued 100 chunks first. Backlogged transfers stay within one chunk.
    * Across links (the global bucket): a link whose own bucket allows its next request
      joins a FIFO; the global bucket serves that FIFO in order, ``latency`` heads first.
      A link held back by its own limit never blocks the others.

Waiting is driven by one task per global bucket that sleeps until the next instant a
grant becomes possible (or until new work, a cancellation or a limit change re-plans it).
Clock and sleep are injectable so that tests run on a virtual clock.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Literal

from .bucket import Clock, TokenBucket

Priority = Literal["latency", "bulk"]
Sleep = Callable[[float], Awaitable[object]]
OnGrant = Callable[[Hashable, int, str, float], object]
"""``on_grant(transfer_key, nbytes, priority, when)``; ``nbytes < 0`` for a refund."""

log = logging.getLogger(__name__)

LATENCY: Priority = "latency"
BULK: Priority = "bulk"
_RANK: dict[str, int] = {LATENCY: 0, BULK: 1}
_MIN_SLEEP = 1e-6  # never sleep "0 s" in a loop: keeps float round-off from spinning
MAX_CATCH_UP_S = 0.005
"""Timer lateness up to this is accounted as if the wake-up had been on time."""


class SchedulerClosed(RuntimeError):
    """The scheduler (its peer link) was closed while the request waited."""


class _Request:
    __slots__ = ("flow", "future", "nbytes", "priority", "queued")

    def __init__(self, flow: _Flow, nbytes: int, priority: str, future: asyncio.Future[None]):
        self.flow = flow
        self.nbytes = nbytes
        self.priority = priority
        self.future = future
        self.queued = True


class _Flow:
    """One transfer's queue within one priority class."""

    __slots__ = ("key", "queue", "seq", "tag")

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.queue: deque[_Request] = deque()
        self.tag = 0.0  # bytes of service, in the class's virtual time
        self.seq = 0  # breaks tag ties in round-robin order


class _Class:
    """Start-time fair queueing over the transfers of one priority class."""

    def __init__(self) -> None:
        self.flows: dict[Hashable, _Flow] = {}
        self.vtime = 0.0  # start tag of the request served last
        self.backlog = 0  # queued requests
        self._seq = itertools.count()

    def push(
        self, key: Hashable, nbytes: int, priority: str, fut: asyncio.Future[None]
    ) -> _Request:
        flow = self.flows.get(key)
        if flow is None:
            flow = self.flows[key] = _Flow(key)
        if not flow.queue:
            flow.tag = max(flow.tag, self.vtime)
            flow.seq = next(self._seq)
        req = _Request(flow, nbytes, priority, fut)
        flow.queue.append(req)
        self.backlog += 1
        return req

    def head(self) -> _Request | None:
        """The request this class would serve next (drops requests cancelled meanwhile)."""
        best: _Flow | None = None
        for key, flow in list(self.flows.items()):
            while flow.queue and flow.queue[0].future.done():
                self._unqueue(flow.queue.popleft())
            if not flow.queue:
                if flow.tag <= self.vtime:
                    del self.flows[key]  # no service advantage left to remember
                continue
            if best is None or (flow.tag, flow.seq) < (best.tag, best.seq):
                best = flow
        return best.queue[0] if best is not None else None

    def pop(self, req: _Request) -> None:
        """``req`` (the head) is granted: charge its transfer."""
        flow = req.flow
        flow.queue.popleft()
        self._unqueue(req)
        self.vtime = flow.tag
        flow.tag += req.nbytes
        flow.seq = next(self._seq)

    def remove(self, req: _Request) -> None:
        if req.queued:
            req.flow.queue.remove(req)
            self._unqueue(req)

    def _unqueue(self, req: _Request) -> None:
        req.queued = False
        self.backlog -= 1

    def drain(self) -> list[_Request]:
        reqs = [r for flow in self.flows.values() for r in flow.queue]
        for req in reqs:
            req.queued = False
        self.flows.clear()
        self.backlog = 0
        return reqs


class _Egress:
    """Orders the waiters of all schedulers that share one global bucket, and drives time."""

    def __init__(self, bucket: TokenBucket | None, clock: Clock) -> None:
        self.bucket = bucket
        self.clock = clock
        self.members: dict[Scheduler, None] = {}  # schedulers with waiters, in arrival order
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._kick: asyncio.Future[None] | None = None
        self._deadline = math.inf
        self._sleep: Sleep = asyncio.sleep
        if bucket is not None:
            bucket.add_listener(self.replan)

    @classmethod
    def of(cls, bucket: TokenBucket | None, clock: Clock) -> _Egress:
        if bucket is None:
            return cls(None, clock)
        if bucket._arbiter is None:
            bucket._arbiter = cls(bucket, bucket.clock)
        return bucket._arbiter

    def dispatch(self, at: float | None = None) -> float | None:
        """Grant all that may go now (or at ``at``, a past instant); the time the next grant
        may become possible, or None when nobody waits."""
        real = self.clock()
        now = real if at is None else at
        while True:
            best: tuple[Scheduler, _Request] | None = None
            best_rank = (2, 0)
            deadline = math.inf
            for sched in list(self.members):
                req = sched._head()
                if req is None:
                    del self.members[sched]
                    sched._ready_seq = None
                    continue
                wait = sched.link.delay(req.nbytes, now)
                if wait > 0:
                    deadline = min(deadline, now + wait)
                    continue
                if sched._ready_seq is None:
                    sched._ready_seq = next(self._seq)  # joins the global FIFO
                rank = (_RANK[req.priority], sched._ready_seq)
                if rank < best_rank:
                    best, best_rank = (sched, req), rank
            if best is None:
                return deadline if self.members else None
            sched, req = best
            if self.bucket is not None:
                wait = self.bucket.delay(req.nbytes, now)
                if wait > 0:
                    return min(deadline, now + wait)
                self.bucket.take(req.nbytes, now)
            sched.link.take(req.nbytes, now)
            sched._grant(req, real)

    def poke(self, deadline: float | None, sleep: Sleep) -> None:
        """Make sure the driver runs and wakes by ``deadline``."""
        if deadline is None:
            return
        if self._task is None or self._task.done():
            self._sleep = sleep
            self._task = asyncio.get_running_loop().create_task(self._drive())
        elif deadline < self._deadline:
            self._wake()

    def replan(self) -> None:
        """Something changed (limits, a cancelled waiter): grant what may go, re-plan."""
        if self.dispatch() is not None:
            self._wake()

    def _wake(self) -> None:
        if self._kick is not None and not self._kick.done():
            self._kick.set_result(None)

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        planned = math.inf
        try:
            while True:
                now = self.clock()
                if planned < now:
                    # The timer fired late: grant what was due at the planned instant, as of
                    # that instant, so that wake-up latency costs no throughput (else a full
                    # bucket would spill those tokens). A long stall is not caught up on.
                    self.dispatch(max(planned, now - MAX_CATCH_UP_S))
                deadline = self.dispatch()
                if deadline is None:
                    return
                planned = deadline
                self._deadline = deadline
                self._kick = loop.create_future()
                sleeper = asyncio.ensure_future(
                    self._sleep(max(deadline - self.clock(), _MIN_SLEEP))
                )
                try:
                    await asyncio.wait((sleeper, self._kick), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    sleeper.cancel()
                    self._kick = None
                    self._deadline = math.inf
        except BaseException as exc:
            # Nobody may wait forever on a dead driver.
            for sched in list(self.members):
                sched._fail(RuntimeError(f"rate limiter stopped: {exc!r}"))
            raise
        finally:
            if self._task is me:
                self._task = None


class Scheduler:
    """Hands out send permission on one peer link, chunk by chunk, across transfers.

    ``link_bucket`` belongs to this scheduler alone; ``global_bucket`` (egress) may be
    shared by the schedulers of all links, which must then share its clock. ``sleep`` is
    what waiting uses (``asyncio.sleep``, or a virtual clock's). ``on_grant`` is called
    at each grant decision (for metrics and measurements; it must be quick and not block).
    """

    def __init__(
        self,
        link_bucket: TokenBucket,
        global_bucket: TokenBucket | None = None,
        *,
        sleep: Sleep = asyncio.sleep,
        name: str = "",
        on_grant: OnGrant | None = None,
    ) -> None:
        if global_bucket is link_bucket:
            raise ValueError("the link bucket cannot also be the global bucket")
        if global_bucket is not None and global_bucket.clock != link_bucket.clock:
            raise ValueError("link and global buckets must share one clock")
        self.link = link_bucket
        self.global_bucket = global_bucket
        self.name = name
        self.on_grant = on_grant
        self._sleep = sleep
        # Keyed by the priority strings that acquire() has checked against _RANK.
        self._classes: dict[str, _Class] = {LATENCY: _Class(), BULK: _Class()}
        self._egress = _Egress.of(global_bucket, link_bucket.clock)
        self._ready_seq: int | None = None  # place in the global FIFO while link-ready
        self._closed = False
        self.granted_bytes: dict[str, int] = {LATENCY: 0, BULK: 0}
        self.granted_requests: dict[str, int] = {LATENCY: 0, BULK: 0}
        link_bucket.add_listener(self._egress.replan)

    async def acquire(self, transfer_key: Hashable, nbytes: int, priority: str = BULK) -> None:
        """Wait until ``nbytes`` may go on the wire for ``transfer_key``.

        Cancelling the waiting task gives everything back: a queued request leaves the
        queue, and a request granted in the same instant returns its tokens.
        """
        if priority not in _RANK:
            raise ValueError(f"priority must be 'latency' or 'bulk', got {priority!r}")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be a whole number >= 0, got {nbytes!r}")
        if self._closed:
            raise SchedulerClosed(f"scheduler {self.name!r} is closed")
        if nbytes == 0:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        req = self._classes[priority].push(transfer_key, nbytes, priority, fut)
        self._egress.members.setdefault(self, None)
        deadline = self._egress.dispatch()
        if not fut.done():
            self._egress.poke(deadline, self._sleep)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._refund(req)  # granted, but the caller is gone
            else:
                self._classes[priority].remove(req)
                self._egress.replan()  # it may have held the head of the line
            raise

    # ------------------------------------------------------------ introspection
    def waiting(self, priority: str | None = None) -> int:
        """Requests waiting (in one class, or both)."""
        if priority is not None:
            return self._classes[priority].backlog
        return sum(c.backlog for c in self._classes.values())

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Fail every waiting request with SchedulerClosed and refuse new ones."""
        self._closed = True
        self._fail(SchedulerClosed(f"scheduler {self.name!r} is closed"))
        self._egress.replan()

    def __repr__(self) -> str:
        return f"Scheduler({self.name!r}, link={self.link!r}, waiting={self.waiting()})"

    # ------------------------------------------------------------ for _Egress
    def _head(self) -> _Request | None:
        for klass in self._classes.values():
            req = klass.head()
            if req is not None:
                return req
        return None

    def _grant(self, req: _Request, when: float) -> None:
        self._classes[req.priority].pop(req)
        self._ready_seq = None  # back of the global FIFO for the next one
        self.granted_bytes[req.priority] += req.nbytes
        self.granted_requests[req.priority] += 1
        req.future.set_result(None)
        self._report(req, req.nbytes, when)

    def _refund(self, req: _Request) -> None:
        now = self.link.clock()
        self.link.give_back(req.nbytes, now)
        if self.global_bucket is not None:
            self.global_bucket.give_back(req.nbytes, now)
        self.granted_bytes[req.priority] -= req.nbytes
        self.granted_requests[req.priority] -= 1
        self._report(req, -req.nbytes, now)
        self._egress.replan()

    def _report(self, req: _Request, nbytes: int, when: float) -> None:
        if self.on_grant is not None:
            try:
                self.on_grant(req.flow.key, nbytes, req.priority, when)
            except Exception:  # a metrics hook must not stop the link
                log.exception("on_grant hook of scheduler %r failed", self.name)

    def _fail(self, exc: BaseException) -> None:
        for klass in self._classes.values():
            for req in klass.drain():
                if not req.future.done():
                    req.future.set_exception(exc)
        self._egress.members.pop(self, None)
        self._ready_seq = None
