"""Receive windows that follow the bandwidth-delay product (SPEC §10.1).

A connection's credit window caps it at ``window / RTT``: 8 MiB carries 0.8 Gbit/s at
80 ms. Like TCP's receive autotuning, each peer connection this daemon receives on measures
what it consumed in the last round trip and sizes its window to twice that, between
``window_bytes`` and ``window_max_bytes``. A window that binds keeps being used whole, so it
doubles each round; once something else binds (the rate, the engine, the CPU) it settles
at twice what that lets through. It grows by granting more credit than was consumed and
shrinks by granting less, once the need stayed lower for several round trips.

Every window the peers hold can land in staging at once (an engine that stops reading), so
the growth of all of them together is lent from one pool the size of ``staging_bytes``:
peak memory stays bounded by the configuration, whatever the links do.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from .budget import Gauge

MIN_ROUND_S = 0.005  # below this a round is noise: loopback, or no RTT reading yet
GROWTH = 2.0  # window = GROWTH x bytes per round trip, as TCP's receive autotuning
# The window follows the largest need of the last ROUNDS round trips: one round that
# caught half a burst must not shrink it (it would oscillate), a lasting drop does.
ROUNDS = 8


class WindowPool:
    """How far all peer connections' windows may grow past ``window_bytes`` together."""

    def __init__(self, limit: int, gauge: Gauge | None = None) -> None:
        self.limit = limit
        self.lent = 0
        self._gauge = gauge

    def lend(self, want: int) -> int:
        """Up to ``want`` bytes of growth, as much as the pool has left."""
        n = max(0, min(want, self.limit - self.lent))
        self.lent += n
        self._show()
        return n

    def repay(self, n: int) -> None:
        self.lent -= n
        self._show()

    def _show(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self.lent)


class ReceiveWindow:
    """One peer connection's window: a :class:`kvship.aio.framed.GrantPolicy`."""

    def __init__(
        self,
        initial: int,
        maximum: int,
        pool: WindowPool,
        rtt_s: Callable[[], float | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.initial = initial
        self.maximum = max(initial, maximum)
        self.pool = pool
        self.rtt_s = rtt_s  # the kernel's smoothed RTT of this connection
        self.clock = clock
        self.extra = 0  # granted beyond ``initial`` and not yet kept back
        self.target_extra = 0
        self._round_start: float | None = None
        self._round_bytes = 0
        self._round_s = MIN_ROUND_S
        self._rtt: float | None = None
        self._wanted: deque[int] = deque(maxlen=ROUNDS)

    @property
    def window(self) -> int:
        return self.initial + self.extra

    def adjust(self, consumed: int) -> int:
        now = self.clock()
        if self._round_start is None:  # bytes consumed from now on are what a round saw
            self._round_start = now
        else:
            self._round_bytes += consumed
            elapsed = now - self._round_start
            if elapsed >= self._round_s:
                self._retune(self._round_bytes / elapsed)
                self._round_start, self._round_bytes = now, 0
        grant = consumed
        if self.target_extra > self.extra:
            grow = self.pool.lend(self.target_extra - self.extra)
            self.extra += grow
            grant += grow
        elif self.target_extra < self.extra:
            keep = min(grant, self.extra - self.target_extra)
            self.extra -= keep
            self.pool.repay(keep)
            grant -= keep
        return grant

    def _retune(self, rate_Bps: float) -> None:
        rtt = self.rtt_s()
        if rtt is not None and rtt > 0:
            self._rtt = rtt
        if self._rtt is None:
            return
        self._round_s = max(MIN_ROUND_S, self._rtt)
        self._wanted.append(int(GROWTH * rate_Bps * self._rtt))
        wanted = max(self._wanted)
        self.target_extra = min(max(wanted, self.initial), self.maximum) - self.initial

    def close(self) -> None:
        self.pool.repay(self.extra)
        self.extra = self.target_extra = 0
