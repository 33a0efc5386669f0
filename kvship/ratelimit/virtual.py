"""A virtual clock for asyncio code that takes its clock and sleep as parameters.

Time stands still while any task can run; when every task waits, the clock jumps to the
earliest pending :meth:`VirtualClock.sleep` deadline and wakes those sleepers. Ten virtual
seconds of rate limiting then take milliseconds and come out the same on every run, which
is what the unit tests and the planner's simulator need.

It drives only sleeps made through it: code that uses real timers (``asyncio.sleep``,
``wait_for`` with a timeout) in the same loop is not accelerated.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

_SPINS_WITHOUT_READY_QUEUE = 64  # event loops that hide their ready queue (uvloop)
_MAX_SPINS = 1_000_000


class VirtualClock:
    """Use as ``TokenBucket(..., clock=vc)`` and ``Scheduler(..., sleep=vc.sleep)``."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self._now

    def now(self) -> float:
        return self._now

    async def sleep(self, delay: float) -> None:
        """Sleep ``delay`` virtual seconds (``<= 0``: just yield once)."""
        if not delay > 0:  # also NaN
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self._now + delay, next(self._seq), fut))
        await fut

    def jump(self, seconds: float) -> None:
        """Move time on *without* waking anybody: what a late real wake-up looks like."""
        self._now += max(0.0, seconds)

    @property
    def next_deadline(self) -> float | None:
        """When the next live sleeper wakes, or None."""
        self._prune()
        return self._timers[0][0] if self._timers else None

    async def settle(self) -> None:
        """Yield until no other task can run (every task waits on a future or a sleep)."""
        loop = asyncio.get_running_loop()
        ready = getattr(loop, "_ready", None)
        if ready is None:
            for _ in range(_SPINS_WITHOUT_READY_QUEUE):
                await asyncio.sleep(0)
            return
        await asyncio.sleep(0)
        for _ in range(_MAX_SPINS):
            if not ready:
                return
            await asyncio.sleep(0)
        raise RuntimeError("tasks keep running without ever waiting: cannot advance time")

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass, waking every sleeper on the way in order."""
        await self.advance_to(self._now + seconds)

    async def advance_to(self, when: float) -> None:
        await self.settle()
        while (deadline := self.next_deadline) is not None and deadline <= when:
            self._fire()
            await self.settle()
        self._now = max(self._now, when)
        await self.settle()

    async def run(self, aw: Awaitable[T], *, limit: float = math.inf) -> T:
        """Await ``aw`` while driving virtual time; TimeoutError if it would pass ``limit``
        (absolute virtual time), RuntimeError if it waits on something no sleep will end."""
        task = asyncio.ensure_future(aw)
        try:
            while True:
                await self.settle()
                if task.done():
                    return task.result()
                deadline = self.next_deadline
                if deadline is None:
                    raise RuntimeError("deadlock: every task waits and no virtual sleep is due")
                if deadline > limit:
                    self._now = max(self._now, limit)
                    raise TimeoutError(f"still waiting at virtual time {limit}")
                self._fire()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def _prune(self) -> None:
        while self._timers and self._timers[0][2].done():
            heapq.heappop(self._timers)

    def _fire(self) -> None:
        """Jump to the earliest deadline and wake every sleeper due then."""
        self._prune()
        if not self._timers:
            return
        deadline = self._timers[0][0]
        self._now = max(self._now, deadline)
        while self._timers and self._timers[0][0] <= deadline:
            _, _, fut = heapq.heappop(self._timers)
            if not fut.done():
                fut.set_result(None)
