"""tools/gpu_check.sh and tools/bench_gpu.py where no GPU is: they fail fast and clearly,
and the benchmark's code path runs on numpy (``--host``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvship.staging import HAVE_CUPY

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {
    "memcpy_peak_GBps",
    "device_to_arena_GBps",
    "ratio_vs_peak",
    "put_ms_median",
    "put_ms_max",
    "copy_s",
    "send_s",
    "total_s",
    "overlap_visible",
    "pinned",
    "digest_match",
}


def test_gpu_check_without_a_gpu_stops_at_once_and_says_why(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{tmp_path}:/usr/bin:/bin",
        "KVSHIP_GPU_LOG": str(tmp_path / "log"),
    }
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho 'No devices were found' >&2\nexit 9\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    done = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh")],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["ok"] is False and "no CUDA device" in last["error"]
    assert "no CUDA device" in done.stderr


@pytest.mark.skipif(HAVE_CUPY, reason="checks the refusal where no GPU is")
def test_bench_gpu_without_a_gpu_refuses_clearly() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_gpu.py"), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "no CUDA device" in done.stderr and not done.stdout


def test_bench_gpu_runs_its_code_path_on_the_host() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_gpu.py"), "--host", "--json",
         "--layers", "4", "--layer-mib", "2", "--repeat", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures.keys() >= FIELDS
    assert figures["digest_match"] is True and figures["host_mode"] is True
    assert figures["layers"] == 4 and figures["layer_bytes"] == 2 << 20
