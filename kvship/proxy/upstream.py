"""The engines behind the proxy: a pool of OpenAI-compatible servers, watched in the
background (health, and queue depth from each server's own /metrics), so a request never
waits on a health check."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass

import aiohttp

log = logging.getLogger("kvship.proxy")

POLL_S = 0.5
# vLLM's gauges of requests waiting / running per engine (label sets vary by version).
QUEUE_METRICS = re.compile(r"^vllm:num_requests_(waiting|running)(?:\{[^}]*\})?\s+(\S+)$", re.M)


@dataclass
class Upstream:
    """One engine server: its base URL and what the proxy last saw of it."""

    url: str
    healthy: bool = False
    why: str = "not checked yet"
    waiting: int = 0
    running: int = 0
    in_flight: int = 0  # requests this proxy has open on it
    checked_at: float = 0.0

    @property
    def depth(self) -> int:
        return self.waiting + self.running


class Pool:
    """Servers of one role ("local" PD servers, "remote" prefill servers)."""

    def __init__(self, name: str, urls: list[str]) -> None:
        self.name = name
        self.members = [Upstream(u.rstrip("/")) for u in urls]

    @property
    def healthy(self) -> list[Upstream]:
        return [m for m in self.members if m.healthy]

    def pick(self) -> Upstream | None:
        """The healthy server with the fewest requests open (this proxy's and its queue)."""
        up = self.healthy
        return min(up, key=lambda m: (m.in_flight + m.depth, m.url)) if up else None

    @property
    def queue_depth(self) -> int:
        """Requests waiting or running on the healthy servers, as they report it."""
        return sum(m.depth for m in self.healthy)

    def why_down(self) -> str:
        if not self.members:
            return f"no {self.name} servers configured"
        return "; ".join(f"{m.url}: {m.why}" for m in self.members)

    async def watch(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        """Poll every member until ``stop`` is set."""
        while not stop.is_set():
            await asyncio.gather(*(self._check(session, m) for m in self.members))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_S)

    async def _check(self, session: aiohttp.ClientSession, member: Upstream) -> None:
        timeout = aiohttp.ClientTimeout(total=2.0)
        try:
            async with session.get(member.url + "/health", timeout=timeout) as resp:
                ok = resp.status == 200
            waiting = running = 0
            if ok:
                async with session.get(member.url + "/metrics", timeout=timeout) as resp:
                    text = await resp.text() if resp.status == 200 else ""
                for kind, value in QUEUE_METRICS.findall(text):
                    n = int(float(value))
                    if kind == "waiting":
                        waiting += n
                    else:
                        running += n
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            ok, waiting, running = False, 0, 0
            why = f"{type(exc).__name__}: {exc}"
        else:
            why = "" if ok else "health check answered non-200"
        if member.healthy != ok:
            log.warning("%s server %s is %s %s", self.name, member.url,
                        "up" if ok else "down", why)  # fmt: skip
        member.healthy, member.why = ok, why
        member.waiting, member.running = waiting, running
        member.checked_at = time.time()
