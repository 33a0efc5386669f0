"""How late the event loop runs: blocking work on a loop shows up here as lag.

A task sleeps a short interval again and again and reports how much later than asked it
woke. One loop serves every transfer of a daemon, so lag is what every transfer waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from .tasks import spawn


class LoopLag:
    def __init__(self, observe: Callable[[float], None], interval_s: float = 0.01) -> None:
        self.observe = observe  # called with each sample, in seconds
        self.interval_s = interval_s
        self.worst_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = spawn(self._run(), "loop-lag")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, time.perf_counter() - start - self.interval_s)
            self.worst_s = max(self.worst_s, lag)
            self.observe(lag)
