"""Run-time rate limits: PUT /v1/links/{peer}, SIGHUP reload; bad values change nothing."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import good_transfer, off_loop, running_pair, wait_for_condition
from kvship import Client
from kvship.bench.spawn import DaemonProcess


def put(daemon: DaemonProcess, path: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(daemon.url(path), data=body, method="PUT")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def link(daemon: DaemonProcess) -> dict:
    return daemon.get_json("/v1/links")["links"][0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, ...]]:
    config = tmp_path_factory.mktemp("rate") / "a.toml"
    config.write_text('peer_rate = "1gbit"\n')
    with running_pair(config.parent, ["--config", str(config)]) as p:
        yield p


async def test_put_link_changes_the_rate_of_a_live_link(pair: tuple[DaemonProcess, ...]) -> None:
    a, b = pair
    await good_transfer(a, b)
    assert link(a)["rate_limit_Bps"] == 125e6
    status, body = put(a, f"/v1/links/{b.peer}", b'{"rate": "200mbit", "burst": "8MiB"}')
    assert status == 200, body
    assert link(a)["rate_limit_Bps"] == 25e6 and link(a)["burst_bytes"] == 8 * 2**20
    await good_transfer(a, b)  # transfers keep working at the new rate


async def test_a_rate_set_while_the_link_connects_holds_once_it_is_up(tmp_path: Path) -> None:
    """A PUT that lands while the link is still connecting (a configured peer slow to
    answer its HELLO) must not be lost: the link comes up at the rate PUT said. It used to
    come up with the limits it was created with (the PrfaaS demo once saw its link uncapped
    for a whole phase: its PUT went in right after the daemon started)."""
    import asyncio
    import contextlib

    from conftest import frames_from
    from kvship.protocol import CAP_STRIPING, FrameType, HelloAck

    answered = asyncio.Event()
    release = asyncio.Event()

    async def slow_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with contextlib.aclosing(frames_from(reader)) as frames:
            async for ftype, _ in frames:
                if ftype == FrameType.HELLO:
                    break
            else:
                return  # closed before its HELLO
        with contextlib.suppress(ConnectionError):
            await release.wait()  # the HELLO_ACK waits until the PUT went in
            writer.write(
                HelloAck(1, CAP_STRIPING, 8 << 20, (8 << 20) + 64, 4 << 20, 64, "slow").encode()
            )
            await writer.drain()
            answered.set()
            await reader.read()  # keep the connection until the daemon closes it

    server = await asyncio.start_server(slow_peer, "127.0.0.1", 0)
    peer = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    daemon = DaemonProcess("slowpeer", tmp_path, ["--peers", peer]).start()
    try:
        await asyncio.sleep(0.3)  # the daemon is connecting, waiting for the HELLO_ACK
        path = f"/v1/links/{peer}"
        status, body = await asyncio.to_thread(put, daemon, path, b'{"rate": "200mbit"}')
        assert status == 200, body
        assert not answered.is_set()  # the PUT really landed while the link connected
        release.set()
        await asyncio.wait_for(answered.wait(), 10)

        def up() -> bool:
            links = daemon.get_json("/v1/links")["links"]
            return bool(links and links[0].get("connections"))

        await wait_for_condition(off_loop(up), timeout=10, what="the link up")
        assert link(daemon)["rate_limit_Bps"] == 25e6, link(daemon)
    finally:
        daemon.stop()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        pytest.param(b'{"rate": "-1gbit"}', "rate", id="negative-rate"),
        pytest.param(b'{"rate": "0"}', "rate", id="zero-rate"),
        pytest.param(b'{"rate": "fast"}', "rate", id="rate-not-a-rate"),
        pytest.param(b'{"rate": "99999tbit"}', "rate", id="rate-too-high"),
        pytest.param(b'{"burst": "0"}', "burst", id="zero-burst"),
        pytest.param(b'{"speed": "1gbit"}', "rate", id="unknown-field"),
        pytest.param(b"not json", "", id="not-json"),
        pytest.param(b"[]", "", id="not-an-object"),
    ],
)
async def test_put_link_refuses_bad_values_and_changes_nothing(
    pair: tuple[DaemonProcess, ...], body: bytes, needle: str
) -> None:
    a, b = pair
    await good_transfer(a, b)
    before = (link(a)["rate_limit_Bps"], link(a)["burst_bytes"])
    status, answer = put(a, f"/v1/links/{b.peer}", body)
    assert status == 400 and needle in answer["error"], answer
    assert (link(a)["rate_limit_Bps"], link(a)["burst_bytes"]) == before


def test_put_link_needs_host_port(pair: tuple[DaemonProcess, ...]) -> None:
    status, answer = put(pair[0], "/v1/links/nonsense", b'{"rate": "1gbit"}')
    assert status == 400 and "host:port" in answer["error"]


async def test_sighup_reloads_rates_and_a_bad_file_changes_nothing(
    tmp_path: Path,
) -> None:
    config = tmp_path / "k.toml"
    config.write_text('peer_rate = "1gbit"\n')
    with running_pair(tmp_path, ["--config", str(config)]) as (a, b):
        await good_transfer(a, b)
        assert link(a)["rate_limit_Bps"] == 125e6
        config.write_text('peer_rate = "2gbit"\n')
        assert a.proc is not None
        a.proc.send_signal(signal.SIGHUP)
        await wait_for_condition(
            off_loop(lambda: link(a)["rate_limit_Bps"] == 250e6), what="reloaded rate"
        )
        config.write_text('peer_rate = "-5gbit"\n')
        a.proc.send_signal(signal.SIGHUP)
        await wait_for_condition(
            off_loop(lambda: "not reloaded" in a.log_tail()), what="reload refused"
        )
        assert link(a)["rate_limit_Bps"] == 250e6
        await good_transfer(a, b)


async def test_client_priority_must_be_known() -> None:
    async with Client("/nonexistent.sock") as client:
        with pytest.raises(ValueError, match="priority"):
            await client.send("r", (), peer="x:1", priority="urgent")
