"""systemd integration: the sd_notify protocol (kvship.daemon.notify) against real datagram
sockets, a real kvshipd process run the way systemd runs a Type=notify unit (READY after
every listener, STATUS, WATCHDOG pings, RELOADING/READY on SIGHUP, STOPPING on SIGTERM),
and the shipped unit file checked by ``systemd-analyze verify`` where it is installed."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvship.daemon.config import Config
from kvship.daemon.notify import SystemdNotifier, monotonic_usec, watchdog_interval

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "daemon" / "kvshipd.service"


# ------------------------------------------------------------------ a notify socket
class NotifySocket:
    """What systemd listens on: a bound AF_UNIX datagram socket; a thread stamps every
    datagram with time.monotonic() as it arrives."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-reader", daemon=True)
        self._thread.start()

    @property
    def env_value(self) -> str:
        """The address as $NOTIFY_SOCKET spells it (``@`` for an abstract name)."""
        return "@" + self.address[1:] if self.address.startswith("\0") else self.address

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            with self._cond:
                self.messages.append((now, data.decode()))
                self._cond.notify_all()

    def snapshot(self) -> list[tuple[float, str]]:
        with self._cond:
            return list(self.messages)

    def wait_for(
        self, predicate: Callable[[dict[str, str]], bool], start: int = 0, timeout: float = 10.0
    ) -> tuple[int, float, dict[str, str]]:
        """(index, arrival time, fields) of the first message from index ``start`` on whose
        fields match; fails the test after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(start, len(self.messages)):
                    at, text = self.messages[i]
                    if predicate(fields(text)):
                        return i, at, fields(text)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no matching notification in {timeout} s: {self.messages[start:]!r}"
                    )
                self._cond.wait(left)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def fields(text: str) -> dict[str, str]:
    """``KEY=value`` lines of one notification as a dict."""
    out: dict[str, str] = {}
    for line in text.split("\n"):
        key, _, value = line.partition("=")
        out[key] = value
    return out


def pings(messages: list[tuple[float, str]]) -> list[float]:
    return [at for at, text in messages if text == "WATCHDOG=1"]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture
def abstract_socket() -> Iterator[NotifySocket]:
    listener = NotifySocket(f"\0kvship-test-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield listener
    finally:
        listener.close()


# ------------------------------------------------------------------ the notifier
def send_every_kind(notifier: SystemdNotifier) -> int:
    """Sends one of each message; returns MONOTONIC_USEC just before the RELOADING one."""
    assert notifier.ready("up")
    assert notifier.status("serving: 0 transfers")
    before = monotonic_usec()
    assert notifier.reloading()
    assert notifier.ready()
    assert notifier.watchdog()
    assert notifier.stopping("draining")
    return before


def check_every_kind(listener: NotifySocket, before_usec: int) -> None:
    listener.wait_for(lambda f: "STOPPING" in f)
    texts = [text for _, text in listener.snapshot()]
    assert texts[0] == "READY=1\nSTATUS=up"
    assert texts[1] == "STATUS=serving: 0 transfers"
    reloading = fields(texts[2])
    assert list(reloading) == ["RELOADING", "MONOTONIC_USEC"]
    assert reloading["RELOADING"] == "1"
    # CLOCK_MONOTONIC in µs, as systemd >= 253 checks it for Type=notify-reload
    assert before_usec <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
    assert texts[3:] == ["READY=1", "WATCHDOG=1", "STOPPING=1\nSTATUS=draining"]


def test_notify_to_a_socket_path(notify_socket: NotifySocket) -> None:
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": notify_socket.env_value})
    assert notifier.enabled
    try:
        check_every_kind(notify_socket, send_every_kind(notifier))
    finally:
        notifier.close()


def test_notify_to_an_abstract_socket(abstract_socket: NotifySocket) -> None:
    assert abstract_socket.env_value.startswith("@")
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": abstract_socket.env_value})
    try:
        check_every_kind(abstract_socket, send_every_kind(notifier))
    finally:
        notifier.close()


def test_a_newline_in_a_status_cannot_forge_a_message(notify_socket: NotifySocket) -> None:
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": notify_socket.env_value})
    try:
        notifier.status("bad file\nREADY=1")
        _, _, got = notify_socket.wait_for(lambda f: "STATUS" in f)
    finally:
        notifier.close()
    assert got == {"STATUS": "bad file READY=1"}


async def test_without_notify_socket_everything_is_a_no_op() -> None:
    for env in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}):
        notifier = SystemdNotifier.from_environ({**env, "WATCHDOG_USEC": "200000"})
        assert not notifier.enabled
        assert notifier.watchdog_s is None
        assert not notifier.ready("up")
        assert not notifier.reloading()
        assert not notifier.watchdog()
        notifier.start(lambda: "status")
        assert notifier._tasks == []
        await notifier.stop()


def test_send_errors_never_raise_and_warn_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gone = tmp_path / "nobody-listens.sock"  # no such socket: ENOENT on every send
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": str(gone)})
    with caplog.at_level(logging.DEBUG, logger="kvship.notify"):
        for _ in range(5):
            assert not notifier.ready("up")
            assert not notifier.watchdog()
    notifier.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "sd_notify" in warnings[0].getMessage()


def test_watchdog_interval_follows_the_environment() -> None:
    pid = os.getpid()
    assert watchdog_interval({"WATCHDOG_USEC": "200000"}) == pytest.approx(0.1)
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid)}) == 15.0
    # meant for another process (a parent that exported it), or not a watchdog at all
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(pid + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "x"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None


async def test_watchdog_pings_stop_while_the_loop_is_blocked(
    notify_socket: NotifySocket,
) -> None:
    """The pings come from the event loop: while a coroutine blocks it (here time.sleep,
    standing for any blocking call), none go out, so systemd would see a hung daemon."""
    notifier = SystemdNotifier.from_environ(
        {
            "NOTIFY_SOCKET": notify_socket.env_value,
            "WATCHDOG_USEC": "200000",  # a ping every 0.1 s
            "WATCHDOG_PID": str(os.getpid()),
        }
    )
    assert notifier.watchdog_s == pytest.approx(0.1)
    notifier.start()
    try:
        await asyncio.sleep(0.6)
        blocked_from = time.monotonic()
        time.sleep(0.6)  # the loop is stuck; the reader thread still runs
        blocked_until = time.monotonic()
        await asyncio.sleep(0.6)
    finally:
        await notifier.stop()
    times = pings(notify_socket.snapshot())
    before = [t for t in times if t < blocked_from]
    # a ping sent just before the block may land a moment after it began
    during = [t for t in times if blocked_from + 0.1 < t < blocked_until]
    after = [t for t in times if t >= blocked_until]
    assert len(before) >= 4, times
    assert during == [], (blocked_from, blocked_until, times)
    assert len(after) >= 3, times  # and they resume once the loop turns again
    gaps = [b - a for a, b in itertools.pairwise(before)]
    assert 0.08 <= statistics.median(gaps) <= 0.2, gaps


async def test_status_updates_survive_a_failing_summary(notify_socket: NotifySocket) -> None:
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": notify_socket.env_value})
    calls = 0

    def summary() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the summary")
        return f"update {calls}"

    notifier.start(summary, every_s=0.02)
    try:
        await asyncio.to_thread(notify_socket.wait_for, lambda f: f.get("STATUS") == "update 3")
    finally:
        await notifier.stop()
    assert notifier._tasks == []


# ------------------------------------------------------------------ a real kvshipd
def connects(family: socket.AddressFamily, address: object) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(address)
        except OSError:
            return False
        return True


def tcp(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


@pytest.fixture
def kvshipd_under_systemd(
    tmp_path: Path, notify_socket: NotifySocket
) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """kvshipd started as systemd starts a Type=notify unit with WatchdogSec=0.2s:
    (process, its config file, its ready file)."""
    config = tmp_path / "kvshipd.toml"
    config.write_text('[kvshipd]\npeer_rate = "unlimited"\n')
    ready = tmp_path / "kvshipd.ready"
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.env_value, "WATCHDOG_USEC": "200000"}
    env.pop("WATCHDOG_PID", None)
    args = [
        sys.executable, "-m", "kvship.daemon.main",
        "--config", str(config),
        "--node-name", "sd",
        "--peer-listen", "127.0.0.1:0",
        "--engine-socket", str(tmp_path / "kvshipd.sock"),
        "--engine-listen", "127.0.0.1:0",
        "--control-listen", "127.0.0.1:0",
        "--ready-file", str(ready),
    ]  # fmt: skip
    with open(tmp_path / "kvshipd.log", "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        yield proc, config, ready
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_kvshipd_tells_systemd_ready_status_watchdog_reload_and_stop(
    kvshipd_under_systemd: tuple[subprocess.Popen[bytes], Path, Path],
    notify_socket: NotifySocket,
    tmp_path: Path,
) -> None:
    proc, config, ready = kvshipd_under_systemd
    started = time.monotonic()

    # READY=1 first, and only once every listener is bound and the ready file written:
    # connect to each one right away, no retries.
    i_ready, at_ready, first = notify_socket.wait_for(lambda f: "READY" in f, timeout=30)
    assert i_ready == 0, notify_socket.snapshot()
    assert first["READY"] == "1"
    assert first["STATUS"].startswith("serving: transfers out 0 in 0, links up 0, staged 0.0")
    addresses = json.loads(ready.read_text())
    assert connects(socket.AF_INET, tcp(addresses["peer"]))
    assert connects(socket.AF_INET, tcp(addresses["engine"]))
    assert connects(socket.AF_INET, tcp(addresses["control"]))
    assert connects(socket.AF_UNIX, addresses["engine_socket"])

    # WATCHDOG=1 every WATCHDOG_USEC/2 = 0.1 s, from the daemon's loop
    time.sleep(max(0.0, at_ready + 1.2 - time.monotonic()))
    times = [t for t in pings(notify_socket.snapshot()) if t <= at_ready + 1.2]
    assert len(times) >= 6, times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 0.08 <= statistics.median(gaps) <= 0.2, gaps

    # SIGHUP: RELOADING=1 (with MONOTONIC_USEC), then READY=1 saying how it went
    mark = len(notify_socket.snapshot())
    config.write_text('[kvshipd]\npeer_rate = "1gbit"\n')
    proc.send_signal(signal.SIGHUP)
    i_rel, _, reloading = notify_socket.wait_for(lambda f: "RELOADING" in f, start=mark)
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    i_back, _, back = notify_socket.wait_for(lambda f: "READY" in f, start=i_rel)
    assert back["STATUS"].startswith("reloaded; serving: ")

    # a bad file is refused, and systemd still sees the reload end (READY=1)
    config.write_text('[kvshipd]\npeer_rate = "fast"\n')
    proc.send_signal(signal.SIGHUP)
    i_rel, _, _ = notify_socket.wait_for(lambda f: "RELOADING" in f, start=i_back + 1)
    _, _, refused = notify_socket.wait_for(lambda f: "READY" in f, start=i_rel)
    assert refused["STATUS"].startswith("reload refused, old config kept: "), refused
    assert proc.poll() is None

    # STATUS= on its own, refreshed every 5 s
    _, at_status, status = notify_socket.wait_for(
        lambda f: list(f) == ["STATUS"], timeout=max(1.0, started + 12 - time.monotonic())
    )
    assert status["STATUS"].startswith("serving: transfers out 0 in 0, links up 0")
    assert 4.5 <= at_status - at_ready <= 8, at_status - at_ready

    # SIGTERM: STOPPING=1 as the drain starts, then a clean exit
    mark = len(notify_socket.snapshot())
    proc.send_signal(signal.SIGTERM)
    _, _, stopping = notify_socket.wait_for(lambda f: "STOPPING" in f, start=mark)
    assert stopping["STOPPING"] == "1"
    assert stopping["STATUS"].startswith("draining (up to 30 s): transfers out 0 in 0")
    assert proc.wait(20) == 0, (tmp_path / "kvshipd.log").read_text()[-2000:]
    kinds = [next(iter(fields(text))) for _, text in notify_socket.snapshot()]
    assert "READY" not in kinds[kinds.index("STOPPING") :]


# ------------------------------------------------------------------ the unit file
def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (all values of a repeated key), comments out."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def seconds(value: str) -> float:
    return float(value.removesuffix("s"))


def test_unit_file_runs_kvshipd_as_a_notify_service() -> None:
    unit = unit_settings(UNIT.read_text())
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["ExecStart"][0].split()[0].endswith("/kvshipd")
    assert seconds(unit["WatchdogSec"][0]) >= 10  # well above any loop lag we accept
    # the drain must fit in the stop timeout, with a margin for closing
    assert seconds(unit["TimeoutStopSec"][0]) >= Config().drain_timeout_s + 10
    assert unit["Restart"] == ["on-failure"]
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert unit[key] == [""]
    assert unit["ProtectSystem"] == ["strict"]
    assert "PrivateDevices" not in unit  # /dev/shm and the GPU stay reachable
    assert unit["RuntimeDirectory"] == ["kvship"]


def systemd_analyze_verify(unit: Path) -> list[str]:
    """What ``systemd-analyze verify`` says about ``unit`` (an empty list: nothing wrong).
    It exits 0 on unknown keys and unparsable values, so its messages are the verdict."""
    exe = shutil.which("systemd-analyze")
    assert exe is not None
    result = subprocess.run(
        [exe, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=unit.parent
    )
    said = [ln for ln in (result.stdout + result.stderr).splitlines() if unit.name in ln]
    if result.returncode != 0 and not said:
        said = [f"exit {result.returncode}: {result.stderr.strip()}"]
    return said


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    # verify wants ExecStart's binary to exist: point it at this checkout's kvshipd
    kvshipd = shutil.which("kvshipd", path=str(Path(sys.executable).parent)) or sys.executable
    text = UNIT.read_text()
    assert "ExecStart=/opt/kvship/.venv/bin/kvshipd " in text
    copy = tmp_path / "kvshipd.service"
    copy.write_text(
        text.replace("ExecStart=/opt/kvship/.venv/bin/kvshipd ", f"ExecStart={kvshipd} ")
    )
    assert systemd_analyze_verify(copy) == []

    # and the check does catch a broken unit (so an empty answer above means something)
    broken = tmp_path / "broken" / "kvshipd.service"
    broken.parent.mkdir()
    broken.write_text(copy.read_text().replace("Type=notify\n", "Type=notifyy\nWatchdogSec=x\n"))
    complaints = systemd_analyze_verify(broken)
    assert any("service type" in c for c in complaints), complaints
