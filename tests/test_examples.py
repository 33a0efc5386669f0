"""The scripts in examples/ run as written against a real daemon pair."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kvship.bench.spawn import DaemonProcess

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_prefill_to_decode_ships_bit_exact(daemons: tuple[DaemonProcess, ...]) -> None:
    a, b = daemons
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "prefill_to_decode.py"),
         "--prefill-socket", a.socket_path, "--decode-socket", b.socket_path,
         "--peer", b.peer, "--tokens", "512"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["bit_exact"] is True and report["layers"] == 8
    assert report["bytes"] == 8 * 2 * 512 * 4 * 128 * 2
