"""An emulated datacenter link: two network namespaces joined by a veth pair, `tc tbf` on
both ends for the rate, and a delay line for the round trip.

netem (and fq/etf) are absent on this kernel, so the delay is tools/wan/delayline.c: an
iptables rule in each namespace's raw table queues every packet arriving on its veth end
(NFQUEUE, with --queue-bypass), and the delay line accepts each one RTT/2 after it
arrived, in order. Delaying on ingress keeps held packets out of the sender's TCP
small-queue budget. Everything (namespaces, veth, qdiscs, rules, delay lines) is made
here and removed on exit, an error included; the addresses 10.203.0.1/2 exist only inside
the namespaces.

    with WanLink(rate_gbit=2, rtt_ms=30, raised_buffers=True) as link:
        link.run(link.ns_b, "iperf3", "-s", "-1", ...)

Needs root, ip, tc, iptables and a built delay line (``build_delayline``); ``missing()``
says what is absent so callers can skip with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DELAYLINE_SRC = ROOT / "tools" / "wan" / "delayline.c"
DELAYLINE = ROOT / "build" / "wan" / "delayline"
ADDR_A, ADDR_B = "10.203.0.1", "10.203.0.2"
RAISED = "4096 131072 268435456"  # tcp_rmem / tcp_wmem with "raised" buffers (256 MiB max)
TBF_LATENCY_MS = 50  # the bottleneck queue: packets wait at most this long in tbf


def sh(*args: str, timeout: float = 20) -> str:
    out = subprocess.run(args, check=True, capture_output=True, text=True, timeout=timeout)
    return out.stdout


def build_delayline() -> str | None:
    """Compile the delay line into build/wan (None when done, else why it cannot be)."""
    if DELAYLINE.exists() and DELAYLINE.stat().st_mtime >= DELAYLINE_SRC.stat().st_mtime:
        return None
    if shutil.which("gcc") is None:
        return "gcc is not installed"
    DELAYLINE.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["gcc", "-O2", "-Wall", "-o", str(DELAYLINE), str(DELAYLINE_SRC)]
    done = subprocess.run(
        [*cmd, "-lnetfilter_queue", "-lnfnetlink"], capture_output=True, text=True, timeout=60
    )
    if done.returncode:
        return f"the delay line does not build (libnetfilter-queue-dev?): {done.stderr[-300:]}"
    return None


def missing() -> str | None:
    """Why the emulator cannot run here, or None."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux"
    for tool in ("ip", "tc", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    why = build_delayline()
    if why:
        return why
    probe = f"kvwprobe{os.getpid() % 100000}"
    try:
        sh("ip", "netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"ip netns is not permitted: {getattr(exc, 'stderr', exc)}"
    try:
        sh("ip", "netns", "exec", probe, "iptables", "-t", "raw", "-A", "PREROUTING",
           "-j", "NFQUEUE", "--queue-num", "0", "--queue-bypass")  # fmt: skip
        line = _probe_delayline(probe)
        if not line.startswith('{"ready"'):
            return f"the delay line cannot bind an NFQUEUE here: {line[-200:]}"
    except subprocess.CalledProcessError as exc:
        return f"iptables NFQUEUE is not available: {exc.stderr.strip()[-200:]}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=20)
    return None


def _probe_delayline(ns: str) -> str:
    """Start the delay line in ``ns`` and stop it: its first line (or its error)."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, str(DELAYLINE), "0", "1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=2)  # it exits at once only when it failed
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    return (out or "").strip() or f"exit status {proc.returncode}"


@dataclass
class WanLink:
    """The link, as a context manager; ``ns_a`` / ``ns_b`` hold ``ADDR_A`` / ``ADDR_B``."""

    rate_gbit: float
    rtt_ms: float
    raised_buffers: bool = False
    slow_start_after_idle: bool = True  # the kernel's default; False: sysctl 0 in both
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    delay_stats: list[dict[str, object]] = field(default_factory=list)
    _delays: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def ns_a(self) -> str:
        return f"kvwA{self.tag}"

    @property
    def ns_b(self) -> str:
        return f"kvwB{self.tag}"

    def prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def run(self, ns: str, *cmd: str, timeout: float = 60) -> str:
        return sh(*self.prefix(ns), *cmd, timeout=timeout)

    def __enter__(self) -> WanLink:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        veth_a, veth_b = f"kvwa{self.tag}", f"kvwb{self.tag}"
        sh("ip", "netns", "add", self.ns_a)
        sh("ip", "netns", "add", self.ns_b)
        sh("ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        rate_Bps = self.rate_gbit * 1e9 / 8
        # tbf's bucket must hold a whole GSO packet (64 KiB) and a millisecond at the rate.
        burst = max(2 * 65536, int(rate_Bps / 1000))
        for ns, dev, addr in ((self.ns_a, veth_a, ADDR_A), (self.ns_b, veth_b, ADDR_B)):
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            self.run(ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                     "rate", f"{self.rate_gbit}gbit", "burst", str(burst),
                     "latency", f"{TBF_LATENCY_MS}ms")  # fmt: skip
            if self.raised_buffers:
                # Per namespace (net.ipv4.tcp_[rw]mem are per netns): the host is untouched.
                self.run(ns, "sysctl", "-q", "-w", f"net.ipv4.tcp_rmem={RAISED}")
                self.run(ns, "sysctl", "-q", "-w", f"net.ipv4.tcp_wmem={RAISED}")
            if not self.slow_start_after_idle:
                self.run(ns, "sysctl", "-q", "-w", "net.ipv4.tcp_slow_start_after_idle=0")
            if self.rtt_ms > 0:
                self._delay(ns, dev)

    def _delay(self, ns: str, dev: str) -> None:
        self.run(ns, "iptables", "-t", "raw", "-A", "PREROUTING", "-i", dev,
                 "-j", "NFQUEUE", "--queue-num", "0", "--queue-bypass")  # fmt: skip
        one_way_us = int(self.rtt_ms * 1000 / 2)
        proc = subprocess.Popen(
            [*self.prefix(ns), str(DELAYLINE), "0", str(one_way_us)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._delays.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # {"ready": true, ...} once the queue is bound
        if not line.startswith('{"ready"'):
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"the delay line in {ns} did not start: {line}{err}")

    def close(self) -> None:
        for proc in self._delays:
            if proc.poll() is None:
                proc.terminate()
            try:
                out, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            for line in (out or "").splitlines():
                with contextlib.suppress(ValueError):
                    self.delay_stats.append(json.loads(line))
        self._delays.clear()
        for ns in (self.ns_a, self.ns_b):  # takes the veth, qdiscs and rules with it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)

    # ------------------------------------------------------------------ fidelity
    def ping_pong_rtt_ms(self, rounds: int = 20) -> float:
        """Median round trip of a 1-byte TCP ping-pong A -> B (TCP_NODELAY), in ms."""
        port = free_port()
        server = subprocess.Popen(
            [*self.prefix(self.ns_b), sys.executable, "-c", _ECHO, ADDR_B, str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            server.stdout.readline()  # listening
            out = self.run(
                self.ns_a, sys.executable, "-c", _PING, ADDR_B, str(port), str(rounds),
                timeout=30 + rounds * self.rtt_ms / 100,
            )  # fmt: skip
        finally:
            server.kill()
            server.wait(5)
        return statistics.median(json.loads(out)) * 1000

    def iperf3(self, streams: int, seconds: float = 4.0) -> dict[str, float]:
        """iperf3 A -> B: received Gbit/s and the sender's min / mean TCP RTT (ms)."""
        port = free_port()
        server = subprocess.Popen(
            [*self.prefix(self.ns_b), "iperf3", "-s", "-1", "-B", ADDR_B, "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.3)
            out = self.run(
                self.ns_a, "iperf3", "-c", ADDR_B, "-p", str(port), "-P", str(streams),
                "-t", str(seconds), "-J", timeout=seconds + 30,
            )  # fmt: skip
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(10)
            if server.poll() is None:
                server.kill()
        end = json.loads(out)["end"]
        rtts = [s["sender"] for s in end["streams"] if "mean_rtt" in s.get("sender", {})]
        return {
            "gbps": end["sum_received"]["bits_per_second"] / 1e9,
            "min_rtt_ms": min((s["min_rtt"] for s in rtts), default=0) / 1000,
            "mean_rtt_ms": statistics.mean([s["mean_rtt"] for s in rtts]) / 1000 if rtts else 0,
        }


def free_port() -> int:
    # A port free in the root namespace; the namespaces start with none in use at all.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_ECHO = """
import socket, sys
srv = socket.socket(); srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(1)
print("listening", flush=True)
conn, _ = srv.accept(); conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while (b := conn.recv(1)):
    conn.sendall(b)
"""

_PING = """
import json, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter(); s.sendall(b"x"); s.recv(1); rtts.append(time.perf_counter() - t)
print(json.dumps(rtts[1:]))
"""
