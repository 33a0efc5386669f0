"""The core's handshake and role rules, as a real kvshipd applies them over real sockets:
unknown auth methods (SPEC §6.4), listener roles (§9), frames of the wrong role or
direction (§4), PING pipelined after HELLO."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from conftest import (
    RawPeer,
    error_count,
    exchange,
    parse_frames,
    peer_hello,
    running_pair,
    wait_until,
)
from kvship.bench.spawn import DaemonProcess
from kvship.protocol import (
    MAGIC,
    ROLE_ENGINE,
    ROLE_PEER,
    Complete,
    ErrorCode,
    FrameType,
    GoAway,
    Hello,
    LayerReady,
    Ping,
    Subscribe,
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, ...]]:
    with running_pair(tmp_path_factory.mktemp("core")) as p:
        yield p


def answer(address: str, payload: bytes) -> tuple[list[int], GoAway | None]:
    """The frame types the daemon sent back, and its GOAWAY if any."""
    frames, _ = parse_frames(exchange(address, payload))
    goaway = next((GoAway.decode(memoryview(b)) for t, b in frames if t == FrameType.GOAWAY), None)
    return [t for t, _ in frames], goaway


def test_unknown_auth_method_gets_auth_failed_not_hello_ack(
    pair: tuple[DaemonProcess, ...],
) -> None:
    b = pair[1]
    before = error_count(b, "AUTH_FAILED")
    types, goaway = answer(b.peer, peer_hello("guest", auth_method=1, auth=b"secret"))
    assert types == [FrameType.GOAWAY]  # no HELLO_ACK
    assert goaway is not None and goaway.code == ErrorCode.AUTH_FAILED
    wait_until(lambda: error_count(b, "AUTH_FAILED") == before + 1)


def test_engine_hello_on_the_peer_listener(pair: tuple[DaemonProcess, ...]) -> None:
    types, goaway = answer(pair[1].peer, MAGIC + Hello(ROLE_ENGINE, "lost").encode())
    assert types == [FrameType.GOAWAY]
    assert goaway is not None and goaway.code == ErrorCode.PROTOCOL_ERROR


def test_peer_hello_on_the_engine_listener(pair: tuple[DaemonProcess, ...]) -> None:
    types, goaway = answer(pair[1].addresses["engine"], MAGIC + Hello(ROLE_PEER, "x").encode())
    assert types == [FrameType.GOAWAY]
    assert goaway is not None and goaway.code == ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "frame",
    [Subscribe("req", 0), Complete(5, 0, 0), LayerReady(5, 0, 0, 0)],
    ids=["subscribe-on-peer", "complete-from-sender", "layer-ready-from-peer"],
)
def test_frames_of_another_role_close_the_connection(
    pair: tuple[DaemonProcess, ...], frame: Any
) -> None:
    types, goaway = answer(pair[1].peer, peer_hello("wrong") + frame.encode())
    assert types[0] == FrameType.HELLO_ACK and types[-1] == FrameType.GOAWAY
    assert goaway is not None and goaway.code == ErrorCode.PROTOCOL_ERROR
    assert "may send it" in goaway.message


def test_engine_may_not_send_layer_ready(pair: tuple[DaemonProcess, ...]) -> None:
    hello = MAGIC + Hello(ROLE_ENGINE, "engine").encode()
    types, goaway = answer(pair[1].addresses["engine"], hello + LayerReady(1, 0, 0, 0).encode())
    assert types == [FrameType.HELLO_ACK, FrameType.GOAWAY]
    assert goaway is not None and goaway.code == ErrorCode.PROTOCOL_ERROR


def test_ping_pipelined_after_hello_is_answered(pair: tuple[DaemonProcess, ...]) -> None:
    types, goaway = answer(pair[1].peer, peer_hello("eager") + Ping(9).encode())
    assert types == [FrameType.HELLO_ACK, FrameType.PONG] and goaway is None


async def test_goaway_received_closes_and_discards_the_rest(
    pair: tuple[DaemonProcess, ...],
) -> None:
    """§5.10: the receiver of GOAWAY closes on receipt (we keep our side open), and the PING
    after it gets no PONG."""
    peer = await RawPeer.connect(pair[1].peer)
    try:
        await peer.handshake(name="leaving")
        await peer.send(GoAway(0, "bye").encode() + Ping(3).encode())
        frames = await peer.until_closed()  # times out (fails) if the daemon keeps it open
    finally:
        peer.close()
    assert [t for t, _ in frames] == [FrameType.HELLO_ACK]
