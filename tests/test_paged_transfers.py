"""kvship.integrations.paged between real daemons: a paged engine's pages leave layer by
layer and land, bit-exact, in the far engine's blocks (only the planned ones); a shared
prefix ships only its new pages; every failure (never arrives, wrong layout, cut off, dead
daemon, unreachable peer, cancelled) is an error outcome within its bound, never a hang."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import running_pair, wait_until
from kvship import Client
from kvship.bench.spawn import DaemonProcess
from kvship.integrations.paged import (
    LayoutMismatch,
    PagedConfig,
    PagedGeometry,
    PagedTransfers,
    StatsLog,
)
from kvship.layout import uniform_layout

BLOCK, HEADS, DIM, LAYERS, N_BLOCKS = 16, 2, 32, 4, 64
PAGE = (HEADS, BLOCK, 2 * DIM)
GEOMETRY = PagedGeometry("paged-test", LAYERS, BLOCK, HEADS, DIM, "float32", PAGE)


def caches(seed: int | None) -> list[np.ndarray]:
    """One engine's paged caches: random (a producer's) or zeros (a consumer's)."""
    shape = (N_BLOCKS, *GEOMETRY.page_shape)
    if seed is None:
        return [np.zeros(shape, np.float32) for _ in range(LAYERS)]
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, np.float32) for _ in range(LAYERS)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, ...]]:
    with running_pair(tmp_path_factory.mktemp("paged")) as p:
        yield p


def engines(pair: tuple[DaemonProcess, ...], **kwargs: object) -> tuple[PagedTransfers, ...]:
    a, b = pair
    producer = PagedTransfers(GEOMETRY, caches(1), address=a.socket_path, peer=b.peer, **kwargs)
    consumer = PagedTransfers(GEOMETRY, caches(None), address=b.socket_path, **kwargs)
    return producer, consumer


def save(producer: PagedTransfers, key: str, tokens: list[int], blocks: list[int]) -> None:
    """What a producer's steps do: open, then each layer's pages as it is computed."""
    producer.begin_save(key, tokens)
    for layer in range(LAYERS):
        producer.save_layer(key, layer, np.take(producer.caches[layer], blocks, axis=0))
    producer.prefill_ended(key)


def outcome(poll: object, key: str, timeout: float = 20.0) -> object:
    found: list[object] = []

    def done() -> bool:
        found.extend(o for o in poll() if o.key == key)  # type: ignore[operator, attr-defined]
        return bool(found)

    wait_until(done, timeout, f"the outcome of {key}")
    return found[0]


def test_pages_land_bit_exact_in_the_planned_blocks_only(pair: tuple[DaemonProcess, ...]) -> None:
    producer, consumer = engines(pair)
    try:
        tokens = list(range(1000, 1000 + 5 * BLOCK + 7))  # 6 pages, the last partial
        src = [3, 9, 4, 40, 41, 17]
        save(producer, "paged-exact", tokens, src)
        out = outcome(producer.finished_saves, "paged-exact")
        assert out.error is None and len(out.put_times) == LAYERS  # type: ignore[attr-defined]
        # The consumer's local prefix cache holds pages 0 and 1: it loads pages 2..5 only.
        dst = [50, 51, 52, 53]
        consumer.begin_load("paged-exact", len(tokens), [2, 3, 4, 5], dst)
        loaded = outcome(consumer.finished_loads, "paged-exact")
        assert loaded.error is None and loaded.layers_written == LAYERS  # type: ignore[attr-defined]
        for layer in range(LAYERS):
            got, want = consumer.caches[layer], producer.caches[layer]
            np.testing.assert_array_equal(got[dst], want[src[2:]])
            untouched = np.ones(N_BLOCKS, bool)
            untouched[dst] = False
            assert not got[untouched].any()
    finally:
        producer.close()
        consumer.close()


