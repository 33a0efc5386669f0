"""The local engine API: what a kvship.Client on this host (or another) asks of its daemon.

An engine connection carries sends (OPEN with a destination peer, then chunks, then
END; the daemon answers COMPLETE or ABORT) and receives (SUBSCRIBE; the daemon answers
OPEN with the layout, then whole verified layers, then COMPLETE or ABORT). On the Unix
socket the engine attaches a shared-memory arena and chunks travel by reference.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

from ..aio import FramedProtocol, spawn
from ..protocol import (
    Abort,
    Chunk,
    End,
    ErrorCode,
    Frame,
    Open,
    Ping,
    Pong,
    ProtocolError,
    Release,
    ShmAttach,
    ShmAttached,
    ShmChunk,
    Subscribe,
)
from ..staging import Arena
from .delivery import Claim, EngineArena, Subscription
from .outgoing import EngineHold, OutgoingTransfer

log = logging.getLogger("kvship.engine")

StartSend = Callable[[FramedProtocol, Open, EngineHold], OutgoingTransfer]
DELIVERY_ID_BASE = 1 << 63  # deliveries' transfer ids; engines keep theirs below it


class EngineSession:
    """One engine connection and everything it has going on.

    It starts sends (``start_send``), claims arrivals for its subscriptions (``claim``),
    and refuses new sends while ``accepting()`` is False (the daemon drains)."""

    def __init__(
        self,
        start_send: StartSend,
        claim: Claim,
        accepting: Callable[[], bool],
        subscribe_timeout_s: float,
        copy_min_rtt_s: float,
    ) -> None:
        self._start_send = start_send
        self._claim = claim
        self._accepting = accepting
        self._subscribe_timeout_s = subscribe_timeout_s
        self.arena = EngineArena()
        # What its sends keep of its memory while they wait for ACKs.
        self.hold = EngineHold(0, copy_min_rtt_s)
        self.sends: dict[int, OutgoingTransfer] = {}
        self.subs: dict[int, Subscription] = {}
        # Ids of this daemon's deliveries on the connection: top bit set, so they never
        # collide with the engine's own transfer ids (SPEC §9.3) on a connection that
        # carries both.
        self._tids = itertools.count(DELIVERY_ID_BASE + 1)

    def handshaken(self, conn: FramedProtocol) -> None:
        self.arena.negotiated(conn)
        self.hold.resize(conn.conn.limits.initial_window)  # inline chunks hold its credit

    def on_frame(self, conn: FramedProtocol, frame: Frame) -> None:
        if isinstance(frame, ShmChunk):
            self._on_shm_chunk(conn, frame)
        elif isinstance(frame, Chunk):
            send = self._send_for(frame.meta.transfer_id)
            n = len(frame.data)
            if send is None:
                conn.grant(n)
            else:
                send.add_chunk(frame.meta, frame.view, lambda: conn.grant(n))
        elif isinstance(frame, Open):
            self._on_open(conn, frame)
        elif isinstance(frame, End):
            send = self._send_for(frame.transfer_id)
            if send is not None:
                send.end(frame)
        elif isinstance(frame, Subscribe):
            self._on_subscribe(conn, frame)
        elif isinstance(frame, Release):
            self._on_release(frame)
        elif isinstance(frame, Abort):
            if (send := self.sends.get(frame.transfer_id)) is not None:
                send.fail(ErrorCode.CANCELLED, "cancelled by the engine", tell_engine=False)
            if (sub := self.subs.get(frame.transfer_id)) is not None:
                sub.cancel()
        elif isinstance(frame, ShmAttach):
            self._on_attach(conn, frame)
        elif isinstance(frame, Ping):
            conn.send(Pong(frame.opaque))

    def _send_for(self, engine_tid: int) -> OutgoingTransfer | None:
        send = self.sends.get(engine_tid)
        return None if send is None or send.done.done() else send

    def _on_attach(self, conn: FramedProtocol, frame: ShmAttach) -> None:
        if not self.arena.shm or self.arena.arena is not None:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "SHM_ATTACH without CAP_SHM, or twice")
        try:
            arena = Arena.attach(frame.path, frame.size)
        except (OSError, ValueError) as exc:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"cannot map arena: {exc}") from exc
        self.arena.attach(arena)
        self.hold.resize(arena.size, shared=True)
        conn.send(ShmAttached(frame.size))

    def _on_shm_chunk(self, conn: FramedProtocol, frame: ShmChunk) -> None:
        arena = self.arena
        if arena.arena is None:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "SHM_CHUNK before SHM_ATTACH")
        if arena.owner == "daemon":
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "SHM_CHUNK into a receive arena")
        arena.owner = "engine"
        length = frame.meta.raw_length
        try:
            data = arena.arena.view(frame.arena_offset, length)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, str(exc)) from exc
        offset = frame.arena_offset

        def release() -> None:
            if conn.is_open:
                conn.send(Release(offset, length))

        send = self._send_for(frame.meta.transfer_id)
        if send is None:
            release()
        else:
            send.add_chunk(frame.meta, data, release)

    def _on_open(self, conn: FramedProtocol, frame: Open) -> None:
        if frame.transfer_id in self.sends:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "engine reused a transfer id")
        if not self._accepting():
            conn.send(Abort(frame.transfer_id, ErrorCode.SHUTTING_DOWN, "daemon is draining"))
            return
        if not frame.peer:
            conn.send(Abort(frame.transfer_id, ErrorCode.PROTOCOL_ERROR, "OPEN names no peer"))
            return
        send = self.sends[frame.transfer_id] = self._start_send(conn, frame, self.hold)
        tid = frame.transfer_id
        send.done.add_done_callback(lambda _: self.sends.pop(tid, None))

    def _on_subscribe(self, conn: FramedProtocol, frame: Subscribe) -> None:
        limit = conn.conn.limits.max_transfers
        if len(self.subs) >= limit:  # each delivery is a transfer on this connection
            message = f"{len(self.subs)} deliveries already wait on this connection (max {limit})"
            conn.send(Abort(0, ErrorCode.TOO_MANY_TRANSFERS, message))
            return
        tid = next(self._tids)
        sub = Subscription(self.arena, conn, tid, frame, self._claim, self._subscribe_timeout_s)
        self.subs[tid] = sub
        sub.task = spawn(sub.run(), name=f"sub-{frame.request_id}")
        sub.task.add_done_callback(lambda _: self.subs.pop(tid, None))

    def _on_release(self, frame: Release) -> None:
        arena = self.arena
        if arena.allocator is None or arena.owner != "daemon":
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "RELEASE without an arena")
        try:
            arena.allocator.release(frame.arena_offset, frame.length)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"RELEASE: {exc}") from None
        for sub in self.subs.values():
            if sub.transfer is not None:
                sub.transfer.wake()

    def on_close(self, conn: FramedProtocol, error: BaseException | None) -> None:
        for send in self.sends.values():
            send.fail(ErrorCode.CANCELLED, "engine disconnected", tell_engine=False)
        for sub in self.subs.values():
            sub.cancel()
        self.arena.close()
