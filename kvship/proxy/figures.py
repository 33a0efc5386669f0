"""The egress link's live figures, read by the proxy in the background from the daemon
that sends on the link (the router judges their staleness)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp

POLL_S = 0.25


class LinkWatch:
    """The KV link's figures from the daemon that sends on it (``GET /v1/links``)."""

    def __init__(self, control: str | None, peer: str | None) -> None:
        self.control = control
        self.peer = peer
        self.figures: dict[str, Any] | None = None
        self.why = "no link daemon configured" if not control else "not read yet"

    async def watch(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while self.control and not stop.is_set():
            await self.read(session)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_S)

    async def read(self, session: aiohttp.ClientSession) -> None:
        url = f"http://{self.control}/v1/links"
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            self.figures, self.why = None, f"link daemon {self.control}: {type(exc).__name__} {exc}"
            return
        links = body.get("links") if isinstance(body, dict) else None
        if not isinstance(links, list):
            self.figures, self.why = None, f"link daemon {self.control}: no links in answer"
            return
        chosen = [x for x in links if not self.peer or x.get("peer") == self.peer]
        if not chosen:
            self.figures = None
            self.why = f"link daemon {self.control} has no link to {self.peer or 'any peer'}"
            return
        self.figures, self.why = chosen[0], ""
