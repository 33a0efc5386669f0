"""tools/fuzz_wire.py, quickly: each target for a few hundred inputs through the seeded
random mutator (this venv has no atheris), that its invariants do catch a broken decoder,
a hang, a stray exception and split-dependent results, and a brief --replay-daemon
against real kvshipd. The long, coverage-guided runs are ``make fuzz`` (nightly)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import load_tool
from kvship.protocol import Connection, FrameType, Ping
from kvship.protocol.frames import DECODERS

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "fuzz_wire.py"


fuzz_wire = load_tool("fuzz_wire")
RUNS = 300


def run(target: str, tmp_path: Path, runs: int = RUNS, **kwargs: Any) -> dict[str, Any]:
    summary: dict[str, Any] = fuzz_wire.fuzz_random(
        target,
        runs=runs,
        max_seconds=15,
        corpus=tmp_path / "corpus",
        crash_dir=tmp_path / "crashes",
        seed=kwargs.pop("seed", 1),
        check_every=kwargs.pop("check_every", 4),
        **kwargs,
    )
    return summary


@pytest.mark.parametrize("target", fuzz_wire.TARGETS)
def test_target_runs_clean(target: str, tmp_path: Path) -> None:
    summary = run(target, tmp_path)
    assert summary["crashes"] == 0, summary["unique_crashes"]
    assert summary["runs"] == RUNS
    assert summary["engine"] == "random"
    assert summary["corpus_size"] > 0
    if target != "decoders":
        assert summary["split_checks"] == RUNS // 4
        assert summary["coverage"]["outcome_classes"] > 10
        assert summary["protocol_errors"], "hostile inputs should be refused somewhere"


@pytest.mark.parametrize("target", fuzz_wire.AUTH_TARGETS)
def test_authenticated_targets_run_clean(target: str, tmp_path: Path) -> None:
    summary = run(target, tmp_path, runs=200, auth=True)
    assert summary["crashes"] == 0, summary["unique_crashes"]
    assert summary["runs"] == 200 and summary["auth"] is True
    assert "AUTH_FAILED" in summary["protocol_errors"]  # mutated MACs and key ids


def test_authenticated_prefix_gets_past_the_handshake() -> None:
    harness = fuzz_wire.Harness("peer-acceptor", auth=True, check_every=1)
    stream = fuzz_wire._transfer_stream(1, (40, 8), 16)
    outcome = harness.execute(fuzz_wire.make_input(stream, respond=True, split=2))
    assert harness.crashes == []
    kinds = [e[0] if isinstance(e, tuple) else type(e).__name__ for e in outcome.events]
    assert kinds[:3] == ["Hello", "AuthProof", "Open"] and kinds[-1] == "End"
    assert outcome.error is None and outcome.state == "OPEN"


def test_seed_transfer_goes_through() -> None:
    """The seeds really get past the handshake: a whole transfer, answered as kvshipd
    would (the harness's HELLO, accept(), then COMPLETE)."""
    harness = fuzz_wire.Harness("peer-acceptor", check_every=1)
    stream = fuzz_wire._transfer_stream(1, (40, 8), 16)
    outcome = harness.execute(fuzz_wire.make_input(stream, respond=True, split=2, eof=True))
    assert harness.crashes == []
    kinds = [e[0] if isinstance(e, tuple) else type(e).__name__ for e in outcome.events]
    assert kinds == ["Hello", "Open", "CHUNK", "CHUNK", "CHUNK", "CHUNK", "End"]
    assert outcome.error is None and outcome.state == "CLOSED"  # closed by our EOF
    assert harness.split_checks == 1


def test_catches_a_decoder_that_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = DECODERS[FrameType.PING]

    def broken(body: memoryview) -> Any:
        if len(body) and body[0] == 0x42:
            raise KeyError("planted")
        return original(body)

    monkeypatch.setitem(DECODERS, FrameType.PING, broken)
    harness = fuzz_wire.Harness("decoders")
    harness.on_crash = fuzz_wire._crash_writer(tmp_path, "decoders")
    harness.execute(bytes([FrameType.PING, 0x42, 0, 0, 0, 0, 0, 0, 0]))
    harness.execute(bytes([FrameType.PING, 0x41, 0, 0, 0, 0, 0, 0, 0]))
    assert harness.crash_count == 1
    crash = harness.crashes[0]
    assert crash["kind"] == "exception" and "planted" in crash["message"]
    saved = Path(crash["file"])
    assert saved.read_bytes().hex() == crash["hex"]
    # --reproduce runs the saved input again and reports the same crash
    again = fuzz_wire.reproduce("decoders", saved, 2.0)
    assert again["crashes"] == 1


def test_catches_a_stray_exception_in_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Connection, frame: Any) -> None:
        raise IndexError("planted")

    monkeypatch.setattr(Connection, "_on_open", broken)
    harness = fuzz_wire.Harness("peer-acceptor")
    harness.execute(fuzz_wire.make_input(fuzz_wire._transfer_stream(1, (8,), 8)))
    assert harness.crash_count == 1
    assert harness.crashes[0]["where"].startswith("protocol/")


def test_catches_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    original = DECODERS[FrameType.PING]

    def slow(body: memoryview) -> Any:
        time.sleep(5)
        return original(body)

    monkeypatch.setitem(DECODERS, FrameType.PING, slow)
    harness = fuzz_wire.Harness("decoders", call_timeout=0.2)
    start = time.monotonic()
    harness.execute(bytes([FrameType.PING]) + Ping(1).encode()[8:])
    assert time.monotonic() - start < 2  # the alarm cut it short
    assert [c["kind"] for c in harness.crashes] == ["timeout"]


def test_catches_split_dependent_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine that loses a frame when its bytes come one at a time: the split check."""
    original = Connection.buffer_updated

    def lossy(self: Connection, nbytes: int) -> list[Any]:
        frames = original(self, nbytes)
        return [] if nbytes == 1 and any(isinstance(f, Ping) for f in frames) else frames

    monkeypatch.setattr(Connection, "buffer_updated", lossy)
    harness = fuzz_wire.Harness("peer-acceptor", check_every=1)
    harness.execute(fuzz_wire.make_input(Ping(3).encode()))
    assert [c["kind"] for c in harness.crashes] == ["split-mismatch"]


def test_cli_json_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--target",
            "initiator",
            "--engine",
            "random",
            "--runs",
            "200",
            "--max-seconds",
            "15",
            "--corpus",
            str(tmp_path / "corpus"),
            "--crash-dir",
            str(tmp_path / "crashes"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("target", "runs", "wall_s", "execs_per_s", "crashes", "coverage", "corpus_size"):
        assert key in summary
    assert summary["target"] == "initiator" and summary["runs"] == 200
    assert summary["crashes"] == 0


def test_replay_daemon_briefly(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    fuzz_wire._write_seeds(corpus, "peer-acceptor")
    summary = fuzz_wire.replay_daemon(
        corpus_dirs=[corpus],
        generated=40,
        max_seconds=30,
        crash_dir=tmp_path / "crashes",
        seed=3,
        batch=64,
        io_timeout=5.0,
        workdir=tmp_path / "daemons",
    )
    assert summary["daemon_crashes"] == 0, summary["suspects"]
    assert summary["daemon_hangs"] == 0, summary["connection_results"]
    assert summary["good_transfer"] is True, summary["daemon_logs"]
    assert summary["daemon_tracebacks"] == 0
    assert summary["runs"] == 2 * (summary["corpus_files"] + 40)  # both listeners, each
    assert summary["batches"] >= 2 and summary["protocol_errors"]
    assert summary["crashes"] == 0
