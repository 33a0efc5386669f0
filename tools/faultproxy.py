"""A fault-injecting TCP proxy for loopback soaks and tests (stdlib asyncio only).

It listens on 127.0.0.1 and forwards every accepted connection to one upstream
(``host, port``), both ways. A seeded :class:`Schedule` decides, per connection and per
forwarded segment (one ``read`` of up to ``read_bytes``), whether to inject one fault:

``reset``     forward a random prefix of the segment, then RST both sides (SO_LINGER 0 +
              ``transport.abort()``): a connection lost mid-stream, usually mid-frame.
``stall``     stop forwarding on the connection, both ways, for N ms (capped).
``truncate``  forward a random prefix of the segment, then close both sides cleanly (FIN).
``flip``      flip one random bit of one byte of the segment.
``delay``     hold this segment back for N ms (capped); the other direction keeps going.

Why a proxy and not a patched daemon: the daemons under test stay exactly the code that
ships, and the faults are the ones a network (or a broken middlebox) really makes.

Usage::

    async with FaultProxy(("127.0.0.1", port), Schedule(seed=1, reset=0.001)) as proxy:
        connect_to(proxy.address)
        ...
        proxy.pause_faults()      # forward faithfully from now on
        proxy.reset_all()         # RST every live connection at once
        proxy.inject(Fault("flip", at=1, bit=3), DOWN)  # one exact fault, next segment
        print(proxy.stats())      # faults_injected, faults_by_kind, bytes_up/down ...

The same seed gives the same decisions: connection *n* (in accept order) in direction
``up`` (client -> upstream) or ``down`` draws from ``random.Random(f"{seed}/{n}/{dir}")``,
one decision per segment. Segment boundaries depend on TCP timing, so a run is
reproducible in its decisions, not byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

KINDS = ("reset", "stall", "truncate", "flip", "delay")
UP, DOWN = "up", "down"  # up: accepted client -> upstream; down: upstream -> client
MAX_PAUSE_MS = 5000  # no stall or delay is ever longer than this
FLUSH_TIMEOUT_S = 2.0  # how long a reset/truncate waits for its prefix to leave
CLOSE_TIMEOUT_S = 2.0  # how long aclose() waits for connection handlers to end
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


@dataclass(frozen=True)
class Fault:
    """One decision: ``at`` is the byte of the segment a reset/truncate cuts before, or the
    byte a flip changes (``bit`` 0..7); ``ms`` is a stall's or delay's length."""

    kind: str
    at: int = 0
    bit: int = 0
    ms: int = 0


@dataclass(frozen=True)
class Schedule:
    """Per-segment probabilities of each fault kind (at most one fault per segment) and
    where they apply. Probabilities are per forwarded segment, so the fault rate follows
    the traffic: a busy connection sees more faults than an idle one."""

    seed: int = 0
    reset: float = 0.0
    stall: float = 0.0
    truncate: float = 0.0
    flip: float = 0.0
    delay: float = 0.0
    directions: tuple[str, ...] = (UP, DOWN)
    stall_ms: tuple[int, int] = (50, 500)
    delay_ms: tuple[int, int] = (1, 20)

    def __post_init__(self) -> None:
        rates = [self.rate(kind) for kind in KINDS]
        if any(not 0.0 <= r <= 1.0 for r in rates) or sum(rates) > 1.0:
            raise ValueError(f"fault probabilities must be in [0, 1] and sum to <= 1: {rates}")
        if not set(self.directions) <= {UP, DOWN}:
            raise ValueError(f"directions: {UP!r} and/or {DOWN!r}, got {self.directions!r}")
        for name in ("stall_ms", "delay_ms"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi <= MAX_PAUSE_MS:
                raise ValueError(f"{name}: need 0 <= lo <= hi <= {MAX_PAUSE_MS}, got {lo, hi}")

    def rate(self, kind: str) -> float:
        return float(getattr(self, kind))

    def decider(self, conn_id: int, direction: str) -> Decider:
        """The decision stream of one connection's one direction (deterministic)."""
        return Decider(self, random.Random(f"{self.seed}/{conn_id}/{direction}"), direction)


