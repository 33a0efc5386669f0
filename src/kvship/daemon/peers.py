"""A peer link: N connections from this daemon to one remote daemon, shared by transfers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from ..aio import FramedProtocol, open_connection
from ..protocol import (
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


class PeerLink:
    def __init__(self, daemon: Daemon, address: str) -> None:
        self.daemon = daemon
        self.address = address
        self.conns: list[FramedProtocol] = []
        self.transfers: dict[int, OutgoingTransfer] = {}
        self.dead = False
        self.goaway: GoAway | None = None  # why the peer closed, when it said so

    async def connect(self) -> None:
        cfg = self.daemon.config
        hello = Hello(ROLE_PEER, cfg.node_name, capabilities=CAP_STRIPING)
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
