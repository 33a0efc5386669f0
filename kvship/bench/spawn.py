"""Start kvshipd as a real subprocess on loopback (bench, demo and tests all use this)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ProcCounters:
    """A process's CPU time (user + system) and its read-like and write-like system calls
    (``/proc/PID/io`` ``syscr``/``syscw``: read/readv/pread, write/writev/pwrite), so a
    benchmark can say what one chunk cost a daemon, whatever the wall clock did."""

    cpu_s: float
    read_calls: int
    write_calls: int

    @classmethod
    def of(cls, pid: int) -> ProcCounters:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        return cls(
            (int(fields[11]) + int(fields[12])) / ticks,  # utime, stime (fields 14, 15)
            int(io["syscr"]),
            int(io["syscw"]),
        )

    def __sub__(self, other: ProcCounters) -> ProcCounters:
        return ProcCounters(
            self.cpu_s - other.cpu_s,
            self.read_calls - other.read_calls,
            self.write_calls - other.write_calls,
        )


def metric_sum(text: str, name: str, labels: str = "") -> float:
    """Sum of a metric's samples (``name`` or ``name_total``) whose label text contains
    ``labels``, in one /metrics text (so one scrape can give several figures)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#") and labels in line:
            head = line.split(" ")[0]
            if (
                head == name
                or head.startswith(name + "{")
                or head == name + "_total"
                or (head.startswith(name + "_total{"))
            ):
                total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class DaemonProcess:
    """A kvshipd subprocess; ``addresses`` holds what it bound (peer, engine, control)."""

    name: str
    workdir: Path
    extra_args: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None
    addresses: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    prefix: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", "ns1"]

    def start(self, timeout: float = 20.0) -> DaemonProcess:
        ready = self.workdir / f"{self.name}.ready"
        ready.unlink(missing_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        bracket = f"[{self.host}]" if ":" in self.host else self.host
        args = [
            *self.prefix,
            sys.executable, "-m", "kvship.daemon.main",
            "--node-name", self.name,
            "--peer-listen", f"{bracket}:0",
            "--engine-socket", str(self.workdir / f"{self.name}.sock"),
            "--engine-listen", f"{bracket}:0",
            "--control-listen", f"{bracket}:0",
            "--ready-file", str(ready),
            *self.extra_args,
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready.exists():
                self.addresses = json.loads(ready.read_text())
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvshipd {self.name} exited: {self.log_tail()}")
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"kvshipd {self.name} not ready in {timeout} s: {self.log_tail()}")

    @property
    def socket_path(self) -> str:
        return self.addresses["engine_socket"]

    @property
    def peer(self) -> str:
        return self.addresses["peer"]

    def url(self, path: str) -> str:
        return f"http://{self.addresses['control']}{path}"

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=10) as resp:
            return json.loads(resp.read())

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url("/metrics"), timeout=10) as resp:
            return resp.read().decode()

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of a metric's samples whose label text contains ``labels``."""
        return metric_sum(self.metrics_text(), name, labels)

    def peak_rss_mib(self) -> float:
        """VmHWM: the process's peak resident set (shared arena pages it touched included)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def counters(self) -> ProcCounters:
        """The process's CPU seconds and read/write system calls so far (/proc)."""
        assert self.proc is not None
        return ProcCounters.of(self.proc.pid)

    def log_tail(self, n: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def daemon_pair(
    workdir: str | None = None, extra_args: list[str] | None = None
) -> tuple[DaemonProcess, DaemonProcess]:
    """Two started daemons, "prefill" and "decode", in ``workdir`` (a temp dir if None)."""
    root = Path(workdir or tempfile.mkdtemp(prefix="kvship-"))
    os.makedirs(root, exist_ok=True)
    a = DaemonProcess("prefill", root, list(extra_args or [])).start()
    try:
        b = DaemonProcess("decode", root, list(extra_args or [])).start()
    except BaseException:
        a.stop()
        raise
    return a, b