class Decider:
    """Draws one decision per segment; every call consumes the same number of draws, so
    the n-th decision depends only on the seed and n (and segment lengths)."""

    def __init__(self, schedule: Schedule, rng: random.Random, direction: str) -> None:
        self.schedule = schedule
        self.rng = rng
        self.active = direction in schedule.directions

    def next(self, length: int) -> Fault | None:
        rng, s = self.rng, self.schedule
        r, at, bit = rng.random(), rng.randrange(max(1, length)), rng.randrange(8)
        stall_ms, delay_ms = rng.randint(*s.stall_ms), rng.randint(*s.delay_ms)
        if not self.active:
            return None
        for kind in KINDS:
            r -= s.rate(kind)
            if r < 0:
                ms = {"stall": stall_ms, "delay": delay_ms}.get(kind, 0)
                return Fault(kind, at=at, bit=bit if kind == "flip" else 0, ms=ms)
        return None


class _Link:
    """One proxied connection: both sockets, the connection-wide stall, how it ended."""

    def __init__(self, conn_id: int, client: asyncio.StreamWriter) -> None:
        self.id = conn_id
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.stalled_until = 0.0  # loop time; both directions wait for it
        self.closed = False

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]

    def reset(self) -> None:
        """RST both sides now (unsent bytes are dropped: that is what a reset does)."""
        self.closed = True
        for writer in self.writers():
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            writer.transport.abort()

    def close(self) -> None:
        """FIN both sides (after what is buffered)."""
        self.closed = True
        for writer in self.writers():
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof() and not writer.transport.is_closing():
                    writer.write_eof()
            writer.close()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 that injects the faults its :class:`Schedule` draws."""

    def __init__(
        self,
        upstream: tuple[str, int],
        schedule: Schedule | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        read_bytes: int = 256 * 1024,
        connect_timeout_s: float = 5.0,
        event_log: int = 10_000,
    ) -> None:
        self.upstream = upstream
        self.schedule = schedule or Schedule()
        self.host, self.port = host, port
        self.read_bytes = read_bytes
        self.connect_timeout_s = connect_timeout_s
        self.faults_paused = False
        # The most recent decisions taken (conn id, direction, fault): for tests and logs.
        self.events: deque[tuple[int, str, Fault]] = deque(maxlen=event_log)
        self._server: asyncio.Server | None = None
        self._ids = itertools.count()
        self._links: dict[int, _Link] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._by_kind = dict.fromkeys(KINDS, 0)
        self._bytes = {UP: 0, DOWN: 0}
        self._accepted = 0
        self._connect_failures = 0
        self._reset_all_calls = 0
        self._injected: dict[str, list[Fault]] = {UP: [], DOWN: []}  # inject()'s, in order

    # ------------------------------------------------------------ life
    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def aclose(self) -> None:
        """Stop listening, RST what is still open, wait (bounded) for the handlers."""
        if self._server is not None:
            self._server.close()
        for link in list(self._links.values()):
            link.reset()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=CLOSE_TIMEOUT_S)
        for task in self._tasks:
            task.cancel()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def address(self) -> str:
        """``host:port`` to give a client (a kvshipd's ``peer``) instead of the upstream."""
        return f"{self.host}:{self.port}"

    # ----------------------------------------------------------- control
    def pause_faults(self) -> None:
        """Forward faithfully (no decisions drawn) until :meth:`resume_faults`."""
        self.faults_paused = True

    def resume_faults(self) -> None:
        self.faults_paused = False

    def reset_all(self) -> int:
        """RST every live connection now (a link flap); returns how many. Each counts as
        a ``reset`` fault."""
        self._reset_all_calls += 1
        links = [link for link in self._links.values() if not link.closed]
        for link in links:
            link.reset()
        self._by_kind["reset"] += len(links)
        return len(links)

    def inject(self, fault: Fault, direction: str = UP) -> None:
        """Apply ``fault`` to the next segment forwarded in ``direction`` (on whichever
        connection forwards one first), schedule or not, paused or not: to reproduce one
        exact fault (``Fault("flip", at=1, bit=3)`` flips bit 3 of the segment's byte 1)."""
        if fault.kind not in KINDS or direction not in (UP, DOWN):
            raise ValueError(f"unknown fault {fault.kind!r} or direction {direction!r}")
        self._injected[direction].append(fault)

    def stats(self) -> dict[str, Any]:
        return {
            "faults_injected": sum(self._by_kind.values()),
            "faults_by_kind": dict(self._by_kind),
            "bytes_up": self._bytes[UP],
            "bytes_down": self._bytes[DOWN],
            "connections_accepted": self._accepted,
            "connections_live": len(self._links),
            "upstream_connect_failures": self._connect_failures,
            "reset_all_calls": self._reset_all_calls,
        }

    # -------------------------------------------------------- forwarding
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn_id = next(self._ids)
        self._accepted += 1
        link = _Link(conn_id, writer)
        self._links[conn_id] = link
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.upstream), self.connect_timeout_s
                )
            except (OSError, TimeoutError):
                self._connect_failures += 1
                link.reset()
                return
            link.upstream = up_writer
            for w in link.writers():  # drain() waits until the kernel holds every byte
                w.transport.set_write_buffer_limits(high=0)
            if link.closed:  # reset_all() while we connected
                link.reset()
                return
            await asyncio.gather(
                self._pump(link, reader, up_writer, self.schedule.decider(conn_id, UP), UP),
                self._pump(link, up_reader, writer, self.schedule.decider(conn_id, DOWN), DOWN),
            )
        finally:
            if not link.closed:
                link.close()
            self._links.pop(conn_id, None)
            self._tasks.discard(task)

    async def _pump(
        self,
        link: _Link,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        decider: Decider,
        direction: str,
    ) -> None:
        """Forward ``src`` -> ``dst`` until EOF or a fault ends the connection."""
        loop = asyncio.get_running_loop()
        try:
            while not link.closed:
                data = await src.read(self.read_bytes)
                if link.closed:
                    return
                if not data:  # EOF: pass the half-close on, the other way keeps going
                    if dst.can_write_eof() and not dst.transport.is_closing():
                        dst.write_eof()
                    return
                fault = None if self.faults_paused else decider.next(len(data))
                if self._injected[direction]:
                    fault = self._injected[direction].pop(0)
                    fault = replace(fault, at=min(fault.at, len(data) - 1))
                if fault is not None:
                    self._by_kind[fault.kind] += 1
                    self.events.append((link.id, direction, fault))
                    if fault.kind == "stall":
                        link.stalled_until = max(link.stalled_until, loop.time() + fault.ms / 1e3)
                    elif fault.kind == "delay":
                        await asyncio.sleep(fault.ms / 1e3)
                    elif fault.kind == "flip":
                        flipped = bytearray(data)
                        flipped[fault.at] ^= 1 << fault.bit
                        data = bytes(flipped)
                    else:  # reset / truncate: a prefix, then the end
                        await self._write(dst, data[: fault.at], direction)
                        await self._flushed(dst)
                        if fault.kind == "reset":
                            link.reset()
                        else:
                            link.close()
                        return
                wait = link.stalled_until - loop.time()
                if wait > 0:
                    await asyncio.sleep(min(wait, MAX_PAUSE_MS / 1e3))
                if link.closed:
                    return
                await self._write(dst, data, direction)
        except (OSError, RuntimeError):  # one side reset or broke: so does the other
            if not link.closed:
                link.reset()

    async def _write(self, dst: asyncio.StreamWriter, data: bytes, direction: str) -> None:
        if data:
            dst.write(data)
            await dst.drain()
            self._bytes[direction] += len(data)

    @staticmethod
    async def _flushed(dst: asyncio.StreamWriter) -> None:
        """Wait (bounded) until the transport has handed every byte to the kernel."""
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while dst.transport.get_write_buffer_size() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