def test_a_plan_with_gaps_and_any_order_lands_page_by_page(
    pair: tuple[DaemonProcess, ...],
) -> None:
    """Pages not in one run (a prefix hit with holes, any order) take the gather path."""
    producer, consumer = engines(pair)
    try:
        tokens = list(range(500, 500 + 5 * BLOCK))
        src = [10, 11, 12, 13, 14]
        save(producer, "paged-gaps", tokens, src)
        assert outcome(producer.finished_saves, "paged-gaps").error is None  # type: ignore[attr-defined]
        consumer.begin_load("paged-gaps", len(tokens), [4, 1, 3], [9, 7, 8])
        assert outcome(consumer.finished_loads, "paged-gaps").error is None  # type: ignore[attr-defined]
        for layer in range(LAYERS):
            got, want = consumer.caches[layer], producer.caches[layer]
            np.testing.assert_array_equal(got[[9, 7, 8]], want[[14, 11, 13]])
            assert not got[[0, 1, 2, 3, 4, 5, 6]].any()
    finally:
        producer.close()
        consumer.close()


def test_a_shared_prefix_ships_only_its_new_pages(pair: tuple[DaemonProcess, ...]) -> None:
    a, _ = pair
    producer, consumer = engines(pair, chunk_bytes=GEOMETRY.page_bytes)  # dedup per page
    try:
        first = list(range(7, 7 + 8 * BLOCK))
        second = first[: 7 * BLOCK] + [5] * (BLOCK // 2)  # 7 shared pages, 1 new partial
        blocks = list(range(8))
        shipped = []
        for key, tokens in (("paged-first", first), ("paged-second", second)):
            before = a.metric("kvship_wire_sent_bytes")
            n = GEOMETRY.pages_for(len(tokens))
            save(producer, key, tokens, blocks[:n])
            assert outcome(producer.finished_saves, key).error is None  # type: ignore[attr-defined]
            consumer.begin_load(key, len(tokens), list(range(n)), list(range(10, 10 + n)))
            assert outcome(consumer.finished_loads, key).error is None  # type: ignore[attr-defined]
            shipped.append(a.metric("kvship_wire_sent_bytes") - before)
            for layer in range(LAYERS):
                np.testing.assert_array_equal(
                    consumer.caches[layer][10 : 10 + n], producer.caches[layer][:n]
                )
        # 1 of 8 pages, plus the frames around it.
        assert shipped[1] < 0.25 * shipped[0], shipped
    finally:
        producer.close()
        consumer.close()


def test_a_transfer_that_never_arrives_fails_within_the_layer_timeout(
    pair: tuple[DaemonProcess, ...],
) -> None:
    _, consumer = engines(pair, layer_timeout=0.5)
    try:
        started = time.monotonic()
        consumer.begin_load("paged-nobody", 40, [0, 1, 2], [1, 2, 3])
        out = outcome(consumer.finished_loads, "paged-nobody", timeout=10)
        assert "RequestNotFound" in out.error  # type: ignore[attr-defined]
        assert out.block_ids == (1, 2, 3)  # type: ignore[attr-defined]
        assert time.monotonic() - started < 5
    finally:
        consumer.close()


async def _foreign_send(
    a: DaemonProcess, peer: str, key: str, n_tokens: int, block: int, cut_after: int | None
) -> None:
    """Another producer's transfer: pages of ``block`` tokens, or cut off after some layers."""
    n_pages = -(-n_tokens // block)
    layout = uniform_layout(LAYERS, "float32", (n_pages, HEADS, block, 2 * DIM))
    async with Client(a.socket_path) as client, client.send(key, layout, peer=peer) as sender:
        for i in range(LAYERS):
            if cut_after is not None and i == cut_after:
                await asyncio.sleep(0.3)  # the consumer has those layers by now
                await sender.abort()
                return
            await sender.put(i, np.ones(layout[i].shape, np.float32))
        await sender.finish(timeout=10)


def test_a_layout_from_another_block_size_is_refused_naming_both(
    pair: tuple[DaemonProcess, ...],
) -> None:
    a, b = pair
    _, consumer = engines(pair)
    try:
        consumer.begin_load("paged-mismatch", 40, [0, 1, 2], [1, 2, 3])
        asyncio.run(_foreign_send(a, b.peer, "paged-mismatch", 40, 2 * BLOCK, None))
        out = outcome(consumer.finished_loads, "paged-mismatch")
        assert out.error.startswith(LayoutMismatch.__name__)  # type: ignore[attr-defined]
        assert "block size" in out.error and "[2, 2, 32, 64]" in out.error  # type: ignore[attr-defined]
        assert not any(c.any() for c in consumer.caches)  # nothing written
    finally:
        consumer.close()


def test_a_transfer_cut_off_half_way_is_an_error_with_its_blocks(
    pair: tuple[DaemonProcess, ...],
) -> None:
    a, b = pair
    _, consumer = engines(pair)
    try:
        consumer.begin_load("paged-cut", 40, [0, 1, 2], [5, 6, 7])
        time.sleep(0.2)  # subscribed before the transfer starts
        asyncio.run(_foreign_send(a, b.peer, "paged-cut", 40, BLOCK, cut_after=2))
        out = outcome(consumer.finished_loads, "paged-cut")
        assert out.error is not None and out.layers_written < LAYERS  # type: ignore[attr-defined]
        assert "TransferError" in out.error  # type: ignore[attr-defined]
        assert out.block_ids == (5, 6, 7)  # type: ignore[attr-defined]  # the engine drops them
    finally:
        consumer.close()


def test_a_dead_local_daemon_fails_loads_and_saves_at_once(tmp_path: object) -> None:
    missing = f"{tmp_path}/no-daemon.sock"
    engine = PagedTransfers(
        GEOMETRY, caches(None), address=missing, peer="127.0.0.1:9", connect_timeout=1.0
    )
    try:
        engine.begin_load("paged-dead", 20, [0, 1], [0, 1])
        engine.begin_save("paged-dead-save", list(range(20)))
        load = outcome(engine.finished_loads, "paged-dead", timeout=10)
        saved = outcome(engine.finished_saves, "paged-dead-save", timeout=10)
        assert "DaemonUnavailable" in load.error  # type: ignore[attr-defined]
        assert "cannot" in saved.error or "connect" in saved.error  # type: ignore[attr-defined]
    finally:
        engine.close()


def test_an_unreachable_peer_and_a_cancel_end_their_saves(pair: tuple[DaemonProcess, ...]) -> None:
    a, _ = pair
    engine = PagedTransfers(GEOMETRY, caches(2), address=a.socket_path, peer="127.0.0.1:9")
    try:
        save(engine, "paged-unreachable", list(range(20)), [0, 1])
        out = outcome(engine.finished_saves, "paged-unreachable")
        assert out.error is not None  # type: ignore[attr-defined]
        engine.begin_save("paged-cancel", list(range(20)), peer=a.peer)
        engine.cancel_save("paged-cancel", "request aborted")
        cancelled = outcome(engine.finished_saves, "paged-cancel")
        assert "cancelled: request aborted" in cancelled.error  # type: ignore[attr-defined]
        assert engine.pending() == 0
    finally:
        engine.close()


def test_a_save_whose_layers_never_come_times_out(pair: tuple[DaemonProcess, ...]) -> None:
    a, b = pair
    engine = PagedTransfers(
        GEOMETRY, caches(3), address=a.socket_path, peer=b.peer, save_timeout=0.5
    )
    try:
        engine.begin_save("paged-stalled", list(range(20)))
        engine.save_layer("paged-stalled", 0, np.take(engine.caches[0], [0, 1], axis=0))
        out = outcome(engine.finished_saves, "paged-stalled", timeout=10)
        assert "not acknowledged within 0.5 s" in out.error  # type: ignore[attr-defined]
        assert len(out.put_times) == 1  # type: ignore[attr-defined]
    finally:
        engine.close()


def test_geometry_checks_and_chunks_of_whole_pages() -> None:
    assert GEOMETRY.page_bytes == HEADS * BLOCK * 2 * DIM * 4
    assert GEOMETRY.chunk_bytes() % GEOMETRY.page_bytes == 0
    assert GEOMETRY.chunk_bytes() <= 4 << 20 < GEOMETRY.chunk_bytes() + GEOMETRY.page_bytes
    assert GEOMETRY.chunk_bytes(1) == GEOMETRY.page_bytes  # at least one page
    assert GEOMETRY.pages_for(BLOCK) == 1 and GEOMETRY.pages_for(BLOCK + 1) == 2
    assert GEOMETRY.model.block_tokens == BLOCK
    assert GEOMETRY.mismatch(GEOMETRY.layout(40), 40) is None
    assert "3 layers" in str(GEOMETRY.mismatch(GEOMETRY.layout(40)[:3], 40))
    fp16 = uniform_layout(LAYERS, "float16", (3, *GEOMETRY.page_shape))
    assert "float16" in str(GEOMETRY.mismatch(fp16, 40))
    with pytest.raises(ValueError, match="does not hold K and V"):
        PagedGeometry("m", 2, BLOCK, HEADS, DIM, "float32", (HEADS, BLOCK, DIM))
    with pytest.raises(ValueError, match="not one kvship ships"):
        PagedGeometry("m", 2, BLOCK, HEADS, DIM, "complex64", GEOMETRY.page_shape)
    with pytest.raises(ValueError, match="cache 0"):
        PagedTransfers(GEOMETRY, [np.zeros((4, 1), np.float32)] * LAYERS, address="/nowhere")
    with pytest.raises(ValueError, match="page ids outside"):
        engine = PagedTransfers(GEOMETRY, caches(None), address="/nowhere")
        try:
            engine.begin_load("k", BLOCK, [1], [0])
        finally:
            engine.close()


def test_config_refuses_unknown_keys_and_bad_values(tmp_path: object) -> None:
    config = PagedConfig.from_extra({"peer": "h:1", "load_timeout_s": 5, "chunk_bytes": 4096})
    assert config.load_timeout_s == 5.0 and config.peer == "h:1" and config.chunk_bytes == 4096
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['peeer'\]"):
        PagedConfig.from_extra({"peeer": "h:1"})
    with pytest.raises(ValueError, match="load_timeout_s must be a positive number"):
        PagedConfig.from_extra({"load_timeout_s": 0})
    with pytest.raises(ValueError, match="chunk_bytes"):
        PagedConfig.from_extra({"chunk_bytes": "big"})
    with pytest.raises(ValueError, match="peer must be a string"):
        PagedConfig.from_extra({"peer": 7})
    path = f"{tmp_path}/stats.jsonl"
    log = StatsLog(path)
    log.write("save", {"key": "a"})
    log.write("load", {"key": "b"})
    lines = Path(path).read_text().splitlines()
    assert [line.count('"key"') for line in lines] == [1, 1] and '"event": "load"' in lines[1]
    StatsLog(None).write("save", {"key": "c"})  # no path: nothing, no error


def test_warm_connections_are_made_at_start_and_used_first(
    pair: tuple[DaemonProcess, ...],
) -> None:
    """With warm_sends/warm_receives the pooled connections (and the receive arena) exist
    before the first request: the daemon counts them at once, and the first save and
    load use them instead of opening new ones."""
    a, b = pair
    before_a = a.metric("kvship_connections", 'kind="engine_unix"')
    before_b = b.metric("kvship_connections", 'kind="engine_unix"')
    producer = PagedTransfers(GEOMETRY, caches(4), address=a.socket_path, peer=b.peer, warm_sends=1)
    consumer = PagedTransfers(
        GEOMETRY,
        caches(None),
        address=b.socket_path,
        warm_receives=1,
        receive_arena_bytes=3 * 4 * GEOMETRY.page_bytes,
    )
    try:
        assert producer.wait_warm(10) and consumer.wait_warm(10)
        assert a.metric("kvship_connections", 'kind="engine_unix"') == before_a + 1
        assert b.metric("kvship_connections", 'kind="engine_unix"') == before_b + 1
        tokens = list(range(3 * BLOCK))
        save(producer, "paged-warm", tokens, [1, 2, 3])
        consumer.begin_load("paged-warm", len(tokens), [0, 1, 2], [4, 5, 6])
        assert outcome(producer.finished_saves, "paged-warm").error is None  # type: ignore[attr-defined]
        assert outcome(consumer.finished_loads, "paged-warm").error is None  # type: ignore[attr-defined]
        # No connection beyond the warm ones was opened for them.
        assert a.metric("kvship_connections", 'kind="engine_unix"') == before_a + 1
        assert b.metric("kvship_connections", 'kind="engine_unix"') == before_b + 1
        np.testing.assert_array_equal(consumer.caches[0][[4, 5, 6]], producer.caches[0][[1, 2, 3]])
    finally:
        producer.close()
        consumer.close()
