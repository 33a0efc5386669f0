"""The ``kvship`` command line, run as real subprocesses against two real daemons.

One daemon pair serves the module; one real KV sample (SmolLM2, 30 layers, tests/data/kv)
is shipped once by ``kvship send`` while ``kvship recv`` waits for it, and several tests look
at the outcome. Failures a user can cause must end in one line on stderr and the right exit code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import free_port
from kvship.bench.spawn import DaemonProcess, daemon_pair
from testdata import kv_path, token_ids_path

KV_FILE = kv_path("prose", "bf16")
TOKENS_FILE = token_ids_path("prose")
KVSHIP = [sys.executable, "-m", "kvship.cli.main"]


def kvship(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KVSHIP, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The stderr of an expected failure: one ``kvship: error:`` line, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kvship: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, ...]]:
    a, b = daemon_pair(str(tmp_path_factory.mktemp("cli")), ["--log-level", "warning"])
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def shipped(
    pair: tuple[DaemonProcess, DaemonProcess], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """``kvship recv`` subscribed, then ``kvship send`` of the real sample; both outputs."""
    prefill, decode = pair
    out = tmp_path_factory.mktemp("recv")
    recv = subprocess.Popen(
        [*KVSHIP, "recv", "--daemon", decode.socket_path, "--request-id", "smollm2/1",
         "--out", str(out), "--timeout", "20", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        send = kvship(
            "send", "--daemon", prefill.socket_path, "--peer", decode.peer,
            "--request-id", "smollm2/1", str(KV_FILE), "--token-ids", str(TOKENS_FILE), "--json",
        )  # fmt: skip
        recv_out, recv_err = recv.communicate(timeout=30)
    finally:
        if recv.poll() is None:
            recv.kill()
    assert send.returncode == 0, send.stderr
    assert recv.returncode == 0, recv_err
    return {"send": json.loads(send.stdout), "recv": json.loads(recv_out), "out": out}


def test_send_recv_real_sample_bit_exact(shipped: dict[str, Any]) -> None:
    sent, got = shipped["send"], shipped["recv"]
    kv = np.load(KV_FILE)
    assert sent["request_id"] == got["request_id"] == "smollm2/1"
    assert sent["payload_bytes"] == got["payload_bytes"] == kv.nbytes
    assert sent["digest"] == got["digest"]
    assert got["layers"] == kv.shape[0] == 30
    assert sent["goodput_GBps"] > 0 and sent["seconds"] > 0
    path = Path(got["path"])
    assert path == shipped["out"] / "smollm2_1.npz"  # the id made file-safe
    with np.load(path) as npz:
        keys = sorted(npz.files)
        assert keys == [f"layer_{i:03d}" for i in range(30)]
        for i, key in enumerate(keys):
            layer = npz[key]
            assert layer.dtype == kv.dtype and layer.shape == kv.shape[1:]
            assert layer.tobytes() == kv[i].tobytes(), f"layer {i} differs"
    tokens = np.load(shipped["out"] / "smollm2_1.tokens.npy")
    assert tokens.dtype == np.uint32
    assert np.array_equal(tokens, np.load(TOKENS_FILE))


def test_status_json_shows_the_transfer(
    pair: tuple[DaemonProcess, DaemonProcess], shipped: dict[str, Any]
) -> None:
    prefill, decode = pair
    proc = kvship("status", "--control", prefill.addresses["control"], "--json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["health"]["status"] == "ok" and status["health"]["node"] == "prefill"
    mine = [t for t in status["transfers"] if t["request_id"] == "smollm2/1"]
    assert [(t["direction"], t["state"]) for t in mine] == [("out", "complete")]
    assert mine[0]["bytes_done"] == shipped["send"]["payload_bytes"]
    assert [link["peer"] for link in status["links"]] == [decode.peer]

    table = kvship("status", "--control", decode.addresses["control"])
    assert table.returncode == 0, table.stderr
    assert "smollm2/1" in table.stdout and "complete" in table.stdout


def test_recv_output_sends_again_over_tcp(
    pair: tuple[DaemonProcess, DaemonProcess], shipped: dict[str, Any], tmp_path: Path
) -> None:
    """The .npz that recv writes is valid send input (sent over the engine TCP API)."""
    prefill, decode = pair
    recv = subprocess.Popen(
        [*KVSHIP, "recv", "--daemon", decode.socket_path, "--request-id", "again",
         "--out", str(tmp_path), "--timeout", "20", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        send = kvship(
            "send", "--daemon", prefill.addresses["engine"], "--peer", decode.peer,
            "--request-id", "again", shipped["recv"]["path"], "--json",
        )  # fmt: skip
        out, err = recv.communicate(timeout=30)
    finally:
        if recv.poll() is None:
            recv.kill()
    assert send.returncode == 0, send.stderr
    assert recv.returncode == 0, err
    assert json.loads(send.stdout)["digest"] == shipped["send"]["digest"]  # same bytes
    assert json.loads(out)["digest"] == shipped["send"]["digest"]
    with np.load(tmp_path / "again.npz") as a, np.load(shipped["recv"]["path"]) as b:
        assert sorted(a.files) == sorted(b.files)
        assert all(a[k].tobytes() == b[k].tobytes() for k in a.files)


def test_send_to_unreachable_daemon_exits_1(tmp_path: Path) -> None:
    proc = kvship(
        "send", "--daemon", str(tmp_path / "absent.sock"), "--peer", "127.0.0.1:9",
        "--request-id", "x", "--synthetic", "1MiB",
    )  # fmt: skip
    assert proc.returncode == 1
    assert "cannot reach kvshipd" in one_line_error(proc)
    assert proc.stdout == ""


def test_status_of_unreachable_daemon_exits_1() -> None:
    proc = kvship("status", "--control", f"127.0.0.1:{free_port()}", "--json")
    assert proc.returncode == 1
    assert "cannot reach" in one_line_error(proc)


GARBAGE_NPY = "<garbage.npy>"  # stands for a file of non-numpy bytes the test writes


@pytest.mark.parametrize(
    ("args", "needle", "one_line"),
    [
        # argparse refuses it: its usage lines come first, so not one line
        pytest.param(["--synthetic", "12parsecs"], "is not a size", False, id="not-a-size"),
        pytest.param(
            ["--synthetic", "1000", "--layers", "3"], "not a multiple", True, id="not-a-multiple"
        ),
        pytest.param(["/no/such/file.npy"], "no such file", True, id="missing-file"),
        pytest.param([__file__], "expected an .npy or .npz", True, id="not-npy-or-npz"),
        pytest.param([GARBAGE_NPY], "not an .npy file", True, id="garbage-npy"),
    ],
)
def test_bad_input_exits_2(tmp_path: Path, args: list[str], needle: str, one_line: bool) -> None:
    garbage = tmp_path / "bad.npy"
    garbage.write_bytes(b"not numpy at all")
    args = [str(garbage) if arg == GARBAGE_NPY else arg for arg in args]
    proc = kvship(
        "send", "--daemon", str(tmp_path / "absent.sock"), "--peer", "127.0.0.1:9",
        "--request-id", "x", *args,
    )  # fmt: skip
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    if one_line:
        assert needle in one_line_error(proc)


def test_demo_is_bit_exact() -> None:
    proc = kvship("demo", "--bytes", "8MiB", "--json", timeout=90)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["digest_match"] is True
    assert report["mismatched_layers"] == []
    assert report["layout"]["full_attention_layers"] == 6
    assert report["layout"]["linear_attention_layers"] == 18
    assert report["payload_bytes"] <= 8 << 20
    assert report["metrics"]["prefill"]["payload_bytes_sent"] == report["payload_bytes"]
    assert report["metrics"]["decode"]["payload_bytes_received"] == report["payload_bytes"]
    assert report["metrics"]["decode"]["transfer"]["state"] == "complete"


def test_version() -> None:
    proc = kvship("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("kvship ")
