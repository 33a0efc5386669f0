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
