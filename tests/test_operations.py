"""docs/operations.md matches what a running daemon exposes: every metric on /metrics is in
its table with the right type, and the table names nothing the daemon does not export."""

from __future__ import annotations

import re
from pathlib import Path

from kvship.bench.spawn import DaemonProcess

OPERATIONS = Path(__file__).resolve().parents[1] / "docs" / "operations.md"


def documented_metrics() -> dict[str, str]:
    section = OPERATIONS.read_text().split("### Metrics", 1)[1].split("\n### ", 1)[0]
    return dict(re.findall(r"^\| `(kvship_[a-z_]+)` \| (\w+) \|", section, re.M))


def exposed_metrics(daemon: DaemonProcess) -> dict[str, str]:
    text = daemon.metrics_text()
    return dict(re.findall(r"^# TYPE (kvship_[a-z_]+) (\w+)$", text, re.M))


def test_every_metric_is_documented_with_its_type(daemons: tuple[DaemonProcess, ...]) -> None:
    documented = documented_metrics()
    for daemon in daemons:
        exposed = exposed_metrics(daemon)
        assert exposed, "no kvship metrics exposed"
        assert sorted(set(exposed) - set(documented)) == [], "exposed but not documented"
        assert sorted(set(documented) - set(exposed)) == [], "documented but not exposed"
        wrong = {k: (v, documented[k]) for k, v in exposed.items() if documented[k] != v}
        assert wrong == {}, "type in the docs differs"
