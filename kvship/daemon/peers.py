"""A peer link: N connections from this daemon to one remote daemon, shared by transfers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..aio import FramedProtocol, open_connection, spawn
from ..aio.framed import PAD_PIECE
from ..payload import CODEC_RAW, CODEC_ZSTD, choose_codec
from ..protocol import (
    CAP_CODECS,
    CAP_DEDUP,
    CAP_DEDUP_TAIL,
    CAP_HOLD,
    CAP_OPEN_CHECK,
    CAP_RESUME,
    CAP_STRIPING,
    HEADER_SIZE,
    ROLE_PEER,
    Abort,
    Ack,
    Complete,
    ErrorCode,
    Frame,
    GoAway,
    Have,
    Hello,
    Hold,
    Ping,
    Pong,
    ProtocolError,
    Resume,
)
from ..ratelimit import BULK, Scheduler, SchedulerClosed, TokenBucket, format_rate
from .codecpool import CodecPool
from .kernel import TcpBuffers, interface_speed_Bps
from .metrics import Metrics
from .trust import PeerKeys

# What this daemon offers on a peer connection, either end (the HELLO_ACK keeps the overlap).
PEER_CAPS = (
    CAP_STRIPING | CAP_CODECS | CAP_DEDUP | CAP_RESUME | CAP_OPEN_CHECK | CAP_HOLD | CAP_DEDUP_TAIL
)

log = logging.getLogger("kvship.peer")


class LinkTransfer(Protocol):
    """What a link needs of the outgoing transfers it carries."""

    @property
    def queued_bytes(self) -> int: ...

    @property
    def queued_chunks(self) -> int: ...

    def on_complete(self, frame: Complete) -> None: ...

    def on_peer_abort(self, frame: Abort) -> None: ...

    def on_have(self, frame: Have, conn: FramedProtocol) -> None: ...

    def on_ack(self, frame: Ack) -> None: ...

    def on_resume(self, frame: Resume) -> None: ...

    def on_hold(self, frame: Hold) -> None: ...

    def on_link_lost(self, reason: str) -> bool:
        """The link died: resume on a new one (True), or not resumable (False)."""
        ...

    def fail(self, code: ErrorCode, message: str, *, tell_peer: bool = ...) -> None: ...


@dataclass(frozen=True)
class LinkSettings:
    node_name: str
    connections: int  # striped TCP connections per link
    connect_timeout_s: float
    resume_timeout_s: float = 60.0  # a transfer whose link is lost resumes for this long
    keys: PeerKeys | None = None  # the key to prove to each peer (None: no authentication)
    tls: ssl.SSLContext | None = None  # TLS client context of peer links (None: plain TCP)
    warmup_bytes: int = 0  # PAD sent on each new connection, to open its congestion window
    max_connections: int = 0  # more where the kernel's send cap binds (<= connections: no)
    kernel: TcpBuffers | None = None  # the kernel's socket buffer caps (None: not read)


class LinkFigures:
    """Rates of one link over the last second, cheap to read (the router reads them per
    request): running sums over a deque of recent chunks, old entries dropped as we go."""

    WINDOW_S = 1.0

    def __init__(self) -> None:
        self.payload_total = 0
        self.wire_total = 0
        self.queue_wait_s = 0.0  # how long chunks wait for their stripe, smoothed
        self._recent: deque[tuple[float, int, int]] = deque()
        self._payload = 0
        self._wire = 0
        self._since = time.monotonic()

    def waited(self, seconds: float) -> None:
        self.queue_wait_s += 0.1 * (seconds - self.queue_wait_s)

    def add(self, payload: int, wire: int) -> None:
        now = time.monotonic()
        if not self._recent:
            self._since = now
        self.payload_total += payload
        self.wire_total += wire
        self._recent.append((now, payload, wire))
        self._payload += payload
        self._wire += wire
        self._expire(now)

    def _expire(self, now: float) -> float:
        """Drop entries older than the window; returns the span the sums cover."""
        cutoff = now - self.WINDOW_S
        while self._recent and self._recent[0][0] < cutoff:
            _, payload, wire = self._recent.popleft()
            self._payload -= payload
            self._wire -= wire
            self._since = max(self._since, cutoff)
        return max(min(self.WINDOW_S, now - self._since), 0.05)

    @property
    def measured(self) -> bool:
        """Whether the window holds enough history (a quarter second) to judge the link."""
        return bool(self._recent) and time.monotonic() - self._since >= 0.25

    @property
    def wire_Bps(self) -> float:
        return self._wire / self._expire(time.monotonic())

    @property
    def payload_Bps(self) -> float:
        return self._payload / self._expire(time.monotonic())

    @property
    def compression_ratio(self) -> float:
        return self.payload_total / self.wire_total if self.wire_total else 1.0


_TCP_INFO = struct.Struct("=B7x60xI28xI")  # struct tcp_info: state, ..., rtt (us), total_retrans


def tcp_info(conn: FramedProtocol) -> tuple[float, int] | None:
    """(smoothed RTT in seconds, retransmitted segments) from the kernel, where it tells."""
    transport = conn.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
        _, rtt_us, retrans = _TCP_INFO.unpack(raw[: _TCP_INFO.size])
    except (OSError, struct.error):
        return None
    return rtt_us / 1e6, retrans


def kernel_rtt_s(conn: FramedProtocol) -> float | None:
    """The kernel's smoothed RTT of ``conn`` in seconds (None where it does not tell)."""
    info = tcp_info(conn)
    return None if info is None or info[0] <= 0 else info[0]


