"""A blocked event loop is reported, and where it was stuck is written down while stuck."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from kvship.aio.lag import LoopLag


def a_synchronous_call_that_hogs_the_loop(seconds: float) -> None:
    time.sleep(seconds)


async def test_a_blocked_loop_is_logged_with_every_threads_traceback(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    samples: list[float] = []
    lag = LoopLag(samples.append, warn_s=0.5, dump_after_s=1.0)
    lag.start()
    try:
        await asyncio.sleep(0.05)  # armed
        with caplog.at_level(logging.WARNING, "kvship.loop"):
            a_synchronous_call_that_hogs_the_loop(2.6)
            await asyncio.sleep(0.1)  # the lag task wakes, late
    finally:
        lag.stop()
    dump = capfd.readouterr().err
    assert "a_synchronous_call_that_hogs_the_loop" in dump, dump
    assert max(samples) >= 2.5
    [record] = [r for r in caplog.records if "event loop was blocked" in r.getMessage()]
    assert "traceback above" in record.getMessage()


async def test_a_busy_loop_is_neither_logged_nor_dumped(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    lag = LoopLag(lambda _: None, warn_s=0.5, dump_after_s=1.0)
    lag.start()
    try:
        with caplog.at_level(logging.WARNING, "kvship.loop"):
            for _ in range(20):  # 2 s of short hogs, each well under the bounds
                a_synchronous_call_that_hogs_the_loop(0.05)
                await asyncio.sleep(0.05)
    finally:
        lag.stop()
    assert "a_synchronous_call_that_hogs_the_loop" not in capfd.readouterr().err
    assert not [r for r in caplog.records if "event loop was blocked" in r.getMessage()]


def test_the_daemon_puts_its_start_heap_out_of_the_collectors_sight() -> None:
    import gc

    from kvship.daemon.main import settle_heap

    gc.unfreeze()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 10_000  # the imports of kvship.daemon at least
    finally:
        gc.unfreeze()
