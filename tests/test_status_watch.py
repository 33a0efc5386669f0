"""``kvship status --watch``: bounded live refreshes of a real daemon's status, as a table
(refreshes a blank line apart when stdout is not a terminal) or one JSON object a line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import free_port, good_transfer
from kvship.bench.spawn import DaemonProcess
from kvship.cli.status import store_figures, store_table

KVSHIP = [sys.executable, "-m", "kvship.cli.main"]


def kvship(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KVSHIP, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def watch(daemon: DaemonProcess, *extra: str) -> subprocess.CompletedProcess[str]:
    control = daemon.addresses["control"]
    args = ["status", "--control", control, "--watch", "--count", "2", "--interval", "0.2"]
    return kvship(*args, *extra)


async def test_watch_prints_two_refreshes(daemons: tuple[DaemonProcess, ...]) -> None:
    prefill, decode = daemons
    await good_transfer(prefill, decode)  # a link and a transfer to show
    proc = watch(prefill)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "\x1b[" not in proc.stdout, "no screen clearing when stdout is not a terminal"
    frames = proc.stdout.split("\n\nevery 0.2 s, ")
    assert len(frames) == 2, proc.stdout
    assert frames[0].startswith("every 0.2 s, ")
    for frame in frames:
        assert "prefill at " in frame and ": ok, version " in frame
        assert "transfers (" in frame and "peer links (1):" in frame and decode.peer in frame
        assert "store:" in frame and "hit ratio" in frame


async def test_watch_json_prints_one_object_a_line(daemons: tuple[DaemonProcess, ...]) -> None:
    decode = daemons[1]
    proc = watch(decode, "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    shots = [json.loads(line) for line in lines]
    for shot in shots:
        assert set(shot) == {"time", "health", "transfers", "links", "store"}
        assert shot["health"]["node"] == "decode" and shot["health"]["status"] == "ok"
        assert shot["store"]["capacity_bytes"] > 0
        assert {"bytes", "hits", "misses", "evictions"} <= set(shot["store"])
    assert 0.15 <= shots[1]["time"] - shots[0]["time"] < 5, "refreshes --interval apart"


def test_plain_status_json_has_the_store(daemons: tuple[DaemonProcess, ...]) -> None:
    proc = kvship("status", "--control", daemons[1].addresses["control"], "--json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert set(status) == {"health", "transfers", "links", "store"}
    assert status["store"]["capacity_bytes"] == daemons[1].metric("kvship_store_capacity_bytes")


def test_watch_keeps_going_when_the_daemon_is_gone() -> None:
    """Each refresh shows the error; the exit code says the last one failed."""
    control = f"127.0.0.1:{free_port()}"
    args = ["status", "--control", control, "--watch", "--count", "2", "--interval", "0.1"]
    proc = kvship(*args, "--json", "--timeout", "2")
    assert proc.returncode == 1
    shots = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(shots) == 2 and all("cannot reach" in s["error"] for s in shots)


@pytest.mark.parametrize(
    "args",
    [
        ["--count", "2"],
        ["--interval", "1"],
        ["--watch", "--count", "0"],
        ["--watch", "--interval", "-1"],
    ],
)
def test_watch_flags_are_checked(args: list[str]) -> None:
    proc = kvship("status", "--control", f"127.0.0.1:{free_port()}", *args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr


def test_store_figures_and_table() -> None:
    text = (
        "# TYPE kvship_store_bytes gauge\nkvship_store_bytes 1048576.0\n"
        "kvship_store_capacity_bytes 4194304.0\nkvship_store_hits_total 3.0\n"
        "kvship_store_misses_total 1.0\nkvship_store_evictions_total 0.0\n"
        "kvship_staged_bytes 7.0\n"
    )
    figures = store_figures(text)
    assert figures == {
        "bytes": 1048576.0,
        "capacity_bytes": 4194304.0,
        "hits": 3.0,
        "misses": 1.0,
        "evictions": 0.0,
    }
    table = store_table(figures)
    assert "1 MiB" in table and "4 MiB" in table and "25.0 %" in table and "75.0 %" in table
    assert store_table({}).startswith("store: no figures")


def test_watch_redraws_the_screen_on_a_terminal(daemons: tuple[DaemonProcess, ...]) -> None:
    pty = pytest.importorskip("pty")
    import os

    leader, follower = pty.openpty()
    try:
        control = daemons[0].addresses["control"]
        args = ["status", "--control", control, "--watch", "--count", "2", "--interval", "0.1"]
        proc = subprocess.run(
            [*KVSHIP, *args], stdout=follower, stderr=subprocess.PIPE, timeout=60, check=False
        )
        os.close(follower)
        follower = -1
        out = b""
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not data:
                break
            out += data
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert proc.returncode == 0, proc.stderr
    text = out.decode()
    assert text.count("\x1b[H\x1b[2J") == 2 and text.count("(Ctrl-C to stop)") == 2
