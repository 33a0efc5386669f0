"""Frames from the peer connections this daemon accepted: they open, feed and end the
incoming transfers (the handshake is the daemon's, before any of this)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..aio import FramedProtocol
from ..protocol import (
    CAP_DEDUP,
    Abort,
    Chunk,
    ChunkMeta,
    End,
    ErrorCode,
    Frame,
    Open,
    Ping,
    Pong,
    Resume,
)
from .incoming import IncomingTransfer, ReceiveContext
from .logs import transfer_fields
from .records import TransferState
from .registry import TransferRegistry

log = logging.getLogger("kvship.in")


class PeerSink:
    """Payload sink of one peer connection: a chunk's bytes land where its transfer puts
    them, and the tag (``chunk.tag`` on the CHUNK event) says whether that is an engine's
    arena (True) or daemon memory (False)."""

    def __init__(self, registry: TransferRegistry) -> None:
        self.registry = registry

    def __call__(self, meta: ChunkMeta, nbytes: int) -> tuple[memoryview, bool]:
        transfer = self.registry.incoming.get(meta.transfer_id)
        if transfer is None:  # aborted meanwhile: read the bytes and drop them
            return memoryview(bytearray(nbytes)), False
        return transfer.sink(meta, nbytes)


class PeerInbox:
    def __init__(
        self, ctx: ReceiveContext, registry: TransferRegistry, accepting: Callable[[], bool]
    ) -> None:
        self.ctx = ctx
        self.registry = registry
        self.accepting = accepting  # False while the daemon drains

    def sink(self) -> PeerSink:
        return PeerSink(self.registry)

    def on_frame(self, proto: FramedProtocol, frame: Frame) -> None:
        incoming = self.registry.incoming
        if isinstance(frame, Chunk):
            transfer = incoming.get(frame.meta.transfer_id)
            if transfer is None:
                proto.grant(len(frame.data))
            else:
                transfer.on_chunk(proto, frame, frame.tag is True)
        elif isinstance(frame, Open):
            self._on_open(proto, frame)
        elif isinstance(frame, End):
            transfer = incoming.get(frame.transfer_id)
            completion = self.registry.completed.get(frame.transfer_id)
            if completion is not None and (
                transfer is None or transfer.state is not TransferState.OPEN
            ):
                proto.send(completion)  # the END of a resumed, already complete transfer
            elif transfer is not None:
                transfer.on_end(proto, frame)
        elif isinstance(frame, Abort):
            if (transfer := incoming.get(frame.transfer_id)) is not None:
                transfer.fail(
                    ErrorCode.CANCELLED, f"sender aborted: {frame.message}", tell_sender=False
                )
        elif isinstance(frame, Ping):
            proto.send(Pong(frame.opaque))

    def _on_open(self, proto: FramedProtocol, frame: Open) -> None:
        transfer = self.registry.incoming.get(frame.transfer_id)
        if frame.resume:
            self._on_resume(proto, frame, transfer)
            return
        if transfer is not None:  # another stripe of a transfer we know
            transfer.add_stripe(proto, frame)
            return
        if not self.accepting():
            proto.send(Abort(frame.transfer_id, ErrorCode.SHUTTING_DOWN, "draining"))
            return
        peer = proto.conn.negotiated.peer_name
        if self.registry.arriving(frame.request_id) is not None:
            message = f"request {frame.request_id!r} is already arriving"
            self._refuse(proto, frame, ErrorCode.PROTOCOL_ERROR, message, "duplicate request")
            return
        limit = self.ctx.budget.limit
        big = next((i for i, spec in enumerate(frame.layers) if spec.nbytes > limit), None)
        if big is not None:  # it could never be held whole: refuse now, not stall later
            message = (
                f"layer {big} is {frame.layers[big].nbytes} B, above this daemon's "
                f"staging_bytes ({limit} B): raise staging_bytes on the receiving daemon"
            )
            self._refuse(proto, frame, ErrorCode.TRANSFER_TOO_LARGE, message, "too large")
            return
        transfer = IncomingTransfer(self.ctx, frame, peer)
        self.registry.add_incoming(transfer)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "incoming transfer started: %d B in %d layers, %d stripes from %s",
                frame.total_bytes,
                len(frame.layers),
                frame.n_stripes,
                peer,
                extra=transfer.log_fields(),
            )
        transfer.add_stripe(proto, frame)
        if "dedup" in frame.extra and proto.conn.negotiated.capabilities & CAP_DEDUP:
            transfer.start_dedup(proto)

    def _on_resume(
        self, proto: FramedProtocol, frame: Open, transfer: IncomingTransfer | None
    ) -> None:
        """A sender re-opens a transfer on a new connection (SPEC §7.7): go on where it
        stopped, repeat the COMPLETE it may have missed, or say this daemon lost it."""
        tid = frame.transfer_id
        completion = self.registry.completed.get(tid)
        if transfer is not None and transfer.state is TransferState.OPEN:
            transfer.resume(proto, frame)
        elif completion is not None:  # every byte is here: the COMPLETE was lost
            # Everything is held: the sender ENDs each stripe and gets the COMPLETE again
            # (a COMPLETE before the END it answers is refused, SPEC §4.1).
            proto.send(Resume.of(tid, frame.n_chunks, set(range(frame.n_chunks))))
        else:
            message = (
                f"transfer {tid:016x} is not known here (this daemon restarted or dropped "
                "it): it cannot resume"
            )
            self._refuse(proto, frame, ErrorCode.UNKNOWN_TRANSFER, message, "resume unknown")

    def _refuse(
        self, proto: FramedProtocol, frame: Open, code: ErrorCode, message: str, cause: str
    ) -> None:
        """ABORT an OPEN this daemon will not take (the connection stays), logged once per
        cause and peer."""
        peer = proto.conn.negotiated.peer_name
        log.warning(
            "incoming transfer from %s refused: %s",
            peer,
            message,
            extra=transfer_fields(
                frame.transfer_id,
                frame.request_id,
                peer,
                direction="in",
                code=code.name,
                cause=f"{cause} {peer}",
            ),
        )
        proto.send(Abort(frame.transfer_id, code, message))

    def on_close(self, proto: FramedProtocol, error: BaseException | None) -> None:
        for transfer in list(self.registry.incoming.values()):
            transfer.on_stripe_lost(proto, error)
        self.ctx.budget.forget(proto)
