"""The kernel's socket-buffer caps, read from /proc: where they bind below kvship's
window the daemon says so at start (naming the sysctl), per link in /v1/links (the
bound they put on the link at its RTT) and in `kvship status`."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import good_transfer, running_pair
from kvship.cli.status import link_table
from kvship.daemon.kernel import TcpBuffers

MIB = 1024 * 1024


def proc_tree(root: Path, wmem: str, rmem: str) -> Path:
    (root / "ipv4").mkdir(parents=True)
    (root / "ipv4" / "tcp_wmem").write_text(wmem + "\n")
    (root / "ipv4" / "tcp_rmem").write_text(rmem + "\n")
    return root


def test_caps_below_the_window_are_named_with_their_sysctl(tmp_path: Path) -> None:
    kernel = TcpBuffers.read(proc_tree(tmp_path, "4096\t16384\t4194304", "4096 131072 33554432"))
    assert (kernel.send_max, kernel.receive_max) == (4 * MIB, 32 * MIB)
    [line] = kernel.advice(8 * MIB)
    assert "net.ipv4.tcp_wmem" in line and "at least 8388608" in line
    assert kernel.advice(4 * MIB) == []
    assert len(kernel.advice(64 * MIB)) == 2  # both sides bind
    # 4 connections x 4 MiB per 80 ms round trip: 1.68 Gbit/s at most.
    assert kernel.bound_Bps(4, 0.08) == pytest.approx(4 * 4 * MIB / 0.08)
    assert kernel.bound_Bps(4, None) is None


def test_no_proc_means_no_claims(tmp_path: Path) -> None:
    kernel = TcpBuffers.read(tmp_path / "nothing")
    assert kernel.send_max is None and kernel.advice(8 * MIB) == []
    assert kernel.bound_Bps(4, 0.01) is None


async def test_the_daemon_reports_the_caps_per_link(tmp_path: Path) -> None:
    real = TcpBuffers.read()
    advice = real.advice(8 * MIB)  # the daemons' default window
    with running_pair(tmp_path) as (a, b):
        await good_transfer(a, b)
        [link] = a.get_json("/v1/links")["links"]
        assert link["kernel_send_buffer_max"] == real.send_max
        assert link["kernel_advice"] == advice
        if link.get("rtt_s"):
            assert link["kernel_bound_Bps"] == round(real.bound_Bps(4, link["rtt_s"]) or 0)
        logged = "the kernel caps a TCP" in a.log_tail(50_000)
        assert logged == bool(advice)
        table = link_table([link])
        assert ("note: the kernel caps" in table) == bool(advice)


def test_connections_for_a_rate_under_the_send_cap() -> None:
    from kvship.daemon.kernel import TcpBuffers

    caps = TcpBuffers(4 << 20, 6 << 20)
    assert caps.connections_for(2e9 / 8, 0.08) == 5  # 20 MB per RTT / 4 MiB
    assert caps.connections_for(2e9 / 8, 0.01) == 1
    assert caps.connections_for(None, 0.08) is None  # unlimited, speed unknown
    assert caps.connections_for(2e9 / 8, None) is None
    assert TcpBuffers(None, None).connections_for(2e9 / 8, 0.08) is None


def test_loopback_has_no_interface_speed() -> None:
    import socket

    from kvship.daemon.kernel import interface_speed_Bps

    with socket.socket() as srv, socket.socket() as cli:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        cli.connect(srv.getsockname())
        assert interface_speed_Bps(cli) is None  # lo reports no speed: no extra connections
