"""The daemon: listeners, the transfer registries, memory accounting and graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import replace
from typing import Any

from ..aio import FramedProtocol
from ..aio.framed import split_hostport
from ..layout.model import ModelLayout
from ..layout.prefix import namespace
from ..protocol import (
    CAP_CODECS,
    CAP_DEDUP,
    CAP_SHM,
    CAP_STRIPING,
    ROLE_ENGINE,
    ROLE_PEER,
    Abort,
    Chunk,
    ChunkMeta,
    Connection,
    End,
    ErrorCode,
    Frame,
    GoAway,
    Hello,
    Limits,
    Open,
    Ping,
    Pong,
    ProtocolError,
)
from ..ratelimit import TokenBucket, parse_burst, parse_rate
from ..store import BlockStore
from .codecpool import CodecPool
from .config import MAX_CHUNK, Config
from .engine_api import EngineSession, Subscription
from .incoming import IncomingTransfer
from .metrics import Metrics
from .outgoing import OutgoingTransfer
from .peers import PeerLink
from .records import TransferRecord

log = logging.getLogger("kvship.daemon")

HISTORY = 1000  # finished transfers kept for /v1/transfers
STORES = 4  # model namespaces with a block store at once


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.egress = TokenBucket(parse_rate(config.egress_rate), parse_burst(config.egress_burst))
        # Per-peer limits set at run time (PUT /v1/links/{peer}); others use the config's.
        self.link_limits: dict[str, tuple[float, int]] = {}
        self.stores: OrderedDict[bytes, BlockStore] = OrderedDict()  # dedup, per model
        self.metrics.watch_links(self.links_json)
        self.metrics.watch_store(self.store_stats)
        self.codecs = CodecPool(config.compress_workers, config.compress_level)
        self.limits = Limits(
            max_chunk=min(MAX_CHUNK, config.window_bytes),  # a chunk must fit the window
            max_transfers=config.max_transfers_per_connection,
            initial_window=config.window_bytes,
        )
        self.links: dict[str, PeerLink] = {}
        self._link_lock = asyncio.Lock()
        self.outgoing: dict[int, OutgoingTransfer] = {}
        self.incoming: dict[int, IncomingTransfer] = {}
        self.by_request: dict[str, IncomingTransfer] = {}
        self.waiters: dict[str, list[asyncio.Future[IncomingTransfer]]] = {}
        self.history: OrderedDict[int, TransferRecord] = OrderedDict()
        self.staged = 0
        self.deferred: deque[tuple[FramedProtocol, int]] = deque()
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
        srv = await loop.create_server(lambda: self._accept("peer"), host, port)
        self.servers.append(srv)
        self.addresses["peer"] = _bound(srv)
        if cfg.engine_socket:
            path = cfg.engine_socket
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            srv = await loop.create_unix_server(lambda: self._accept("engine_unix"), path)
            os.chmod(path, 0o660)
            self.servers.append(srv)
            self.addresses["engine_socket"] = path
        if cfg.engine_listen:
            host, port = split_hostport(cfg.engine_listen)
            srv = await loop.create_server(lambda: self._accept("engine_tcp"), host, port)
            self.servers.append(srv)
            self.addresses["engine"] = _bound(srv)
        self._reaper = asyncio.create_task(self._reap())
        log.info("kvshipd %s listening: %s", cfg.node_name, self.addresses)

    async def drain(self, deadline_s: float | None = None) -> bool:
        """Stop taking new transfers; wait for running ones (True if all finished)."""
        self.draining = True
        for srv in self.servers:
            srv.close()
        deadline = time.monotonic() + (deadline_s or self.config.drain_timeout_s)
        while (self.outgoing or self._receiving()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not (self.outgoing or self._receiving())

    def _receiving(self) -> list[IncomingTransfer]:
        return [t for t in self.incoming.values() if t.state == "receiving"]

    async def close(self) -> None:
        self.draining = True
        if self._reaper is not None:
            self._reaper.cancel()
        for srv in self.servers:
            srv.close()
        for transfer in list(self.outgoing.values()):
            transfer.fail(ErrorCode.SHUTTING_DOWN, "daemon stopped")
        for transfer in list(self.incoming.values()):
            transfer.fail(ErrorCode.SHUTTING_DOWN, "daemon stopped")
        for link in list(self.links.values()):
            link.close()
        for conn in list(self.connections):
            with contextlib.suppress(Exception):
                conn.write(GoAway(int(ErrorCode.SHUTTING_DOWN), "daemon stopped").encode())
            conn.close()
        await asyncio.sleep(0)
        self.codecs.close()
        if self.config.engine_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.engine_socket)

    # -------------------------------------------------------------- accepting
    def _accept(self, kind: str) -> FramedProtocol:
        if kind == "peer":
            conn = Connection(initiator=False, limits=self.limits, payload_sink=_PeerSink(self))
            proto = FramedProtocol(
                conn, self._on_peer_frame, self._on_peer_close, self._count_error
            )
        else:
            session = EngineSession(self)
            conn = Connection(initiator=False, limits=self.limits)
            proto = FramedProtocol(
                conn,
                lambda p, f: self._on_engine_frame(session, kind, p, f),
                lambda p, e: self._on_engine_close(session, p, e),
                self._count_error,
            )
        self.connections.add(proto)
        self.metrics.connections.labels(kind).inc()
        proto.kind = kind  # type: ignore[attr-defined]
        return proto

    def _count_error(self, error: ProtocolError) -> None:
        self.metrics.protocol_errors.labels(error.code.name).inc()

    def _handshake(self, proto: FramedProtocol, hello: Hello, role: int, caps: int) -> None:
        if hello.role != role:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"role {hello.role} on this listener")
        proto.write(proto.conn.accept(self.config.node_name, caps))

    # ------------------------------------------------------------ peer frames
    def _on_peer_frame(self, proto: FramedProtocol, frame: Frame) -> None:
        if isinstance(frame, Chunk):
            transfer = self.incoming.get(frame.meta.transfer_id)
            if transfer is None:
                proto.grant(len(frame.data))
            else:
                sink = proto.conn.payload_sink
                assert isinstance(sink, _PeerSink)
                transfer.on_chunk(proto, frame, sink.in_arena)
        elif isinstance(frame, Open):
            self._on_peer_open(proto, frame)
        elif isinstance(frame, End):
            transfer = self.incoming.get(frame.transfer_id)
            if transfer is not None:
                transfer.on_end(proto, frame)
        elif isinstance(frame, Abort):
            transfer = self.incoming.get(frame.transfer_id)
            if transfer is not None:
                transfer.fail(
                    ErrorCode.CANCELLED, f"sender aborted: {frame.message}", tell_sender=False
                )
        elif isinstance(frame, Hello):
            self._handshake(proto, frame, ROLE_PEER, CAP_STRIPING | CAP_CODECS | CAP_DEDUP)
        elif isinstance(frame, Ping):
            proto.send(Pong(frame.opaque))

    def _on_peer_open(self, proto: FramedProtocol, frame: Open) -> None:
        transfer = self.incoming.get(frame.transfer_id)
        new = transfer is None
        if transfer is None:
            if self.draining:
                proto.send(Abort(frame.transfer_id, ErrorCode.SHUTTING_DOWN, "draining"))
                return
            busy = self.by_request.get(frame.request_id)
            if busy is not None and busy.state == "receiving":
                proto.send(
                    Abort(
                        frame.transfer_id,
                        ErrorCode.PROTOCOL_ERROR,
                        f"request {frame.request_id!r} is already arriving",
                    )
                )
                return
            transfer = IncomingTransfer(self, frame, proto.conn.negotiated.peer_name)
            self.incoming[frame.transfer_id] = transfer
            self.by_request[frame.request_id] = transfer
            self.metrics.in_flight.labels("in").inc()
            for fut in self.waiters.pop(frame.request_id, []):
                if not fut.done():
                    fut.set_result(transfer)
                    break
        transfer.add_stripe(proto, frame)
        if new and "dedup" in frame.extra and proto.conn.negotiated.capabilities & CAP_DEDUP:
            transfer.negotiate_dedup(proto)

    def _on_peer_close(self, proto: FramedProtocol, error: BaseException | None) -> None:
        self.connections.discard(proto)
        self.metrics.connections.labels("peer").dec()
        for transfer in list(self.incoming.values()):
            transfer.on_stripe_lost(proto, error)
        self.deferred = deque((p, n) for p, n in self.deferred if p is not proto)

    # ---------------------------------------------------------- engine frames
    def _on_engine_frame(
        self, session: EngineSession, kind: str, proto: FramedProtocol, frame: Frame
    ) -> None:
        if isinstance(frame, Hello):
            caps = CAP_SHM if kind == "engine_unix" else 0
            self._handshake(proto, frame, ROLE_ENGINE, caps)
            session.conn = proto
            return
        session.on_frame(proto, frame)

    def _on_engine_close(
        self, session: EngineSession, proto: FramedProtocol, error: BaseException | None
    ) -> None:
        self.connections.discard(proto)
        self.metrics.connections.labels(getattr(proto, "kind", "engine")).dec()
        session.on_close(proto, error)

    # -------------------------------------------------------------- transfers
    def start_outgoing(self, engine: FramedProtocol, frame: Open) -> OutgoingTransfer:
        tid = secrets.randbits(63) | 1
        transfer = OutgoingTransfer(self, engine, frame, tid)
        self.outgoing[tid] = transfer
        self.metrics.in_flight.labels("out").inc()
        transfer.start()
        return transfer

    async def peer_link(self, address: str) -> PeerLink:
        async with self._link_lock:
            link = self.links.get(address)
            if link is None or link.dead:
                link = PeerLink(self, address)
                await link.connect()
                self.links[address] = link
            return link

    def limits_for(self, peer: str) -> tuple[float, int]:
        """(rate in bytes/s, inf for unlimited; burst) of the link to ``peer``."""
        if peer in self.link_limits:
            return self.link_limits[peer]
        cfg = self.config
        return parse_rate(cfg.peer_rate), parse_burst(cfg.peer_burst)

    def set_link_limits(self, peer: str, rate: float, burst: int) -> None:
        """Change a link's limits now (running transfers keep going at the new rate)."""
        link = self.links.get(peer)
        if link is not None:
            link.bucket.set_limits(rate, burst)  # raises RateError before changing anything
        self.link_limits[peer] = (rate, burst)

    def reload(self, config: Config) -> None:
        """SIGHUP: apply the new file's rate limits (validated before anything changes)."""
        egress = (parse_rate(config.egress_rate), parse_burst(config.egress_burst))
        peer = (parse_rate(config.peer_rate), parse_burst(config.peer_burst))
        self.config = replace(
            self.config,
            egress_rate=config.egress_rate,
            egress_burst=config.egress_burst,
            peer_rate=config.peer_rate,
            peer_burst=config.peer_burst,
            compression=config.compression,
        )
        self.egress.set_limits(*egress)
        for address, link in self.links.items():
            if address not in self.link_limits:
                link.bucket.set_limits(*peer)
        log.info(
            "reloaded: peer %s, egress %s, compression %s",
            config.peer_rate,
            config.egress_rate,
            config.compression,
        )

    def store_for(self, layout: ModelLayout, tp_rank: int) -> BlockStore:
        """The block store of one model namespace. Up to ``STORES`` namespaces share
        ``store_bytes`` equally; a new one pushes out the least recently used."""
        key = namespace(layout, tp_rank)
        store = self.stores.pop(key, None)
        if store is None:
            store = BlockStore(self.config.store_bytes // STORES, layout, tp_rank)
            while len(self.stores) >= STORES:
                _, old = self.stores.popitem(last=False)
                log.info("block store of another model dropped (%d B)", old.used_bytes)
        self.stores[key] = store
        return store

    def store_stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for store in self.stores.values():
            for k, v in store.stats().items():
                total[k] = total.get(k, 0) + v
        return total

    def forget_link(self, link: PeerLink) -> None:
        if self.links.get(link.address) is link:
            del self.links[link.address]

    async def claim(
        self, request_id: str, sub: Subscription, timeout: float
    ) -> IncomingTransfer | None:
        """The transfer of ``request_id`` for ``sub``, waiting up to ``timeout`` for it."""
        transfer = self.by_request.get(request_id)
        if (
            transfer is None
            or transfer.subscriber is not None
            or transfer.state in ("failed", "delivered")
        ):
            fut: asyncio.Future[IncomingTransfer] = asyncio.get_running_loop().create_future()
            self.waiters.setdefault(request_id, []).append(fut)
            try:
                transfer = await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                return None
            finally:
                waiting = self.waiters.get(request_id, [])
                if fut in waiting:
                    waiting.remove(fut)
                if not waiting:
                    self.waiters.pop(request_id, None)
        transfer.subscriber = sub
        transfer.changed.set()
        return transfer

    def transfer_received(self, transfer: IncomingTransfer) -> None:
        self.metrics.in_flight.labels("in").dec()

    def transfer_finished(self, record: TransferRecord, transfer: object) -> None:
        if isinstance(transfer, OutgoingTransfer):
            if self.outgoing.pop(record.transfer_id, None) is not None:
                self.metrics.in_flight.labels("out").dec()
            self.metrics.transfers.labels("out", record.state).inc()
        elif isinstance(transfer, IncomingTransfer):
            self.incoming.pop(record.transfer_id, None)
            if self.by_request.get(transfer.request_id) is transfer:
                del self.by_request[transfer.request_id]
            self.metrics.transfers.labels("in", record.state).inc()
        self.history[record.transfer_id] = record
        while len(self.history) > HISTORY:
            self.history.popitem(last=False)

    # --------------------------------------------------------- memory bound
    def hold(self, proto: FramedProtocol, nbytes: int, credit: int) -> None:
        """``nbytes`` of chunk data now sit in daemon memory; the ``credit`` (wire bytes)
        goes back to the peer only while that memory is under ``staging_bytes``."""
        self.staged += nbytes
        self.metrics.staged_bytes.set(self.staged)
        if self.staged <= self.config.staging_bytes and not self.deferred:
            proto.grant(credit)
        else:
            self.deferred.append((proto, credit))

    def unhold(self, nbytes: int) -> None:
        self.staged -= nbytes
        self.metrics.staged_bytes.set(self.staged)
        while self.deferred and self.staged <= self.config.staging_bytes:
            proto, n = self.deferred.popleft()
            proto.grant(n)

    async def _reap(self) -> None:
        """Drop received transfers nobody claimed, and stalled ones, after retention_s."""
        while True:
            await asyncio.sleep(min(1.0, self.config.retention_s / 4))
            now = time.monotonic()
            for transfer in list(self.incoming.values()):
                idle = now - transfer.last_activity
                if idle > self.config.retention_s and transfer.subscriber is None:
                    transfer.fail(ErrorCode.TIMEOUT, f"unclaimed or stalled for {idle:.0f} s")

    # ---------------------------------------------------------- control plane
    def transfers_json(self) -> list[dict[str, Any]]:
        live = [t.record for t in (*self.outgoing.values(), *self.incoming.values())]
        records = {r.transfer_id: r for r in (*self.history.values(), *live)}
        return [r.to_json() for r in records.values()]

    def links_json(self) -> list[dict[str, Any]]:
        return [link.figures_json() for link in self.links.values()]


class _PeerSink:
    """Payload sink of one peer connection; remembers whether the last chunk hit an arena."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.in_arena = False

    def __call__(self, meta: ChunkMeta, nbytes: int) -> memoryview:
        transfer = self.daemon.incoming.get(meta.transfer_id)
        if transfer is None:  # aborted meanwhile: read the bytes and drop them
            self.in_arena = False
            return memoryview(bytearray(nbytes))
        buf, self.in_arena = transfer.sink(meta, nbytes)
        return buf


def _bound(server: asyncio.AbstractServer) -> str:
    host, port = server.sockets[0].getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
