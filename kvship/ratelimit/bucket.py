"""A token bucket in bytes on the wire: the accounting only, no waiting.

Waiting, ordering and fairness live in :mod:`kvship.ratelimit.scheduler`; keeping the
bucket synchronous lets one request take from two buckets (its link's and the global
egress one) atomically, and lets tests drive it with any clock.

Requests larger than the burst
    A 4 MiB chunk may meet a smaller burst. Such a request is granted once the bucket is
    *full* (it holds ``burst`` tokens) and then leaves the bucket in debt (``burst - n``,
    negative); later requests wait until the debt is paid back at the configured rate. So
    the long-run rate stays exact; only the 1 s peak grows to ``rate + max(burst, chunk)``.
    Configure ``burst >= chunk`` (better 2 x chunk) for the strict ``rate + burst`` bound.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any

from .rates import UNLIMITED, check_burst, check_rate

Clock = Callable[[], float]

_EPS_BYTES = 1e-3  # float slack when comparing a refilled level with what is needed
_EPS_REL = 1e-9


class TokenBucket:
    """Classic token bucket (starts full) with limits that may change at run time.

    ``rate_bytes_per_s`` is ``None`` or ``inf`` for unlimited. Not thread-safe: use it from
    the event loop's thread (signal handlers via ``loop.add_signal_handler``).
    """

    def __init__(
        self, rate_bytes_per_s: float | None, burst_bytes: int, clock: Clock = time.monotonic
    ) -> None:
        self._rate = check_rate(rate_bytes_per_s)
        self._burst = check_burst(burst_bytes)
        self._clock = clock
        self._level = float(self._burst)
        self._stamp = clock()
        self._listeners: list[Callable[[], Any] | weakref.WeakMethod[Callable[[], Any]]] = []
        self._arbiter: Any = None  # owned by scheduler.py: who orders the waiters here

    # ------------------------------------------------------------ settings
    @property
    def rate(self) -> float:
        """Bytes/s; ``math.inf`` when unlimited."""
        return self._rate

    @property
    def burst(self) -> int:
        return self._burst

    @property
    def unlimited(self) -> bool:
        return self._rate == UNLIMITED

    @property
    def clock(self) -> Clock:
        return self._clock

    def set_limits(self, rate_bytes_per_s: float | None, burst_bytes: int) -> None:
        """Change rate and burst now. Tokens accrued so far count at the old rate; the
        level is clamped to the new burst (debt is kept). Waiters re-plan at once. On a bad
        value RateError is raised and nothing changes."""
        rate = check_rate(rate_bytes_per_s)
        burst = check_burst(burst_bytes)
        self._refill(self._clock())
        self._rate, self._burst = rate, burst
        self._level = float(burst) if rate == UNLIMITED else min(self._level, float(burst))
        self._notify()

    def add_listener(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` after every :meth:`set_limits` (bound methods held weakly)."""
        if hasattr(callback, "__self__") and hasattr(callback, "__func__"):
            self._listeners.append(weakref.WeakMethod(callback))
        else:
            self._listeners.append(callback)

    def _notify(self) -> None:
        alive: list[Callable[[], Any] | weakref.WeakMethod[Callable[[], Any]]] = []
        calls: list[Callable[[], Any]] = []
        for entry in self._listeners:
            func = entry() if isinstance(entry, weakref.WeakMethod) else entry
            if func is not None:
                alive.append(entry)
                calls.append(func)
        self._listeners = alive
        for func in calls:
            func()

    # ------------------------------------------------------------ tokens
    def _refill(self, now: float) -> None:
        if self._rate == UNLIMITED:
            self._level = float(self._burst)
        elif now > self._stamp:
            self._level = min(float(self._burst), self._level + (now - self._stamp) * self._rate)
        self._stamp = max(self._stamp, now)

    def level(self, now: float | None = None) -> float:
        """Tokens (bytes) now; negative while in debt."""
        self._refill(self._clock() if now is None else now)
        return self._level

    def _deficit(self, nbytes: float, now: float | None) -> float:
        need = min(float(nbytes), float(self._burst))
        deficit = need - self.level(now)
        return 0.0 if deficit <= _EPS_BYTES + _EPS_REL * need else deficit

    def delay(self, nbytes: float, now: float | None = None) -> float:
        """Seconds until ``nbytes`` may be taken (0.0: now). Requests above the burst need
        a full bucket (see the module doc)."""
        if self._rate == UNLIMITED:
            return 0.0
        deficit = self._deficit(nbytes, now)
        return 0.0 if deficit == 0.0 else deficit / self._rate

    def ready(self, nbytes: float, now: float | None = None) -> bool:
        return self.delay(nbytes, now) == 0.0

    def take(self, nbytes: float, now: float | None = None) -> None:
        """Remove ``nbytes`` tokens unconditionally (callers check :meth:`ready` first)."""
        self._refill(self._clock() if now is None else now)
        if self._rate != UNLIMITED:
            self._level -= nbytes

    def try_take(self, nbytes: float, now: float | None = None) -> bool:
        """Take ``nbytes`` if they may go now; False (and nothing taken) otherwise."""
        if not self.ready(nbytes, now):
            return False
        self.take(nbytes, now)
        return True

    def give_back(self, nbytes: float, now: float | None = None) -> None:
        """Return tokens of a grant that was never used (capped at the burst)."""
        self._refill(self._clock() if now is None else now)
        self._level = min(float(self._burst), self._level + nbytes)

    def __repr__(self) -> str:
        rate = "unlimited" if self.unlimited else f"{self._rate:.6g} B/s"
        return f"TokenBucket(rate={rate}, burst={self._burst}, level={self._level:.6g})"
