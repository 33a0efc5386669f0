"""How late the event loop runs: blocking work on a loop shows up here as lag.

A task sleeps a short interval again and again and reports how much later than asked it
woke. One loop serves every transfer of a daemon, so lag is what every transfer waits.
A wake more than ``warn_s`` late is logged (once per cause, by the log's repeat filter),
and with ``dump_after_s`` set, a loop that stays blocked that long has every thread's
traceback written to stderr by :mod:`faulthandler`'s own thread, which runs while the loop
cannot: the log then shows *where* it was stuck, not only that it was.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import sys
import time
from collections.abc import Callable

from .tasks import spawn

log = logging.getLogger("kvship.loop")

WARN_S = 1.0  # a wake this late is a blocked loop, not a busy one
REARM_S = 1.0  # faulthandler starts a thread per arming: re-arm at most this often


class LoopLag:
    def __init__(
        self,
        observe: Callable[[float], None],
        interval_s: float = 0.01,
        *,
        warn_s: float = WARN_S,
        dump_after_s: float | None = None,
    ) -> None:
        self.observe = observe  # called with each sample, in seconds
        self.interval_s = interval_s
        self.warn_s = warn_s
        # faulthandler's timer is one per process: only a process's own daemon sets this.
        self.dump_after_s = dump_after_s
        self.worst_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = spawn(self._run(), "loop-lag")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.dump_after_s is not None:
            faulthandler.cancel_dump_traceback_later()

    async def _run(self) -> None:
        armed_at = -REARM_S
        while True:
            start = time.perf_counter()
            if self.dump_after_s is not None and start - armed_at >= REARM_S:
                # Fires only when no wake re-arms it: the loop was stuck for dump_after_s
                # at least (up to REARM_S more).
                faulthandler.dump_traceback_later(self.dump_after_s + REARM_S, file=sys.stderr)
                armed_at = start
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, time.perf_counter() - start - self.interval_s)
            self.worst_s = max(self.worst_s, lag)
            self.observe(lag)
            if lag >= self.warn_s:
                dumped = self.dump_after_s is not None and lag >= self.dump_after_s
                where = "; every thread's traceback above shows where" if dumped else ""
                log.warning(
                    "the event loop was blocked for %.1f s: every transfer and connection waited%s",
                    lag,
                    where,
                    extra={"cause": "loop blocked"},
                )
