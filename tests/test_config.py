"""kvshipd configuration: the documented example matches the code, bad values fail early."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvship.daemon.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_documents_the_defaults() -> None:
    assert load_config(ROOT / "daemon" / "kvshipd.toml") == Config()


def test_example_config_names_every_key() -> None:
    text = (ROOT / "daemon" / "kvshipd.toml").read_text()
    missing = [key for key in Config.__dataclass_fields__ if f"\n{key} = " not in text]
    assert missing == []


def test_flags_override_file(tmp_path: Path) -> None:
    path = tmp_path / "k.toml"
    path.write_text('node_name = "from-file"\nwindow_bytes = 8388608\n')
    cfg = load_config(path, {"window_bytes": 33554432, "node_name": None})
    assert (cfg.node_name, cfg.window_bytes) == ("from-file", 33554432)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("window_bytes = 0", "window_bytes"),
        ("window_bytes = 1024", "window_bytes"),
        ("connections_per_peer = 0", "connections_per_peer"),
        ('connections_per_peer = "4"', "connections_per_peer"),
        ("drain_timeout_s = -1", "drain_timeout_s"),
        ("staging_bytes = 1", "staging_bytes"),
        ("log_level = 'loud'", "log_level"),
        ("peer_rate = '-1gbit'", "peer_rate"),
        ("egress_rate = '0'", "egress_rate"),
        ("peer_burst = '0'", "peer_burst"),
        ("compression = 'lz4'", "compression"),
        ("compress_workers = 0", "compress_workers"),
        ("no_such_key = 1", "no_such_key"),
        ("window_bytes = ", "cannot read config"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=key):
        load_config(path)


def test_kvshipd_exits_2_with_a_clear_message_on_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("window_bytes = 10\n")
    out = subprocess.run(
        [sys.executable, "-m", "kvship.daemon.main", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "window_bytes" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("no_such_key = 1", ["no_such_key", "bad.toml"]),
        ('window_bytes = "8MiB"', ["window_bytes", "expected int", "bad.toml"]),
        ("window_bytes = 10", ["window_bytes", "bad.toml"]),
        ('log_format = "xml"', ["log_format", "bad.toml"]),
        ('control_listen = "nowhere"', ["control_listen", "bad.toml"]),
        ('engine_socket = "/proc/kvship/kvshipd.sock"', ["engine_socket", "/proc"]),
    ],
    ids=["unknown-key", "wrong-type", "out-of-range", "bad-choice", "bad-address", "bad-dir"],
)
def test_bad_config_stops_kvshipd_before_binding_and_check_config_agrees(
    tmp_path: Path, text: str, names: list[str]
) -> None:
    """Every bad config stops kvshipd at start, exit 2, with a message naming the key and
    the file, before any port is bound; ``kvshipd --check-config FILE`` says the same."""
    import socket

    with socket.socket() as probe:  # a port we know: nothing may be listening on it after
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = tmp_path / "bad.toml"
    path.write_text(f'peer_listen = "127.0.0.1:{port}"\n{text}\n')
    for args in (["--config", str(path)], ["--check-config", str(path)]):
        out = subprocess.run(
            [sys.executable, "-m", "kvship.daemon.main", *args],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 2, out
        assert all(name in out.stderr for name in names), out.stderr
        assert "Traceback" not in out.stderr
    with socket.socket() as probe:  # nothing bound it meanwhile
        probe.bind(("127.0.0.1", port))


def test_check_config_accepts_the_example(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvship.daemon.main", "--check-config",
         str(ROOT / "daemon" / "kvshipd.toml"), "--engine-socket", str(tmp_path / "k.sock")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "configuration OK" in out.stdout


def test_operations_guide_has_the_config_reference_the_code_defines() -> None:
    """docs/operations.md's reference table is generated from Config's own field docs
    (python -c 'from kvship.daemon.config import reference_markdown as r; print(r())');
    a key added or changed in the code without the docs fails here."""
    from kvship.daemon.config import reference_markdown

    text = (ROOT / "docs" / "operations.md").read_text()
    block = text.split("<!-- config-reference:begin -->\n", 1)[1].split(
        "<!-- config-reference:end -->", 1
    )[0]
    assert block == reference_markdown()
