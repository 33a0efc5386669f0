"""The link pool: one :class:`PeerLink` per remote daemon, made on first use, and the rate
limits of every link (per peer, and all links together), changed live or on reload."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from dataclasses import replace
from typing import Any

from ..aio.tasks import spawn
from ..ratelimit import TokenBucket, parse_burst, parse_rate
from .codecpool import CodecPool
from .config import Config
from .kernel import TcpBuffers
from .metrics import Metrics
from .peers import LinkSettings, PeerLink
from .trust import PeerKeys

log = logging.getLogger("kvship.links")

RETRY_MIN_S, RETRY_MAX_S = 0.5, 30.0  # a configured peer's reconnect backoff (with jitter)


class LinkPool:
    def __init__(
        self,
        config: Config,
        codecs: CodecPool,
        metrics: Metrics,
        keys: PeerKeys | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.kernel = TcpBuffers.read()
        self.settings = LinkSettings(
            config.node_name,
            config.connections_per_peer,
            config.connect_timeout_s,
            config.resume_timeout_s,
            keys,
            tls,
            config.warmup_bytes,
            config.max_connections_per_peer,
            self.kernel,
        )
        self.codecs = codecs
        self.metrics = metrics
        self.compression = config.compression
        self.default_limits = (parse_rate(config.peer_rate), parse_burst(config.peer_burst))
        self.egress = TokenBucket(parse_rate(config.egress_rate), parse_burst(config.egress_burst))
        # Per-peer limits set at run time (PUT /v1/links/{peer}); others use the defaults.
        self.peer_limits: dict[str, tuple[float, int]] = {}
        self.links: dict[str, PeerLink] = {}
        self._lock = asyncio.Lock()
        self.warm_peers: dict[str, str] = {}  # configured peer -> why it is down ("" if up)
        self.kernel_advice = self.kernel.advice(config.window_bytes)
        self._keepers: list[asyncio.Task[None]] = []

    async def get(self, address: str) -> PeerLink:
        """The live link to ``address``, connecting it (all its stripes) if needed."""
        async with self._lock:
            link = self.links.get(address)
            if link is None or link.dead:
                link = PeerLink(
                    address,
                    self.settings,
                    bucket=TokenBucket(*self.limits_for(address)),
                    egress=self.egress,
                    codecs=self.codecs,
                    metrics=self.metrics,
                    compression=lambda: self.compression,
                    on_dead=self._forget,
                )
                await link.connect()
                # A rate PUT while it connected went to peer_limits only (the link was not
                # in self.links yet): the link starts at what is in force now.
                link.bucket.set_limits(*self.limits_for(address))
                self.links[address] = link
            return link

    def keep_warm(self, addresses: list[str]) -> None:
        """Connect these peers now and keep them connected (the config's ``peers``)."""
        for address in addresses:
            if address not in self.warm_peers:
                self.warm_peers[address] = "connecting"
                self._keepers.append(spawn(self._keep(address), f"keepwarm-{address}"))

    async def _keep(self, address: str) -> None:
        delay = RETRY_MIN_S
        while True:
            try:
                link = await self.get(address)
            except Exception as exc:  # any failure to connect: retry, say why once per cause
                why = f"{type(exc).__name__}: {exc}"
                if why != self.warm_peers.get(address):
                    log.warning(
                        "configured peer %s unreachable (%s): retrying with backoff",
                        address,
                        why,
                        extra={"peer": address, "cause": f"peer down {address}"},
                    )
                self.warm_peers[address] = why
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(2 * delay, RETRY_MAX_S)
                continue
            self.warm_peers[address] = ""
            delay = RETRY_MIN_S
            await link.lost.wait()
            self.warm_peers[address] = "link lost: reconnecting"

    def _forget(self, link: PeerLink) -> None:
        if self.links.get(link.address) is link:
            del self.links[link.address]

    def connections_to(self, peer: str) -> int:
        """The connections a transfer to ``peer`` stripes over: its live link's, else the
        configured count (the link may open more; the transfer then restripes)."""
        link = self.links.get(peer)
        return len(link.conns) if link is not None and link.conns else self.settings.connections

    def limits_for(self, peer: str) -> tuple[float, int]:
        """(rate in bytes/s, inf for unlimited; burst) of the link to ``peer``."""
        return self.peer_limits.get(peer, self.default_limits)

    def set_limits(self, peer: str, rate: float, burst: int) -> None:
        """Change a link's limits now (running transfers keep going at the new rate)."""
        link = self.links.get(peer)
        if link is not None:
            link.bucket.set_limits(rate, burst)  # raises RateError before changing anything
        self.peer_limits[peer] = (rate, burst)

    def reload(self, config: Config, keys: PeerKeys | None = None) -> None:
        """SIGHUP: the new file's rate limits, compression and keys (validated first: a
        bad value raises before anything changes). New connections prove the new keys."""
        egress = (parse_rate(config.egress_rate), parse_burst(config.egress_burst))
        peer = (parse_rate(config.peer_rate), parse_burst(config.peer_burst))
        self.egress.set_limits(*egress)
        self.settings = replace(self.settings, keys=keys)
        self.default_limits = peer
        self.compression = config.compression
        for address, link in self.links.items():
            if address not in self.peer_limits:
                link.bucket.set_limits(*peer)

    def figures(self, peer: str) -> dict[str, Any] | None:
        link = self.links.get(peer)
        return None if link is None else link.figures_json()

    def to_json(self) -> list[dict[str, Any]]:
        """Every live link's figures, and each configured peer that is down (why)."""
        out = []
        for address, link in self.links.items():
            figures = link.figures_json()
            rtt = figures.get("rtt_s")
            bound = self.kernel.bound_Bps(len(link.conns), rtt if isinstance(rtt, float) else None)
            out.append(
                {
                    **figures,
                    "configured": address in self.warm_peers,
                    "kernel_send_buffer_max": self.kernel.send_max,
                    "kernel_bound_Bps": None if bound is None else round(bound),
                    "kernel_advice": self.kernel_advice,
                }
            )
        for address, why in self.warm_peers.items():
            if address not in self.links:
                out.append(
                    {
                        "peer": address,
                        "at": round(time.time(), 3),
                        "connected": False,
                        "connections": 0,
                        "transfers": 0,
                        "configured": True,
                        "why": why,
                    }
                )
        return out

    def close(self) -> None:
        for keeper in self._keepers:
            keeper.cancel()
        for link in list(self.links.values()):
            link.close()
