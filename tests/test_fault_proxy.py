"""tools/faultproxy.py on real loopback sockets: an echo server behind the proxy, and
each fault kind checked for doing what it says. Every wait is bounded (IO_TIMEOUT)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conftest import load_tool

faultproxy = load_tool("faultproxy")

FaultProxy, Schedule, Fault, UP, DOWN = (
    faultproxy.FaultProxy,
    faultproxy.Schedule,
    faultproxy.Fault,
    faultproxy.UP,
    faultproxy.DOWN,
)
IO_TIMEOUT = 5.0


class Echo:
    """An echo server on loopback that remembers how each connection ended."""

    def __init__(self) -> None:
        self.endings: list[str] = []  # "eof" or "reset", one per finished connection
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Echo:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ending = "eof"
        try:
            for _ in range(100_000):  # bounded: a test never sends this much
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError):
            ending = "reset"
        finally:
            self.endings.append(ending)
            writer.close()

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    server = await Echo().start()
    yield server
    server.close()


async def connect(proxy: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), IO_TIMEOUT)


async def read_until_end(reader: asyncio.StreamReader, limit: int) -> tuple[bytes, str]:
    """Up to ``limit`` bytes, and how the stream stopped: "full", "eof" or "reset"."""
    got = bytearray()
    try:
        while len(got) < limit:
            data = await asyncio.wait_for(reader.read(limit - len(got)), IO_TIMEOUT)
            if not data:
                return bytes(got), "eof"
            got += data
    except (ConnectionError, OSError):
        return bytes(got), "reset"
    return bytes(got), "full"


async def round_trip(proxy: Any, payload: bytes) -> tuple[bytes, str]:
    reader, writer = await connect(proxy)
    try:
        writer.write(payload)
        await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
        return await read_until_end(reader, len(payload))
    finally:
        writer.close()


def bit_diff(a: bytes, b: bytes) -> int:
    return sum((x ^ y).bit_count() for x, y in zip(a, b, strict=True))


async def test_no_faults_forwards_every_byte_unchanged(echo: Echo) -> None:
    payload = os.urandom(4 * 1024 * 1024)
    async with FaultProxy(("127.0.0.1", echo.port)) as proxy:
        reader, writer = await connect(proxy)
        sending = asyncio.create_task(_send_all(writer, payload))
        got, how = await read_until_end(reader, len(payload))
        await asyncio.wait_for(sending, IO_TIMEOUT)
        writer.close()
        stats = proxy.stats()
    assert how == "full" and got == payload
    assert stats["faults_injected"] == 0
    assert stats["bytes_up"] == stats["bytes_down"] == len(payload)
    assert stats["connections_accepted"] == 1


async def _send_all(writer: asyncio.StreamWriter, payload: bytes) -> None:
    for i in range(0, len(payload), 256 * 1024):
        writer.write(payload[i : i + 256 * 1024])
        await writer.drain()


async def test_flip_changes_exactly_one_bit(echo: Echo) -> None:
    payload = os.urandom(1000)
    schedule = Schedule(seed=3, flip=1.0, directions=(UP,))
    async with FaultProxy(("127.0.0.1", echo.port), schedule) as proxy:
        got, how = await round_trip(proxy, payload)
        flips = [f for _, d, f in proxy.events if d == UP]
    assert how == "full" and len(got) == len(payload)
    assert len(flips) >= 1 and proxy.stats()["faults_by_kind"]["flip"] == len(flips)
    assert bit_diff(got, payload) == len(flips)  # one bit per segment (one, here)
    if len(flips) == 1:  # the usual case: 1000 bytes in one segment
        pos = flips[0].at
        assert got[pos] ^ payload[pos] == 1 << flips[0].bit


async def test_reset_makes_the_client_see_reset_or_eof(echo: Echo) -> None:
    payload = os.urandom(64 * 1024)
    schedule = Schedule(seed=5, reset=1.0, directions=(DOWN,))
    async with FaultProxy(("127.0.0.1", echo.port), schedule) as proxy:
        got, how = await round_trip(proxy, payload)
        stats = proxy.stats()
        await _wait_for(lambda: bool(echo.endings))
    assert how in ("reset", "eof") and len(got) < len(payload)
    assert got == payload[: len(got)]  # what came before the reset is intact
    assert stats["faults_by_kind"]["reset"] == 1 and stats["faults_injected"] == 1


async def test_reset_upstream_side_sees_a_reset(echo: Echo) -> None:
    """A reset on the way up RSTs the upstream too (SO_LINGER 0), not a clean FIN."""
    schedule = Schedule(seed=5, reset=1.0, directions=(UP,))
    async with FaultProxy(("127.0.0.1", echo.port), schedule) as proxy:
        _, how = await round_trip(proxy, os.urandom(64 * 1024))
        await _wait_for(lambda: bool(echo.endings))
    assert how in ("reset", "eof")
    assert echo.endings == ["reset"]


async def test_truncate_delivers_a_prefix_then_eof(echo: Echo) -> None:
    payload = os.urandom(10_000)
    schedule = Schedule(seed=11, truncate=1.0, directions=(DOWN,))
    async with FaultProxy(("127.0.0.1", echo.port), schedule) as proxy:
        got, how = await round_trip(proxy, payload)
        cuts = [f for _, _, f in proxy.events]
    assert how == "eof", "truncate closes with FIN, not RST"
    assert len(cuts) == 1 and cuts[0].kind == "truncate"
    assert got == payload[: len(got)] and len(got) < len(payload)
    if len(got) <= cuts[0].at:  # the first down segment held everything before the cut
        assert len(got) == cuts[0].at


@pytest.mark.parametrize("kind", ["stall", "delay"])
async def test_stall_and_delay_hold_bytes_back_but_deliver_them(echo: Echo, kind: str) -> None:
    payload = os.urandom(1000)
    base = Schedule(seed=1, directions=(UP,), stall_ms=(200, 200), delay_ms=(200, 200))
    schedule = dataclasses.replace(base, **{kind: 1.0})
    async with FaultProxy(("127.0.0.1", echo.port), schedule) as proxy:
        started = time.monotonic()
        got, how = await round_trip(proxy, payload)
        elapsed = time.monotonic() - started
        assert proxy.stats()["faults_by_kind"][kind] >= 1
    assert how == "full" and got == payload
    assert 0.19 <= elapsed < IO_TIMEOUT


async def test_same_seed_same_decisions(echo: Echo) -> None:
    """Lockstep messages make the segments the same, so the decisions are too."""

    async def run(seed: int) -> list[tuple[int, str, object]]:
        schedule = Schedule(seed=seed, flip=0.2, delay=0.2, delay_ms=(0, 2))
        async with FaultProxy(("127.0.0.1", echo.port), schedule) as proxy:
            reader, writer = await connect(proxy)
            for i in range(40):
                message = bytes([i]) * 500
                writer.write(message)
                await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
                got, how = await read_until_end(reader, len(message))
                assert how == "full" and len(got) == len(message)
            writer.close()
            return list(proxy.events)

    first, again, other = await run(7), await run(7), await run(8)
    assert first and first == again
    assert first != other


def test_schedule_decisions_are_deterministic_and_bounded() -> None:
    a = Schedule(seed=42, reset=0.1, stall=0.1, truncate=0.1, flip=0.1, delay=0.1)
    lengths = [1 + (i * 7919) % 65536 for i in range(2000)]
    one, two = a.decider(3, UP), a.decider(3, UP)
    first = [one.next(n) for n in lengths]
    assert first == [two.next(n) for n in lengths]
    assert first != [a.decider(4, UP).next(n) for n in lengths]
    kinds = {f.kind for f in first if f is not None}
    assert kinds == {"reset", "stall", "truncate", "flip", "delay"}
    for fault, n in zip(first, lengths, strict=True):
        if fault is not None:
            assert 0 <= fault.at < n and fault.ms <= faultproxy.MAX_PAUSE_MS
    off = Schedule(seed=1, flip=1.0, directions=(UP,)).decider(0, DOWN)  # not its direction
    assert all(off.next(9) is None for _ in range(50))
    with pytest.raises(ValueError):
        Schedule(reset=0.6, flip=0.6)
    with pytest.raises(ValueError):
        Schedule(stall_ms=(0, faultproxy.MAX_PAUSE_MS + 1))


async def test_pause_faults_and_reset_all(echo: Echo) -> None:
    payload = os.urandom(1000)
    schedule = Schedule(seed=2, flip=1.0, directions=(UP,))
    async with FaultProxy(("127.0.0.1", echo.port), schedule) as proxy:
        proxy.pause_faults()
        got, _ = await round_trip(proxy, payload)
        assert got == payload and proxy.stats()["faults_injected"] == 0
        proxy.resume_faults()
        got, _ = await round_trip(proxy, payload)
        assert got != payload and proxy.stats()["faults_injected"] >= 1

        proxy.pause_faults()
        conns = [await connect(proxy) for _ in range(3)]
        for reader, writer in conns:  # each is through to the echo server
            writer.write(b"ping")
            assert (await read_until_end(reader, 4))[0] == b"ping"
        assert proxy.reset_all() == 3
        for reader, writer in conns:
            _, how = await read_until_end(reader, 4)
            assert how in ("reset", "eof")
            writer.close()
        await _wait_for(lambda: proxy.stats()["connections_live"] == 0)
        assert proxy.stats()["reset_all_calls"] == 1


async def test_inject_applies_one_exact_fault_to_the_next_segment(echo: Echo) -> None:
    payload = bytes(1000)
    async with FaultProxy(("127.0.0.1", echo.port)) as proxy:  # no schedule at all
        proxy.inject(Fault("flip", at=1, bit=3), DOWN)
        got, how = await round_trip(proxy, payload)
        assert how == "full" and got[1] == 1 << 3 and bit_diff(got, payload) == 1
        got, _ = await round_trip(proxy, payload)  # one-shot: the next one is clean
        assert got == payload
        assert proxy.stats()["faults_by_kind"]["flip"] == 1
        with pytest.raises(ValueError):
            proxy.inject(Fault("melt"), UP)


async def _wait_for(predicate: object, timeout: float = IO_TIMEOUT) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {predicate}")
        await asyncio.sleep(0.01)
