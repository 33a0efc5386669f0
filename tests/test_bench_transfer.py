"""``kvship bench`` (transfer workload) end to end, small: the JSON fields operators and
issue checks read, for both engine<->daemon paths. No timing thresholds here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROCESSES = {"send_engine", "prefill_daemon", "decode_daemon", "recv_engine"}


@pytest.mark.parametrize("local_path", ["shm", "socket"])
def test_bench_reports_syscalls_and_cpu_per_process(local_path: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvship.cli.main", "bench", "--bytes", "64MiB", "--layers", "8",
         "--local-path", local_path, "--no-baseline", "--json"],
        capture_output=True, text=True, timeout=180, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert result["digest_match"] is True and result["local_path"] == local_path
    calls = result["syscalls_per_chunk"]
    assert calls.keys() == {"prefill_daemon", "decode_daemon"}
    for daemon in calls.values():
        assert daemon["read"] > 0 and daemon["write"] > 0
        assert daemon["total"] == pytest.approx(daemon["read"] + daemon["write"], abs=0.02)
    cpu = result["cpu_s_per_GiB"]
    assert cpu.keys() == PROCESSES | {"daemons", "total"}
    assert cpu["total"] == pytest.approx(sum(cpu[p] for p in PROCESSES), abs=0.01)
    assert cpu["daemons"] > 0
