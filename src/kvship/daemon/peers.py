"""A peer link: N connections from this daemon to one remote daemon, shared by transfers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from ..aio import FramedProtocol, open_connection
from ..payload import CODEC_RAW, CODEC_ZSTD, choose_codec
from ..protocol import (
    CAP_CODECS,
    CAP_STRIPING,
    ROLE_PEER,
    Abort,
    Complete,
    ErrorCode,
    Frame,
    GoAway,
    Hello,
    Ping,
    Pong,
)

if TYPE_CHECKING:
    from .outgoing import OutgoingTransfer
    from .server import Daemon

log = logging.getLogger("kvship.peer")


class LinkFigures:
    """Moving rates of one link, cheap to read: updated as chunks leave, folded into an
    exponentially weighted average every quarter second."""

    WINDOW_S = 0.25

    def __init__(self) -> None:
        self.payload_total = 0
        self.wire_total = 0
        self.payload_Bps = 0.0
        self.wire_Bps = 0.0
        self._start = time.monotonic()
        self._payload = 0
        self._wire = 0

    def add(self, payload: int, wire: int) -> None:
        self.payload_total += payload
        self.wire_total += wire
        self._payload += payload
        self._wire += wire
        now = time.monotonic()
        elapsed = now - self._start
        if elapsed >= self.WINDOW_S:
            alpha = 0.5 if self.wire_Bps else 1.0
            self.payload_Bps += alpha * (self._payload / elapsed - self.payload_Bps)
            self.wire_Bps += alpha * (self._wire / elapsed - self.wire_Bps)
            self._start, self._payload, self._wire = now, 0, 0

    @property
    def compression_ratio(self) -> float:
        return self.payload_total / self.wire_total if self.wire_total else 1.0


class PeerLink:
    def __init__(self, daemon: Daemon, address: str) -> None:
        self.daemon = daemon
        self.address = address
        self.conns: list[FramedProtocol] = []
        self.transfers: dict[int, OutgoingTransfer] = {}
        self.dead = False
        self.goaway: GoAway | None = None  # why the peer closed, when it said so
        self.figures = LinkFigures()

    async def connect(self) -> None:
        cfg = self.daemon.config
        hello = Hello(ROLE_PEER, cfg.node_name, capabilities=CAP_STRIPING | CAP_CODECS)
        try:
            self.conns = list(
                await asyncio.gather(
                    *(
                        open_connection(
                            self.address,
                            hello,
                            self._on_frame,
                            self._on_close,
                            timeout=cfg.connect_timeout_s,
                        )
                        for _ in range(cfg.connections_per_peer)
                    )
                )
            )
        except BaseException:
            self.dead = True
            for conn in self.conns:
                conn.close()
            raise
        self.daemon.metrics.connections.labels("peer_out").inc(len(self.conns))
        log.info("link to %s up: %d connections", self.address, len(self.conns))

    @property
    def queued_chunks(self) -> int:
        return sum(q.qsize() for t in self.transfers.values() for q in t.queues)

    def codec_for(self, dtype: str) -> int:
        """The codec for the next chunk of a layer of ``dtype``, by the compression policy.

        ``auto`` compresses only while chunks wait for this link and the link is slower
        than what half the codec workers can compress: on a fast or idle link compression
        would only add CPU time, on a slow one it turns spare CPU into more KV per bit.
        """
        policy = self.daemon.config.compression
        if (
            policy == "raw"
            or not self.conns
            or not (self.conns[0].conn.negotiated.capabilities & CAP_CODECS)
        ):
            return CODEC_RAW
        if policy == "zstd":
            return CODEC_ZSTD
        if policy == "split":
            return choose_codec(dtype)
        pool = self.daemon.codecs
        wire_Bps = self.figures.wire_Bps
        slow = 0 < wire_Bps < 0.5 * pool.workers * pool.encode_Bps
        if slow and self.queued_chunks >= len(self.conns):
            return choose_codec(dtype)
        return CODEC_RAW

    def note_sent(self, payload: int, wire: int) -> None:
        self.figures.add(payload, wire)

    def _on_frame(self, conn: FramedProtocol, frame: Frame) -> None:
        if isinstance(frame, Complete):
            transfer = self.transfers.get(frame.transfer_id)
            if transfer is not None:
                transfer.on_complete(frame)
        elif isinstance(frame, Abort):
            transfer = self.transfers.get(frame.transfer_id)
            if transfer is not None:
                transfer.on_peer_abort(frame)
        elif isinstance(frame, Ping):
            conn.send(Pong(frame.opaque))
        elif isinstance(frame, GoAway):
            self.goaway = frame
            log.warning("peer %s sent GOAWAY %s: %s", self.address, frame.code, frame.message)

    def _on_close(self, conn: FramedProtocol, error: BaseException | None) -> None:
        self.daemon.metrics.connections.labels("peer_out").dec()
        if not self.dead:
            self.dead = True
            self.daemon.forget_link(self)
            for other in self.conns:
                if other is not conn:
                    other.close()
        if self.goaway is not None:
            why = f"{_code_name(self.goaway.code)}: {self.goaway.message}"
        else:
            why = str(error) if error else ""
        reason = f"connection to {self.address} lost" + (f": {why}" if why else "")
        for transfer in list(self.transfers.values()):
            transfer.fail(ErrorCode.PEER_UNREACHABLE, reason, tell_peer=False)

    def close(self) -> None:
        self.dead = True
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.close()


def _code_name(code: int) -> str:
    return ErrorCode(code).name if code in set(ErrorCode) else f"error {code}"
