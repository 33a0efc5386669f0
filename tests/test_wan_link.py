"""The WAN emulator (tools/wan) end to end, one short cell: two namespaces, tbf at
2 Gbit/s, a 30 ms delay line; its RTT is really there, iperf3 and kvship both cross it,
kvship bit-exact, over more connections than configured (the namespaces' default 4 MiB
send-buffer cap binds at that RTT); everything is gone afterwards. Skips with the reason
where root, ip, tc, iptables (NFQUEUE), the delay line's build (libnetfilter-queue-dev) or
iperf3 are missing. The matrix itself is `make wan-bench`."""

from __future__ import annotations

import argparse
import shutil
import subprocess

import pytest

from conftest import load_tool

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def wan() -> object:
    bench = load_tool("wan/bench")
    why = bench.missing()
    if why:
        pytest.skip(why)
    if shutil.which("iperf3") is None:
        pytest.skip("iperf3 is not installed")
    return bench


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_one_cell_crosses_the_emulated_link_and_cleans_up(wan: object) -> None:
    opts = argparse.Namespace(bytes=64 << 20, iperf_seconds=1.0, slow_start_after_idle=1)
    opts.daemon_args, opts.engine_arena = "", None
    cell = wan.cell(2.0, 30.0, "default", opts)  # type: ignore[attr-defined]
    assert cell["bitexact"] is True, cell
    # The delay line delays: a round trip cannot be shorter than the two 15 ms halves.
    assert cell["ping_rtt_ms"] >= 29.0, cell
    assert cell["iperf3_rtt_ms"]["min"] >= 29.0, cell
    # 4 connections x 4 MiB per 30 ms carry 4.5 Gbit/s, below the veth's 10 Gbit/s.
    assert cell["kvship_link"]["connections"] > 4, cell
    assert cell["iperf3_p4_gbps"] > 0 and cell["kvship_gbps"] > 0
    assert cell["first_small_transfer_rtts"] is not None
    stats = cell["delay_line"]
    assert len(stats) == 2 and all(s["packets"] > 0 for s in stats), stats
    assert "kvw" not in namespaces()  # namespaces, veth, rules and delay lines are gone
