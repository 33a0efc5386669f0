"""Two daemons in their own network namespaces, joined by a veth pair shaped with tc tbf:
the rate limiter and compression through a real kernel bottleneck.

Needs root (ip netns, tc); skips with the reason where that is not permitted. The
namespaces, the veth pair and the addresses (10.250.0.1/2) are made here and removed after.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvship import Client
from kvship.bench.spawn import DaemonProcess
from testdata import DOCS, kv_sample

pytestmark = pytest.mark.netns

ADDR_A, ADDR_B = "10.250.0.1", "10.250.0.2"


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


@pytest.fixture
def shaped_link() -> Iterator[tuple[str, str]]:
    """Namespaces A and B, veth A<->B; A's egress shaped to 400 Mbit/s by tbf."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("needs root with ip and tc")
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b, veth_a, veth_b = f"kvsA{tag}", f"kvsB{tag}", f"kva{tag}", f"kvb{tag}"
    try:
        sh("ip", "netns", "add", ns_a)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"ip netns not permitted here: {exc.stderr.decode().strip()}")
    try:
        sh("ip", "netns", "add", ns_b)
        sh("ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        sh("ip", "link", "set", veth_a, "netns", ns_a)
        sh("ip", "link", "set", veth_b, "netns", ns_b)
        for ns, dev, addr in ((ns_a, veth_a, ADDR_A), (ns_b, veth_b, ADDR_B)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", ns_a, "tc", "qdisc", "add", "dev", veth_a, "root",
           "tbf", "rate", "400mbit", "burst", "256kb", "latency", "50ms")  # fmt: skip
        yield ns_a, ns_b
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def start(ns: str, name: str, addr: str, workdir: Path, *extra: str) -> DaemonProcess:
    # The veth addresses live only in the namespaces this test made: nobody else can reach
    # them, so the daemons may listen there without keys (insecure: not loopback).
    args = ["--insecure", *extra]
    daemon = DaemonProcess(name, workdir, args, prefix=["ip", "netns", "exec", ns])
    daemon.host = addr
    return daemon.start()


def link_figures(ns: str, daemon: DaemonProcess) -> dict:
    """/v1/links read from inside the daemon's namespace."""
    code = (
        "import json,sys,urllib.request;"
        f"print(urllib.request.urlopen('{daemon.url('/v1/links')}',timeout=10).read().decode())"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "python3", "-c", code],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)["links"][0]


def kv_layers(total: int) -> list[np.ndarray]:
    """Real bf16 KV (the prose and code samples of tests/data/kv, tiled) cut into 8 layers."""
    raw = np.concatenate([kv_sample(doc, "bf16").reshape(-1) for doc in DOCS])
    data = np.tile(raw, -(-total // raw.nbytes))[: total // 2]
    return [np.ascontiguousarray(x) for x in np.split(data, 8)]


async def ship(a: DaemonProcess, b: DaemonProcess, layers: list[np.ndarray], rid: str) -> float:
    async with Client(b.socket_path) as decode_engine, Client(a.socket_path) as prefill_engine:
        receiving = asyncio.create_task(_receive(decode_engine, rid))
        try:
            start_t = time.monotonic()
            result = await prefill_engine.send_arrays(rid, layers, peer=b.peer, timeout=120)
            got = await asyncio.wait_for(receiving, 120)
            seconds = time.monotonic() - start_t
        finally:
            receiving.cancel()
    assert result.total_bytes == sum(x.nbytes for x in layers)
    for i, layer in enumerate(layers):
        assert np.array_equal(got[i], layer), f"layer {i} differs"
    return seconds


async def _receive(client: Client, rid: str) -> list[np.ndarray]:
    receiver = await client.receive(rid, timeout=60)
    return await receiver.all()


async def test_rate_limit_binds_and_auto_compresses(
    shaped_link: tuple[str, str], tmp_path: Path
) -> None:
    """Daemon cap 200 Mbit/s under a 400 Mbit/s kernel link: the token bucket is the
    bottleneck, so `auto` compresses; the transfer arrives bit-exact and never beats the
    cap on the wire."""
    ns_a, ns_b = shaped_link
    args = ("--peer-rate", "200mbit", "--peer-burst", "8MiB")
    a = start(ns_a, "shaped-a", ADDR_A, tmp_path, *args)
    b = start(ns_b, "shaped-b", ADDR_B, tmp_path, *args)
    try:
        seconds = await ship(a, b, kv_layers(32 << 20), "capped")
        fig = await asyncio.to_thread(link_figures, ns_a, a)
    finally:
        a.stop()
        b.stop()
    assert fig["rate_limit_Bps"] == 25e6
    assert fig["compression_ratio"] > 1.2, fig  # the cap bound, so chunks were compressed
    # Physics, not speed: the wire bytes cannot have left faster than rate x time + burst.
    assert fig["wire_bytes_total"] <= 25e6 * seconds + 8 * 2**20


async def test_kernel_bottleneck_alone_makes_auto_compress(
    shaped_link: tuple[str, str], tmp_path: Path
) -> None:
    """No daemon cap: the 400 Mbit/s tbf link is the bottleneck, the link's measured rate
    is far below what the codec workers can compress, so `auto` compresses."""
    ns_a, ns_b = shaped_link
    a = start(ns_a, "tbf-a", ADDR_A, tmp_path)
    b = start(ns_b, "tbf-b", ADDR_B, tmp_path)
    try:
        await ship(a, b, kv_layers(128 << 20), "tbf")
        fig = await asyncio.to_thread(link_figures, ns_a, a)
    finally:
        a.stop()
        b.stop()
    assert fig["rate_limit"] == "unlimited"
    assert fig["compression_ratio"] > 1.1, fig
