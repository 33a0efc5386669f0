"""The daemon's parts on their own, without sockets or a daemon process: the staging budget,
the store set, the transfer registry, an incoming transfer fed chunk by chunk, and a
delivery. Each part takes a narrow interface; the stand-ins below implement exactly it
(what a transfer needs of a peer connection: grant credit, send a frame, forget a transfer).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from kvship.daemon.budget import StagingBudget
from kvship.daemon.codecpool import CodecPool
from kvship.daemon.delivery import EngineArena, Subscription
from kvship.daemon.incoming import IncomingTransfer, ReceiveContext
from kvship.daemon.metrics import Metrics
from kvship.daemon.records import TransferState
from kvship.daemon.registry import TransferRegistry
from kvship.daemon.stores import StoreSet
from kvship.layout.model import FullAttention, ModelLayout
from kvship.payload import CODEC_ZSTD, Encoder
from kvship.protocol import (
    CAP_SHM,
    Abort,
    Chunk,
    ChunkMeta,
    Complete,
    End,
    ErrorCode,
    LayerReady,
    LayerSpec,
    Open,
    Subscribe,
    chunk_checksum,
    digest_of_checksums,
)
from kvship.store import StoreFull

CHUNK = 1024


class PeerStandIn:
    """What an incoming transfer uses of a peer connection, recorded."""

    def __init__(self) -> None:
        self.granted = 0
        self.sent: list[Any] = []
        self.forgotten: list[int] = []
        self.is_open = True
        self.conn = SimpleNamespace(
            forget=self.forgotten.append,
            negotiated=SimpleNamespace(capabilities=0),  # no CAP_RESUME: the plain rules
            is_forgotten=lambda tid: tid in self.forgotten,
        )
        self.failed: BaseException | None = None

    def grant(self, nbytes: int) -> None:
        self.granted += nbytes

    def send(self, frame: Any) -> None:
        self.sent.append(frame)

    def fail(self, error: BaseException) -> None:
        self.failed = error


class EngineStandIn(PeerStandIn):
    """What a delivery uses of an engine connection, recorded."""

    def __init__(self, caps: int = 0, chunk_error: Exception | None = None) -> None:
        super().__init__()
        self.conn = SimpleNamespace(negotiated=SimpleNamespace(capabilities=caps))
        self.chunk_error = chunk_error

    async def send_chunk(self, meta: ChunkMeta, data: memoryview) -> None:
        if self.chunk_error is not None:
            raise self.chunk_error
        self.sent.append(Chunk(meta, bytes(data)))


class DestinationStandIn:
    def __init__(self, active: bool = True) -> None:
        self.active = active
        self.attached = True

    def reserve(self, nbytes: int) -> int | None:
        return None  # no arena room: chunks wait in daemon memory

    def view(self, offset: int, length: int) -> memoryview:
        raise AssertionError("nothing was reserved")


@pytest.fixture
def codecs() -> Iterator[CodecPool]:
    pool = CodecPool(1)
    yield pool
    pool.close()


def context(registry: TransferRegistry, codecs: CodecPool, staging: int = 1 << 20) -> Any:
    metrics = registry.metrics or Metrics()
    return ReceiveContext(
        StagingBudget(staging, metrics.staged_bytes),
        codecs,
        metrics,
        StoreSet(1 << 20),
        registry.received,
        registry.incoming_finished,
    )


def opened(request_id: str = "r", layer_bytes: tuple[int, ...] = (2048, 1500)) -> Open:
    layers = tuple(LayerSpec("uint8", (n,), n) for n in layer_bytes)
    return Open(7, request_id, layers, CHUNK)


def chunks_of(frame: Open) -> list[Chunk]:
    out = []
    index = 0
    for layer, spec in enumerate(frame.layers):
        data = bytes((layer * 31 + i) % 251 for i in range(spec.nbytes))
        for offset in range(0, spec.nbytes, CHUNK):
            piece = data[offset : offset + CHUNK]
            checksum = chunk_checksum(piece)
            meta = ChunkMeta(frame.transfer_id, index, layer, offset, len(piece), checksum)
            out.append(Chunk(meta, memoryview(bytearray(piece))))
            index += 1
    return out


def arrive(registry: TransferRegistry, codecs: CodecPool, frame: Open) -> Any:
    transfer = IncomingTransfer(context(registry, codecs), frame, "prefill")
    registry.add_incoming(transfer)
    peer = PeerStandIn()
    transfer.add_stripe(peer, frame)
    return transfer, peer


def receive_everything(transfer: Any, peer: PeerStandIn, frame: Open) -> None:
    chunks = chunks_of(frame)
    for chunk in chunks:
        transfer.on_chunk(peer, chunk, False)
    digest = digest_of_checksums([c.meta.checksum for c in chunks])
    transfer.on_end(peer, End(frame.transfer_id, len(chunks), digest))


# ------------------------------------------------------------------- staging budget
def test_budget_defers_credit_past_its_bound_and_returns_it_in_order() -> None:
    budget, a, b = StagingBudget(100), PeerStandIn(), PeerStandIn()
    budget.hold(a, 60, 61)
    assert a.granted == 61
    budget.hold(b, 60, 62)  # 120 > 100: b waits
    budget.hold(a, 10, 11)  # waits behind b, though it would fit now
    assert (b.granted, a.granted) == (0, 61)
    budget.unhold(60)
    assert (b.granted, a.granted, budget.staged) == (62, 72, 70)
    budget.hold(b, 50, 5)  # 120 again: waits
    budget.forget(b)  # its connection closed: nobody to give the credit to
    budget.hold(a, 0, 7)
    budget.unhold(120)
    assert (b.granted, a.granted) == (62, 79)  # a's credit went; b's was dropped


class Finisher:
    """A finishing transfer for the budget: ``needs`` says whether only memory lets it
    finish a layer (none of its layers can be handed over)."""

    def __init__(self, needs: bool) -> None:
        self.needs = needs

    def needs_memory_to_finish(self) -> bool:
        return self.needs

    def pause_sender(self, conn: object) -> bool:
        return False


def test_withheld_credit_of_the_finishing_connections_flows_only_when_memory_must_finish() -> None:
    """reconsider() lends memory past the bound only while the waited-for transfer has no
    layer its engine can take: with one to take, the engine's reading frees room, and a
    link faster than the engine would otherwise fill memory layer by layer (it did: 64-100
    MiB staged against a 48 MiB bound, with the machine loaded)."""
    a = PeerStandIn()
    finisher = Finisher(needs=False)
    budget = StagingBudget(100, finishing=lambda: (finisher, {a}))
    budget.hold(a, 100, 10)
    budget.hold(a, 50, 11, owner=finisher)  # past the bound, its engine can read: waits
    budget.reconsider()
    assert a.granted == 10 and budget.deferred_bytes == 11
    finisher.needs = True  # nothing to hand over now: only memory finishes a layer
    budget.reconsider()
    assert a.granted == 21 and budget.deferred_bytes == 0


# ------------------------------------------------------------------------ store set
TINY = ModelLayout("tiny", "org/tiny", (FullAttention(4, 1, 2), FullAttention(4, 1, 2)))
OTHER = ModelLayout("other", "org/other", (FullAttention(4, 1, 2),))


def test_look_ups_never_create_a_store() -> None:
    stores = StoreSet(1 << 20)
    assert stores.get(TINY, 0) is None
    assert stores.cached_blocks(TINY, 0, [b"k" * 16]) == 0
    assert stores.stats()["models"] == 0
    store = stores.for_transfer(TINY, 0)
    assert stores.for_transfer(TINY, 0) is store and stores.get(TINY, 0) is store
    assert stores.get(TINY, 1) is None  # another tp rank is another namespace


def test_stores_share_one_budget_and_drop_only_an_unpinned_one() -> None:
    stores = StoreSet(1 << 20, max_models=2)
    tiny, other = stores.for_transfer(TINY, 0), stores.for_transfer(OTHER, 0)
    assert tiny.budget is other.budget
    tiny.put(b"a" * 16, 0, b"x" * TINY.layers[0].block_bytes)
    tiny.pin([b"a" * 16])
    stores.for_transfer(TINY, 1)  # a third model: the unpinned one (OTHER) goes
    assert stores.get(OTHER, 0) is None and stores.get(TINY, 0) is tiny
    stores.get(TINY, 1).pin([b"b" * 16])  # type: ignore[union-attr]
    with pytest.raises(StoreFull):  # every store in use: refused, nothing dropped
        stores.for_transfer(OTHER, 0)
    assert stores.stats()["models"] == 2


# -------------------------------------------------------- incoming transfer, registry
async def test_a_transfer_arrives_is_claimed_and_delivered(codecs: CodecPool) -> None:
    registry = TransferRegistry(Metrics())
    frame = opened()
    transfer, peer = arrive(registry, codecs, frame)
    assert registry.arriving("r") is transfer and registry.running()
    receive_everything(transfer, peer, frame)
    assert transfer.state is TransferState.RECEIVED and not registry.running()
    assert [type(f) for f in peer.sent] == [Complete]
    assert sorted(transfer.ready_layers()) == [0, 1]
    # No engine yet: the chunks wait in daemon memory, under the bound, so credit returned.
    assert peer.granted == transfer.ctx.budget.staged == frame.total_bytes
    claimed = await registry.claim("r", DestinationStandIn(), timeout=1)
    assert claimed is transfer and not transfer.claimable
    for layer in (0, 1):
        offsets = [o for o, _ in transfer.held_chunks(layer)]
        assert offsets == list(range(0, frame.layers[layer].nbytes, CHUNK))
        transfer.layer_delivered(layer)
    assert transfer.ctx.budget.staged == 0
    transfer.mark_delivered()
    assert registry.history[7].state is TransferState.COMPLETE and not registry.incoming


async def test_a_corrupt_chunk_fails_only_its_transfer_and_frees_its_memory(
    codecs: CodecPool,
) -> None:
    registry = TransferRegistry(Metrics())
    frame = opened()
    transfer, peer = arrive(registry, codecs, frame)
    first, second, *_ = chunks_of(frame)
    transfer.on_chunk(peer, first, False)
    bad = Chunk(second.meta, memoryview(bytearray(b"\0" * len(second.data))))
    transfer.on_chunk(peer, bad, False)  # the transfer fails; the connection is not closed
    assert peer.failed is None and peer.granted == len(first.data) + len(bad.data)
    assert registry.metrics.chunks_corrupt._value.get() == 1  # type: ignore[attr-defined]
    assert transfer.state is TransferState.FAILED
    assert transfer.error[0] is ErrorCode.CHECKSUM_MISMATCH  # type: ignore[index]
    assert isinstance(peer.sent[-1], Abort) and peer.forgotten == [7]
    assert transfer.ctx.budget.staged == 0 and "r" not in registry.by_request
    assert registry.metrics.in_flight.labels("in")._value.get() == 0  # type: ignore[union-attr]


async def test_claim_waits_for_an_arrival_and_one_claimer_gets_it(codecs: CodecPool) -> None:
    registry = TransferRegistry(Metrics())
    first = asyncio.create_task(registry.claim("later", DestinationStandIn(), timeout=5))
    second = asyncio.create_task(registry.claim("later", DestinationStandIn(), timeout=0.3))
    await asyncio.sleep(0)
    assert registry.waiting("later") == 2
    transfer, _ = arrive(registry, codecs, opened("later"))
    assert await first is transfer
    assert await second is None  # claimed already: the second waits out its timeout
    assert registry.waiting("later") == 0


@pytest.mark.parametrize(
    ("claimed_by", "reaped"),
    [(None, True), (DestinationStandIn(active=False), True), (DestinationStandIn(), False)],
    ids=["unclaimed", "orphaned", "being-delivered"],
)
async def test_the_reaper_drops_unclaimed_and_orphaned_transfers(
    codecs: CodecPool, claimed_by: DestinationStandIn | None, reaped: bool
) -> None:
    registry = TransferRegistry(Metrics())
    frame = opened()
    transfer, peer = arrive(registry, codecs, frame)
    receive_everything(transfer, peer, frame)
    if claimed_by is not None:
        assert await registry.claim("r", claimed_by, timeout=1) is transfer
    assert registry.reap(retention_s=60) == []  # not idle long enough
    later = transfer.last_activity + 61
    assert (registry.reap(retention_s=60, now=later) == [transfer]) is reaped
    assert (transfer.state is TransferState.FAILED) is reaped
    if reaped:
        assert transfer.ctx.budget.staged == 0 and not registry.incoming


def test_history_is_bounded() -> None:
    registry = TransferRegistry(history=3)
    for tid in range(5):
        record = SimpleNamespace(transfer_id=tid, direction="out", state=TransferState.FAILED)
        registry._record(record)  # type: ignore[arg-type]
    assert list(registry.history) == [2, 3, 4]


# ----------------------------------------------------------------------- delivery
async def deliver(
    registry: TransferRegistry, engine: EngineStandIn, request_id: str = "r"
) -> Subscription:
    arena = EngineArena()
    arena.negotiated(engine)  # type: ignore[arg-type]
    sub = Subscription(arena, engine, 1, Subscribe(request_id, 5000), registry.claim, 5.0)  # type: ignore[arg-type]
    sub.task = asyncio.create_task(sub.run())
    await asyncio.wait_for(sub.task, 5)  # a hang guard only: it must not wait at all
    return sub


async def test_empty_layers_on_shm_are_delivered_without_waiting_for_an_arena(
    codecs: CodecPool,
) -> None:
    """Regression: the engine skips the arena for a layout with no bytes, and the daemon
    waited 30 s for it, then its task died and the transfer stayed received forever."""
    registry = TransferRegistry(Metrics())
    frame = opened(layer_bytes=(0, 0, 0))
    transfer, peer = arrive(registry, codecs, frame)
    receive_everything(transfer, peer, frame)
    engine = EngineStandIn(caps=CAP_SHM)
    await deliver(registry, engine)
    kinds = [type(f).__name__ for f in engine.sent]
    assert kinds == ["Open", "LayerReady", "LayerReady", "LayerReady", "End", "Complete"]
    assert all(f.nbytes == 0 for f in engine.sent if isinstance(f, LayerReady))
    assert registry.history[7].state is TransferState.COMPLETE


async def test_a_delivery_that_breaks_aborts_and_finishes_its_transfer(codecs: CodecPool) -> None:
    registry = TransferRegistry(Metrics())
    frame = opened()
    transfer, peer = arrive(registry, codecs, frame)
    receive_everything(transfer, peer, frame)
    engine = EngineStandIn(chunk_error=ValueError("engine buffer gone"))
    await deliver(registry, engine)
    assert isinstance(engine.sent[-1], Abort)
    assert engine.sent[-1].code == ErrorCode.INTERNAL_ERROR
    assert "engine buffer gone" in engine.sent[-1].message
    assert transfer.state is TransferState.FAILED and not registry.incoming
    assert transfer.ctx.budget.staged == 0


async def test_a_chunk_declared_held_fails_only_its_transfer(codecs: CodecPool) -> None:
    """A sender that gave up waiting for HAVE sends every chunk; if the receiver's HAVE
    then declared some held, such a chunk fails that transfer (PROTOCOL_ERROR), not the
    connection it came on (it used to hit "arrived twice" and take the connection down)."""
    from kvship.layout.dedup import Manifest
    from kvship.layout.prefix import block_keys
    from kvship.protocol import Have

    model = ModelLayout("held", "org/held", (FullAttention(4, 1, 2),))
    bb = model.layers[0].block_bytes  # type: ignore[union-attr]
    tokens = tuple(range(16))  # 4 full blocks
    keys = block_keys(tokens, model)
    registry = TransferRegistry(Metrics())
    ctx = context(registry, codecs)
    store = ctx.stores.for_transfer(model, 0)
    for key in keys[:2]:
        store.put(key, 0, b"\1" * bb)
    layers = (LayerSpec("uint8", (4 * bb,), 4 * bb),)
    extra = {"dedup": Manifest(model, 0, tuple(keys)).to_extra()}
    frame = Open(9, "held", layers, bb, tokens, extra=extra)
    transfer = IncomingTransfer(ctx, frame, "prefill")
    registry.add_incoming(transfer)
    peer = PeerStandIn()
    transfer.add_stripe(peer, frame)
    transfer.start_dedup(peer)
    for _ in range(200):  # the manifest is checked in a worker thread
        if any(isinstance(f, Have) for f in peer.sent):
            break
        await asyncio.sleep(0.01)
    have = next(f for f in peer.sent if isinstance(f, Have))
    assert have.blocks == 2
    data = b"\1" * bb
    transfer.on_chunk(peer, Chunk(ChunkMeta(9, 0, 0, 0, bb, chunk_checksum(data)), data), False)
    assert transfer.state is TransferState.FAILED and peer.failed is None
    assert transfer.error[0] is ErrorCode.PROTOCOL_ERROR  # type: ignore[index]
    assert not store.pinned  # the held prefix was released


async def test_coded_chunks_land_in_pooled_buffers_that_come_back_once_decoded(
    codecs: CodecPool,
) -> None:
    """A coded chunk's wire bytes go to a pooled buffer (no zero-filled allocation per
    chunk); once decoded the buffer is handed to the next coded chunk, and every layer still
    arrives bit-exact."""
    registry = TransferRegistry(Metrics())
    frame = opened(layer_bytes=(4 * CHUNK,))
    transfer, peer = arrive(registry, codecs, frame)
    encoder = Encoder()
    buffers = []
    for chunk in chunks_of(frame):
        codec, wire = encoder.encode(chunk.data, CODEC_ZSTD)
        assert codec == CODEC_ZSTD
        meta = dataclasses.replace(chunk.meta, codec=codec)
        landing, in_arena = transfer.sink(meta, len(wire))
        assert not in_arena and len(landing) == len(wire)
        landing[:] = wire  # what the peer connection's read does
        buffers.append(landing.obj)
        transfer.on_chunk(peer, Chunk(meta, landing), in_arena)
        while transfer.decoding:
            await asyncio.sleep(0.001)
    assert all(buf is buffers[0] for buf in buffers)  # one buffer, reused for every chunk
    assert transfer.ctx.scratch.idle_bytes == len(buffers[0])
    whole = b"".join(bytes(buf) for _, buf in transfer.held_chunks(0))
    assert whole == b"".join(bytes(c.data) for c in chunks_of(frame))
