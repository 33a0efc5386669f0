"""Configured peers (``peers``) are connected at start, before any transfer, and kept
connected: a peer that goes away is shown down with the reason, logged once per cause,
and reconnected with backoff when it comes back; a transfer then works at once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import free_port, good_transfer, wait_until
from kvship.bench.spawn import DaemonProcess
from kvship.cli.status import link_table
from kvship.daemon.config import ConfigError, load_config


def link_to(daemon: DaemonProcess, peer: str) -> dict | None:
    for link in daemon.get_json("/v1/links")["links"]:
        if link["peer"] == peer:
            return link
    return None


async def test_a_configured_peer_is_connected_kept_and_reconnected(tmp_path: Path) -> None:
    port = free_port()
    decode = DaemonProcess("decode", tmp_path, ["--peer-listen", f"127.0.0.1:{port}"]).start()
    peer = f"127.0.0.1:{port}"
    prefill = DaemonProcess("prefill", tmp_path, ["--peers", peer]).start()
    try:
        # Up before anything was sent: the router sees a link with its connections.
        wait_until(lambda: (link_to(prefill, peer) or {}).get("connections") == 4, 10, "link up")
        link = link_to(prefill, peer)
        assert link is not None and link["configured"] is True and link["transfers"] == 0
        assert prefill.metric("kvship_transfers") == 0

        decode.stop()
        wait_until(lambda: (link_to(prefill, peer) or {}).get("connected") is False, 10, "down")
        down = link_to(prefill, peer)
        assert down is not None and down["why"] and down["configured"] is True

        decode = DaemonProcess("decode", tmp_path, ["--peer-listen", peer]).start()
        wait_until(lambda: (link_to(prefill, peer) or {}).get("connections") == 4, 15, "back")
        await good_transfer(prefill, decode)
        log = prefill.log_tail(50_000)
        assert log.count("configured peer 127.0.0.1") <= 3, log  # once per cause, no storm
    finally:
        prefill.stop()
        decode.stop()


async def test_a_new_link_warms_its_connections_with_padding_the_peer_drops(
    tmp_path: Path,
) -> None:
    """Each connection of a configured peer's link sends warmup_bytes of PAD (SPEC §5.23)
    at once; the receiving daemon drops them without a protocol error and serves the next
    transfer. A second link's warm-up stops as its first transfer starts."""
    port = free_port()
    decode = DaemonProcess("decode", tmp_path, ["--peer-listen", f"127.0.0.1:{port}"]).start()
    peer = f"127.0.0.1:{port}"
    prefill = DaemonProcess("prefill", tmp_path, ["--peers", peer]).start()
    other = DaemonProcess(
        "other", tmp_path, ["--peers", peer, "--warmup-bytes", str(1 << 30)]
    ).start()
    try:
        wait_until(lambda: prefill.metric("kvship_warmup_bytes") >= 4 * (2 << 20), 10, "warm")
        wait_until(lambda: (link_to(prefill, peer) or {}).get("warming") == 0, 10, "done")
        assert prefill.metric("kvship_warmup_bytes") == 4 * (2 << 20)  # then it stops
        await good_transfer(prefill, decode)
        # 1 GiB of padding per connection would take seconds here: the transfer cuts it.
        wait_until(lambda: other.metric("kvship_warmup_bytes") > 0, 10, "other warming")
        await good_transfer(other, decode)
        sent = other.metric("kvship_warmup_bytes")
        assert 0 < sent < 4 << 30, sent
        time.sleep(0.3)
        assert other.metric("kvship_warmup_bytes") == sent  # stopped for good
        assert decode.metric("kvship_protocol_errors") == 0
    finally:
        for daemon in (prefill, other, decode):
            daemon.stop()


def test_a_peer_that_never_comes_is_shown_down_with_its_reason(tmp_path: Path) -> None:
    peer = f"127.0.0.1:{free_port()}"
    daemon = DaemonProcess("lonely", tmp_path, ["--peers", peer]).start()
    try:
        wait_until(lambda: bool((link_to(daemon, peer) or {}).get("why", "").strip()), 10, "why")
        time.sleep(2.0)  # several retries (0.5, 1, 2 s ...)
        link = link_to(daemon, peer)
        assert link is not None and link["connected"] is False and link["connections"] == 0
        assert "Connect" in link["why"] or "refused" in link["why"].lower(), link
        assert daemon.get_json("/healthz")["status"] == "ok"  # a down peer is not a sick daemon
        assert f"{peer} (down: " in link_table(daemon.get_json("/v1/links")["links"])
        assert daemon.log_tail(50_000).count(f"configured peer {peer} unreachable") == 1
    finally:
        daemon.stop()


def test_peers_are_checked_at_start() -> None:
    assert load_config(overrides={"peers": "a:1, b:2"}).peer_list == ["a:1", "b:2"]
    assert load_config(overrides={"peers": ""}).peer_list == []
    with pytest.raises(ConfigError, match="peers: 'nope' is not host:port"):
        load_config(overrides={"peers": "a:1,nope"})


def test_a_toml_list_of_peers_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "kvshipd.toml"
    path.write_text('peers = ["decode-1:7470", "[::1]:7470"]\n')
    assert load_config(path).peer_list == ["decode-1:7470", "[::1]:7470"]
