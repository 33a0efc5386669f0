"""The link pool: one :class:`PeerLink` per remote daemon, made on first use, and the rate
limits of every link (per peer, and all links together), changed live or on reload."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..ratelimit import TokenBucket, parse_burst, parse_rate
from .codecpool import CodecPool
from .config import Config
from .metrics import Metrics
from .peers import LinkSettings, PeerLink

log = logging.getLogger("kvship.links")


class LinkPool:
    def __init__(self, config: Config, codecs: CodecPool, metrics: Metrics) -> None:
        self.settings = LinkSettings(
            config.node_name, config.connections_per_peer, config.connect_timeout_s
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
                self.links[address] = link
            return link

    def _forget(self, link: PeerLink) -> None:
        if self.links.get(link.address) is link:
            del self.links[link.address]

    def limits_for(self, peer: str) -> tuple[float, int]:
        """(rate in bytes/s, inf for unlimited; burst) of the link to ``peer``."""
        return self.peer_limits.get(peer, self.default_limits)

    def set_limits(self, peer: str, rate: float, burst: int) -> None:
        """Change a link's limits now (running transfers keep going at the new rate)."""
        link = self.links.get(peer)
        if link is not None:
            link.bucket.set_limits(rate, burst)  # raises RateError before changing anything
        self.peer_limits[peer] = (rate, burst)

    def reload(self, config: Config) -> None:
        """SIGHUP: the new file's rate limits and compression (validated first: a bad
        value raises before anything changes)."""
        egress = (parse_rate(config.egress_rate), parse_burst(config.egress_burst))
        peer = (parse_rate(config.peer_rate), parse_burst(config.peer_burst))
        self.egress.set_limits(*egress)
        self.default_limits = peer
        self.compression = config.compression
        for address, link in self.links.items():
            if address not in self.peer_limits:
                link.bucket.set_limits(*peer)

    def figures(self, peer: str) -> dict[str, Any] | None:
        link = self.links.get(peer)
        return None if link is None else link.figures_json()

    def to_json(self) -> list[dict[str, Any]]:
        return [link.figures_json() for link in self.links.values()]

    def close(self) -> None:
        for link in list(self.links.values()):
            link.close()
