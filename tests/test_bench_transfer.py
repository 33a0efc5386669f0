"""``kvship bench`` (transfer workload) end to end, small: the JSON fields operators and
issue checks read, for both engine<->daemon paths. No timing thresholds here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def _bench(*args: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "kvship.cli.main", "bench", "--bytes", "32MiB", "--layers", "8",
         "--no-baseline", "--json", *args],
        capture_output=True, text=True, timeout=180, check=True,
    )  # fmt: skip
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_bench_vs_mooncake_says_why_not_where_it_cannot_run() -> None:
    """An interpreter without Mooncake: kvship's figures still come, with the reason."""
    result = _bench("--vs", "mooncake", "--mooncake-python", sys.executable)
    assert result["digest_match"] is True
    assert result["mooncake_GBps"] is None and result["ratio_vs_mooncake"] is None
    assert "cannot import mooncake.engine" in str(result["mooncake_unavailable"])


MOONCAKE_PYTHON = Path(__file__).resolve().parent.parent / ".venv-mooncake" / "bin" / "python"


@pytest.mark.skipif(not MOONCAKE_PYTHON.exists(), reason="make bench-mooncake makes .venv-mooncake")
def test_bench_vs_mooncake_ships_the_same_bytes_through_mooncake() -> None:
    result = _bench("--vs", "mooncake", "--mooncake-python", str(MOONCAKE_PYTHON))
    if result.get("mooncake_unavailable"):
        pytest.skip(str(result["mooncake_unavailable"]))
    assert result["mooncake_bitexact"] is True
    assert isinstance(result["mooncake_GBps"], float) and result["mooncake_GBps"] > 0
    assert isinstance(result["ratio_vs_mooncake"], float)


def test_bench_tls_runs_the_same_transfer_over_mutual_tls() -> None:
    result = _bench("--tls")
    assert result["digest_match"] is True and result["tls_digest_match"] is True
    runs = result["tls_runs_GBps"]
    assert isinstance(runs, list) and len(runs) == 1 and runs[0] > 0
    tls, plain = result["tls_goodput_GBps"], result["goodput_GBps"]
    assert isinstance(tls, float) and isinstance(plain, float)
    assert result["tls_ratio_vs_plain"] == pytest.approx(tls / plain, rel=0.02)
    tls_cpu = result["tls_cpu_s_per_GiB"]
    assert isinstance(tls_cpu, dict) and tls_cpu.keys() == PROCESSES | {"daemons", "total"}
    assert tls_cpu["daemons"] > 0
