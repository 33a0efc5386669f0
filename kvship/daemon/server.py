"""The daemon as the composition root: it builds the parts, binds the listeners, answers
handshakes, hands each connection's frames to the part that owns them, and drains.

The parts know nothing of this object: the registry (transfers), the staging budget, the
block stores, the link pool, the peer inbox (incoming transfers), engine sessions (sends
and deliveries) and the control plane each take only what they use.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import secrets
import time
from dataclasses import replace
from typing import Any

from ..addresses import join_hostport, split_hostport
from ..aio import FramedProtocol, spawn
from ..aio.lag import LoopLag
from ..protocol import (
    CAP_SHM,
    CAP_SKIP,
    ROLE_ENGINE,
    ROLE_PEER,
    AuthProof,
    Connection,
    ErrorCode,
    Frame,
    GoAway,
    Hello,
    Limits,
    Open,
    ProtocolError,
    Role,
)
from .budget import StagingBudget
from .codecpool import CodecPool
from .config import MAX_CHUNK, Config, load_trust
from .control import ControlView
from .engine_api import EngineSession
from .inbound import PeerInbox
from .incoming import ReceiveContext
from .links import LinkPool
from .metrics import Metrics
from .outgoing import EngineHold, OutgoingTransfer, SendContext
from .peers import PEER_CAPS, kernel_rtt_s
from .registry import TransferRegistry
from .stores import StoreSet
from .window import ReceiveWindow, WindowPool

log = logging.getLogger("kvship.daemon")

STALL_REPORT_S = 10.0  # an arriving transfer idle this long while credit is held back


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = metrics = Metrics()
        self.codecs = CodecPool(
            config.compress_workers,
            config.compress_level,
            lambda op, seconds: metrics.codec_seconds.labels(op).observe(seconds),
        )
        self.limits = Limits(
            max_chunk=min(MAX_CHUNK, config.window_bytes),  # a chunk must fit the window
            max_transfers=config.max_transfers_per_connection,
            initial_window=config.window_bytes,
        )
        self.registry = TransferRegistry(metrics)
        self.windows = WindowPool(config.staging_bytes, metrics.window_growth)
        self.budget = StagingBudget(
            config.staging_bytes,
            metrics.staged_bytes,
            finishing=self.registry.finishing,
            on_room=self.registry.resume_paused_senders,
        )
        self.stores = StoreSet(config.store_bytes)
        self.trust = trust = load_trust(config)
        self.links = LinkPool(
            config, self.codecs, metrics, trust.peer_keys, trust.tls.client if trust.tls else None
        )
        self.inbox = PeerInbox(
            ReceiveContext(
                self.budget,
                self.codecs,
                metrics,
                self.stores,
                self.registry.received,
                self.registry.incoming_finished,
            ),
            self.registry,
            accepting=lambda: not self.draining,
        )
        self._send_ctx = SendContext(
            self.links, self.codecs, metrics, self.registry.outgoing_finished
        )
        metrics.watch_links(self.links.to_json)
        metrics.watch_store(self.stores.stats)
        self.lag = LoopLag(metrics.loop_lag.observe)
        self.servers: list[asyncio.AbstractServer] = []
        self.connections: set[FramedProtocol] = set()
        self.draining = False
        self.started = time.time()
        self.addresses: dict[str, str] = {}
        self._reaper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------- start/stop
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        host, port = split_hostport(cfg.peer_listen)
        tls = self.trust.tls.server if self.trust.tls else None
        srv = await loop.create_server(lambda: self._accept("peer"), host, port, ssl=tls)
        self.servers.append(srv)
        self.addresses["peer"] = _bound(srv)
        if cfg.engine_socket:
            path = cfg.engine_socket
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            srv = await loop.create_unix_server(lambda: self._accept("engine_unix"), path)
            os.chmod(path, 0o660)
            if cfg.engine_socket_group:
                os.chown(path, -1, grp.getgrnam(cfg.engine_socket_group).gr_gid)
            self.servers.append(srv)
            self.addresses["engine_socket"] = path
        if cfg.engine_listen:
            host, port = split_hostport(cfg.engine_listen)
            srv = await loop.create_server(lambda: self._accept("engine_tcp"), host, port)
            self.servers.append(srv)
            self.addresses["engine"] = _bound(srv)
        self._reaper = spawn(self._reap(), "reaper")
        self.links.keep_warm(cfg.peer_list)
        for line in self.links.kernel_advice:
            log.warning(line, extra={"cause": "kernel socket buffers"})
        self.lag.start()
        for line in cfg.exposure_warnings:
            log.warning("INSECURE: %s", line, extra={"cause": "insecure"})
        log.info(
            "kvshipd %s listening: %s (peers: %s)",
            cfg.node_name,
            self.addresses,
            self.security()["peer_auth"],
        )

    async def drain(self, deadline_s: float | None = None) -> bool:
        """Stop taking new transfers; wait for running ones (True if all finished)."""
        self.draining = True
        for srv in self.servers:
            srv.close()
        deadline = time.monotonic() + (deadline_s or self.config.drain_timeout_s)
        while self.registry.running() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.registry.running()

    async def close(self) -> None:
        self.draining = True
        self.lag.stop()
        if self._reaper is not None:
            self._reaper.cancel()
        for srv in self.servers:
            srv.close()
        for transfer in list(self.registry.outgoing.values()):
            transfer.fail(ErrorCode.SHUTTING_DOWN, "daemon stopped")
        for incoming in list(self.registry.incoming.values()):
            incoming.fail(ErrorCode.SHUTTING_DOWN, "daemon stopped")
        self.links.close()
        for conn in list(self.connections):
            with contextlib.suppress(Exception):
                conn.write(GoAway(int(ErrorCode.SHUTTING_DOWN), "daemon stopped").encode())
            conn.close()
        await asyncio.sleep(0)
        self.codecs.close()
        if self.config.engine_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.engine_socket)

    def reload(self, config: Config) -> None:
        """SIGHUP: apply the new file's rate limits, compression, keys and TLS files
        (all validated before anything changes)."""
        if bool(config.tls_cert) != (self.trust.tls is not None):
            raise ValueError("TLS on or off needs a restart (tls_cert was set or cleared)")
        if bool(config.auth_key_file) != (self.trust.accepted_keys is not None):
            raise ValueError("authentication on or off needs a restart (auth_key_file)")
        # The listener holds its TLS contexts: the files load into them.
        trust = load_trust(config, reuse=self.trust.tls)
        self.links.reload(config, trust.peer_keys)
        self.trust = trust
        self.config = replace(
            self.config,
            egress_rate=config.egress_rate,
            egress_burst=config.egress_burst,
            peer_rate=config.peer_rate,
            peer_burst=config.peer_burst,
            compression=config.compression,
        )
        log.info(
            "reloaded: peer %s, egress %s, compression %s",
            config.peer_rate,
            config.egress_rate,
            config.compression,
        )

    # -------------------------------------------------------------- accepting
    def _accept(self, kind: str) -> FramedProtocol:
        if kind == "peer":
            inbox = self.inbox
            conn = Connection(
                role=Role.PEER,
                initiator=False,
                limits=self.limits,
                payload_sink=inbox.sink(),
                keys=self.trust.accepted_keys,
            )

            def on_peer_frame(proto: FramedProtocol, frame: Frame) -> None:
                if isinstance(frame, Hello):
                    self._handshake(proto, frame, ROLE_PEER, PEER_CAPS)
                elif isinstance(frame, AuthProof):  # verified by the core: now HELLO_ACK
                    proto.write(proto.conn.accept())
                else:
                    inbox.on_frame(proto, frame)

            def on_peer_close(proto: FramedProtocol, error: BaseException | None) -> None:
                self._closed(proto, kind)
                inbox.on_close(proto, error)

            proto = FramedProtocol(conn, on_peer_frame, on_peer_close, self._count_error)
            proto.grant_policy = ReceiveWindow(
                self.limits.initial_window,
                self.config.window_max_bytes,
                self.windows,
                lambda: kernel_rtt_s(proto),
            )
        else:
            session = EngineSession(
                self._start_send,
                self.registry.claim,
                lambda: not self.draining,
                self.config.subscribe_timeout_s,
                self.config.unacked_copy_min_rtt_s,
            )
            caps = (CAP_SHM if kind == "engine_unix" else 0) | CAP_SKIP

            def on_engine_frame(proto: FramedProtocol, frame: Frame) -> None:
                if isinstance(frame, Hello):
                    self._handshake(proto, frame, ROLE_ENGINE, caps)
                    session.handshaken(proto)
                else:
                    session.on_frame(proto, frame)

            def on_engine_close(proto: FramedProtocol, error: BaseException | None) -> None:
                self._closed(proto, kind)
                session.on_close(proto, error)

            conn = Connection(role=Role.DAEMON, limits=self.limits)
            proto = FramedProtocol(conn, on_engine_frame, on_engine_close, self._count_error)
        self.connections.add(proto)
        self.metrics.connections.labels(kind).inc()
        return proto

    def _closed(self, proto: FramedProtocol, kind: str) -> None:
        self.connections.discard(proto)
        self.metrics.connections.labels(kind).dec()

    def _count_error(self, error: ProtocolError) -> None:
        self.metrics.protocol_errors.labels(error.code.name).inc()

    def _handshake(self, proto: FramedProtocol, hello: Hello, role: int, caps: int) -> None:
        if hello.role != role:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"role {hello.role} on this listener")
        proto.write(proto.conn.accept(self.config.node_name, caps))

    def _start_send(
        self, engine: FramedProtocol, frame: Open, hold: EngineHold
    ) -> OutgoingTransfer:
        tid = secrets.randbits(63) | 1
        transfer = OutgoingTransfer(self._send_ctx, engine, frame, tid, hold)
        self.registry.add_outgoing(transfer)
        transfer.start()
        return transfer

    async def _reap(self) -> None:
        """Drop received transfers nobody claimed, stalled ones and orphans after
        retention_s."""
        while True:
            await asyncio.sleep(min(1.0, self.config.retention_s / 4))
            self.registry.reap(self.config.retention_s)
            self.registry.reap_suspended(self.config.resume_timeout_s)
            self._report_stalls()

    def _report_stalls(self) -> None:
        """A transfer that moves nothing while this daemon holds credit back is a stall
        its engine would only see as a timeout: say so, with what is held."""
        budget = self.budget
        if not budget.deferred_bytes:
            return  # nothing withheld: a slow sender, not a stall of this daemon
        for transfer in self.registry.newly_stalled(STALL_REPORT_S):
            self.metrics.receive_stalls.inc()
            log.warning(
                "incoming transfer %s from %s moved nothing for %.0f s while credit is held "
                "back: %s; staging %.1f of %.1f MiB, %.1f MiB of credit deferred",
                transfer.request_id,
                transfer.record.peer,
                STALL_REPORT_S,
                transfer.progress(),
                budget.staged / (1 << 20),
                budget.limit / (1 << 20),
                budget.deferred_bytes / (1 << 20),
                extra=transfer.log_fields(cause=f"stall {transfer.record.peer}"),
            )

    # ---------------------------------------------------------- control plane
    def health(self) -> dict[str, Any]:
        warnings = self.config.exposure_warnings
        return {
            "status": "draining" if self.draining else "ok",
            "node": self.config.node_name,
            "uptime_s": round(time.time() - self.started, 3),
            "addresses": self.addresses,
            "security": self.security(),
            "insecure": bool(warnings),
            "warnings": warnings,
        }

    def security(self) -> dict[str, Any]:
        """How peers are trusted (no secrets): /healthz and the start line say it."""
        trust = self.trust
        return {
            "peer_auth": "none" if trust.accepted_keys is None else "psk",
            "accepted_keys": sorted(trust.accepted_keys or ()),
            "own_key": "" if trust.peer_keys is None else trust.peer_keys.default,
            "tls": trust.tls is not None,
            "control_token": bool(trust.control_token),
        }

    def control_view(self) -> ControlView:
        return ControlView(
            self.health,
            self.metrics,
            self.registry,
            self.links,
            self.stores,
            lambda: self.trust.control_token,
        )


def _bound(server: asyncio.Server) -> str:
    host, port = server.sockets[0].getsockname()[:2]
    return join_hostport(host, port)