class PeerLink:
    """N connections to one remote daemon, its rate limit and scheduler, its figures."""

    def __init__(
        self,
        address: str,
        settings: LinkSettings,
        *,
        bucket: TokenBucket,
        egress: TokenBucket,
        codecs: CodecPool,
        metrics: Metrics,
        compression: Callable[[], str],
        on_dead: Callable[[PeerLink], None],
    ) -> None:
        self.address = address
        self.settings = settings
        self.codecs = codecs
        self.metrics = metrics
        self.compression = compression  # the policy now (it changes on reload)
        self.on_dead = on_dead
        self.conns: list[FramedProtocol] = []
        self.transfers: dict[int, LinkTransfer] = {}
        self.dead = False
        self.goaway: GoAway | None = None  # why the peer closed, when it said so
        self.figures = LinkFigures()
        self.bucket = bucket
        self.egress = egress
        self.scheduler = Scheduler(bucket, egress, name=address)
        self.rtt_s: float | None = None  # PING/PONG round trip, smoothed
        self.lost = asyncio.Event()  # set once the link is dead (lost or closed)
        self._pinger: asyncio.Task[None] | None = None
        self._warmers: list[asyncio.Task[None]] = []

    async def connect(self) -> None:
        """Open the link: the configured count of connections, then more where the
        kernel's send-buffer cap binds (see :meth:`connections_wanted`)."""
        cfg = self.settings
        try:
            self.conns = await self._open(cfg.connections)
            more = self.connections_wanted() - len(self.conns)
            if more > 0:
                try:
                    self.conns += await self._open(more)
                except (OSError, ValueError, ProtocolError) as exc:  # the first ones serve
                    log.warning(
                        "link to %s: %d more connections failed (%s); using %d",
                        self.address,
                        more,
                        exc,
                        len(self.conns),
                        extra={"peer": self.address, "cause": f"more {self.address}"},
                    )
        except BaseException:
            self.dead = True
            for conn in self.conns:
                conn.close()
            raise
        self.metrics.connections.labels("peer_out").inc(len(self.conns))
        self._pinger = spawn(self._ping(), f"ping-{self.address}")
        if cfg.warmup_bytes:
            self._warmers = [spawn(self._warm(c), f"warm-{self.address}") for c in self.conns]
        log.info(
            "link to %s up: %d connections",
            self.address,
            len(self.conns),
            extra={"peer": self.address, "connections": len(self.conns)},
        )

    async def _open(self, n: int) -> list[FramedProtocol]:
        cfg = self.settings
        hello = Hello(ROLE_PEER, cfg.node_name, capabilities=PEER_CAPS)
        opened: list[FramedProtocol | BaseException] = await asyncio.gather(
            *(
                open_connection(
                    self.address,
                    hello,
                    self._on_frame,
                    self._on_close,
                    timeout=cfg.connect_timeout_s,
                    key=None if cfg.keys is None else cfg.keys.for_peer(self.address),
                    tls=cfg.tls,
                )
                for _ in range(n)
            ),
            return_exceptions=True,
        )
        conns = [c for c in opened if isinstance(c, FramedProtocol)]
        failed = [c for c in opened if not isinstance(c, FramedProtocol)]
        if failed:
            for conn in conns:
                conn.close()
            raise failed[0]
        return conns

    def connections_wanted(self) -> int:
        """Connections this link needs so that the kernel's send-buffer cap (one buffer
        per RTT per connection) does not bind below its rate limit, or, unlimited, its
        interface's speed; between the configured count and ``max_connections``."""
        cfg = self.settings
        if cfg.kernel is None or cfg.max_connections <= cfg.connections or not self.conns:
            return len(self.conns)
        rtts = [r for r in (kernel_rtt_s(c) for c in self.conns) if r is not None]
        rate: float | None = None if self.bucket.unlimited else self.bucket.rate
        if rate is None:
            transport = self.conns[0].transport
            sock = transport.get_extra_info("socket") if transport is not None else None
            rate = interface_speed_Bps(sock) if sock is not None else None
        need = cfg.kernel.connections_for(rate, max(rtts) if rtts else None)
        if need is None or need <= len(self.conns):
            return len(self.conns)
        want = min(need, cfg.max_connections)
        log.warning(
            "link to %s: the kernel caps a TCP send buffer at %d B (net.ipv4.tcp_wmem max), "
            "so at RTT %.1f ms %d connections carry %s; opening %d%s. Raise net.ipv4.tcp_wmem "
            "(third value) on this host to need fewer",
            self.address,
            cfg.kernel.send_max,
            max(rtts) * 1e3,
            need,
            format_rate(rate or 0.0),
            want,
            f" (max_connections_per_peer {cfg.max_connections})" if want < need else "",
            extra={"peer": self.address, "cause": f"connections {self.address}"},
        )
        return want

    async def _warm(self, conn: FramedProtocol) -> None:
        """Send ``warmup_bytes`` of PAD on a new connection (within the link's rate limit),
        stopping once a transfer uses the link. A connection that never carried data starts
        at TCP's initial window of 10 segments: the first 1 MiB transfer took 7 RTTs of slow
        start to reach the decode engine, against ~1.5 on a connection that carried some.
        With BBR (or ``net.ipv4.tcp_slow_start_after_idle = 0``) the window then stays open
        while the link idles."""
        left = self.settings.warmup_bytes
        try:
            while left > 0 and conn.is_open and not self.dead and not self.transfers:
                piece = min(PAD_PIECE, left)
                await self.scheduler.acquire("warm-up", piece + HEADER_SIZE, BULK)
                if self.transfers:
                    return
                conn.send_padding(piece)
                self.metrics.warmup_bytes.inc(piece)
                left -= piece
                await conn.drain()  # the kernel took it: the window, not our buffer, paces it
        except (ConnectionError, SchedulerClosed):
            return

    async def _ping(self, every_s: float = 1.0) -> None:
        """PING every connection once a second: the RTT through the daemons themselves
        (queueing included), and liveness: a connection that has brought no frame for
        ``connect_timeout_s`` (at least 2 s) while being pinged is stuck (a corrupt
        length can leave the far reader waiting for a body that never comes, TCP being
        fine) and is closed, which loses the link: its transfers resume on a new one."""
        loop = asyncio.get_running_loop()
        silent_s = max(2.0, self.settings.connect_timeout_s)
        while not self.dead:
            now = loop.time()
            for conn in self.conns:
                if not conn.is_open:
                    continue
                silent = now - conn.last_frame_at
                if silent > silent_s:
                    conn.fail(
                        ProtocolError(
                            ErrorCode.TIMEOUT, f"no frame for {silent:.0f} s though pinged"
                        )
                    )
                    break  # the link is lost now
                conn.send(Ping(time.monotonic_ns()))
            await asyncio.sleep(every_s)

    def _on_pong(self, frame: Pong) -> None:
        rtt = (time.monotonic_ns() - frame.opaque) / 1e9
        if 0 <= rtt < 600:
            self.rtt_s = rtt if self.rtt_s is None else self.rtt_s + 0.25 * (rtt - self.rtt_s)

    def figures_json(self) -> dict[str, object]:
        """The link's live figures (what the router reads): cheap, no I/O."""
        retrans = 0
        kernel_rtt = []
        for conn in self.conns:
            info = tcp_info(conn) if conn.is_open else None
            if info is not None:
                kernel_rtt.append(info[0])
                retrans += info[1]
        fig = self.figures
        rate = self.bucket.rate
        tcp_rtt = round(max(kernel_rtt), 6) if kernel_rtt else None
        ping_rtt = None if self.rtt_s is None else round(self.rtt_s, 6)
        return {
            "peer": self.address,
            "at": round(time.time(), 3),  # unix seconds: readers judge staleness by it
            "rate_limit_Bps": None if self.bucket.unlimited else rate,
            "rate_limit": format_rate(float("inf") if self.bucket.unlimited else rate),
            "burst_bytes": self.bucket.burst,
            "connections": sum(1 for c in self.conns if c.is_open),
            # Connections still sending warm-up padding (their first transfer is slower).
            "warming": sum(1 for t in self._warmers if not t.done()),
            "transfers": len(self.transfers),
            "wire_Bps": round(fig.wire_Bps),
            "payload_Bps": round(fig.payload_Bps),
            "compression_ratio": round(fig.compression_ratio, 4),
            "queued_chunks": self.queued_chunks,
            "queued_bytes": sum(t.queued_bytes for t in self.transfers.values()),
            "queue_wait_s": round(fig.queue_wait_s, 6),
            # The kernel's RTT where it is known: a PING queues behind chunk data, so under
            # load it reads the queue, not the link (the router wants the link).
            "rtt_s": tcp_rtt if tcp_rtt is not None else ping_rtt,
            "ping_rtt_s": ping_rtt,
            "tcp_rtt_s": tcp_rtt,
            "tcp_retransmits": retrans,
            "payload_bytes_total": fig.payload_total,
            "wire_bytes_total": fig.wire_total,
        }

    @property
    def queued_chunks(self) -> int:
        return sum(t.queued_chunks for t in self.transfers.values())

    def codec_for(self, dtype: str) -> int:
        """The codec for the next chunk of a layer of ``dtype``, by the compression policy.

        ``auto`` compresses while the rate limit binds (chunks wait for tokens), or while
        chunks wait for a link slower than a quarter of what the codec workers can
        compress: on a fast or idle link compression would only add CPU time, on a slow
        one it turns spare CPU into more KV per bit.
        """
        policy = self.compression()
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
        pool, fig = self.codecs, self.figures
        slow = fig.measured and fig.wire_Bps < 0.25 * pool.workers * pool.encode_Bps
        capped = not self.bucket.unlimited or not self.egress.unlimited
        if capped and self.scheduler.waiting():
            return choose_codec(dtype)  # chunks wait for tokens: the cap binds
        if slow and self.queued_chunks:
            return choose_codec(dtype)
        return CODEC_RAW

    def note_sent(self, payload: int, wire: int) -> None:
        self.figures.add(payload, wire)

    def _on_frame(self, conn: FramedProtocol, frame: Frame) -> None:
        if isinstance(frame, Complete | Abort | Have | Ack | Resume | Hold):
            transfer = self.transfers.get(frame.transfer_id)
            if transfer is None:
                return  # ended meanwhile: its late answers are dropped
            if isinstance(frame, Complete):
                transfer.on_complete(frame)
            elif isinstance(frame, Abort):
                transfer.on_peer_abort(frame)
            elif isinstance(frame, Have):
                transfer.on_have(frame, conn)
            elif isinstance(frame, Ack):
                transfer.on_ack(frame)
            elif isinstance(frame, Hold):
                transfer.on_hold(frame)
            else:
                transfer.on_resume(frame)
        elif isinstance(frame, Ping):
            conn.send(Pong(frame.opaque))
        elif isinstance(frame, Pong):
            self._on_pong(frame)
        elif isinstance(frame, GoAway):
            self.goaway = frame
            code = _code_name(frame.code)
            log.warning(
                "peer %s sent GOAWAY %s: %s",
                self.address,
                code,
                frame.message,
                extra={"peer": self.address, "code": code, "cause": f"GOAWAY {self.address}"},
            )

    def _on_close(self, conn: FramedProtocol, error: BaseException | None) -> None:
        self.metrics.connections.labels("peer_out").dec()
        lost = not self.dead  # the first of its connections to close, not by close()
        self.lost.set()
        if lost:
            self.dead = True
            self.scheduler.close()
            if self._pinger is not None:
                self._pinger.cancel()
            self.on_dead(self)
            for other in self.conns:
                if other is not conn:
                    other.close()
        if self.goaway is not None:
            why = f"{_code_name(self.goaway.code)}: {self.goaway.message}"
        else:
            why = str(error) if error else ""
        reason = f"connection to {self.address} lost" + (f": {why}" if why else "")
        if lost:
            log.warning(
                "link to %s lost%s (%d transfers on it)",
                self.address,
                f": {why}" if why else "",
                len(self.transfers),
                extra={
                    "peer": self.address,
                    "transfers": len(self.transfers),
                    "cause": f"link lost {self.address}",
                },
            )
        transfers, self.transfers = self.transfers, {}
        for transfer in transfers.values():
            if not transfer.on_link_lost(reason):
                transfer.fail(ErrorCode.PEER_UNREACHABLE, reason, tell_peer=False)

    def close(self) -> None:
        self.dead = True
        self.lost.set()
        self.scheduler.close()
        if self._pinger is not None:
            self._pinger.cancel()
        for task in self._warmers:
            task.cancel()
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.close()


def _code_name(code: int) -> str:
    return ErrorCode(code).name if code in set(ErrorCode) else f"error {code}"
