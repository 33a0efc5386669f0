"""The Grafana dashboard (daemon/grafana/kvship.json) and the Prometheus alert rules
(daemon/prometheus/alerts.yml) query only what a running kvshipd exports.

Every PromQL expression in both files is taken apart by a small parser (tested here too)
into the metric names and label names it uses; the metric names must be ones a live
daemon's /metrics declares (histograms by their _bucket/_sum/_count series), or ``up``;
the label names ones docs/operations.md gives those metrics, or what Prometheus adds.
With ``promtool`` installed (Debian: ``apt-get install prometheus``) the rules are checked
by it, the dashboard's expressions are parsed by it, and each alert is unit-tested on made
up series (firing, and not firing where it must not); without promtool those parts skip.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvship.bench.spawn import DaemonProcess

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "daemon" / "grafana" / "kvship.json"
ALERTS = ROOT / "daemon" / "prometheus" / "alerts.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian/Ubuntu: apt-get install prometheus)"
)


# ------------------------------------------------------------------ a PromQL reader
def words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Functions (https://prometheus.io/docs/prometheus/latest/querying/functions/).
FUNCTIONS = words(
    """abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil
    changes clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week
    day_of_year days_in_month deg delta deriv exp floor histogram_avg histogram_count
    histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum
    holt_winters double_exponential_smoothing hour idelta increase irate label_join
    label_replace last_over_time ln log10 log2 mad_over_time max_over_time min_over_time
    minute month pi predict_linear present_over_time quantile_over_time rad rate resets
    round scalar sgn sin sinh sort sort_desc sort_by_label sort_by_label_desc sqrt
    stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp vector year
    start end"""
)
AGGREGATIONS = words(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile "
    "limitk limit_ratio"
)
KEYWORDS = words(
    "and or unless atan2 by without on ignoring group_left group_right offset bool inf nan"
)
# Grafana's template variables and macros: $peer, ${peer}, ${peer:regex}, [[peer]].
TEMPLATE_VAR = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
SELECTOR = re.compile(r"\{([^{}]*)\}")  # label matchers (PromQL never nests braces)
RANGE = re.compile(r"\[[^\[\]]*\]")  # [5m], [1h:30s] (template variables already out)
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
TOKEN = re.compile(
    r"(?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
    r"(?:(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)?)"
    r"|(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<call>\s*\()?"
)


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression uses. Raises ValueError for a call of
    something that is not a PromQL function or aggregation (a typo such as ``rte(``)."""
    text = TEMPLATE_VAR.sub("", expr)  # first: `${var}` would read as a selector
    labels: set[str] = set()
    text = STRING.sub('""', text)
    for body in SELECTOR.findall(text):
        labels.update(MATCHER_LABEL.findall(body))
    text = SELECTOR.sub(" ", text)
    text = RANGE.sub(" ", text)
    for _, names in GROUPING.findall(text):
        labels.update(n.strip() for n in names.split(",") if n.strip())
    text = GROUPING.sub(r" \1 ", text)
    text = STRING.sub(" ", text)  # strings left: count_values("x", ...), label_replace(...)
    metrics: set[str] = set()
    for match in TOKEN.finditer(text):
        name = match["name"]
        if name is None:
            continue  # a number or a duration
        if match["call"]:
            if name not in FUNCTIONS | AGGREGATIONS | KEYWORDS:
                raise ValueError(f"{expr!r}: {name}() is not a PromQL function")
            continue
        if name.lower() not in KEYWORDS and name not in AGGREGATIONS:
            metrics.add(name)
    return metrics, labels


def label_values_selector(query: str) -> str:
    """``label_values(kvship_x{instance=~"$instance"}, peer)`` -> its selector."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query, re.S)
    assert match, f"variable query {query!r} is not label_values(selector, label)"
    return match[1]


# ------------------------------------------------------------------ what the files hold
def load_dashboard() -> dict[str, Any]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert isinstance(dashboard, dict)
    return dashboard


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    dashboard = load_dashboard()
    found = [
        (f"panel {panel['title']!r} {target.get('refId', '?')}", target["expr"])
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found.append((f"variable {var['name']}", label_values_selector(query)))
    return found


def yaml() -> Any:
    """PyYAML (the `test` extra has it); without it only the rule tests skip."""
    return pytest.importorskip("yaml", reason="PyYAML not installed (pip install -e .[test])")


def load_rules() -> list[dict[str, Any]]:
    doc = yaml().safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alert_exprs() -> list[tuple[str, str]]:
    return [(f"alert {rule['alert']}", rule["expr"]) for rule in load_rules()]


def exported_series(daemon: DaemonProcess) -> set[str]:
    """The series names a daemon's /metrics declares, from its ``# TYPE`` lines."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\w+)$", daemon.metrics_text(), re.M):
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        elif kind == "summary":
            names.update((name, f"{name}_sum", f"{name}_count"))
        else:
            names.add(name)  # a counter's TYPE line already names the _total series
    return names


def documented_labels() -> set[str]:
    """Labels docs/operations.md gives the metrics (its table matches the daemon)."""
    section = OPERATIONS.read_text().split("### Metrics", 1)[1].split("\n### ", 1)[0]
    labels: set[str] = set()
    for cell in re.findall(r"^\| `kvship_[a-z_]+` \| \w+ \| ([^|]*) \|", section, re.M):
        labels.update(label.strip() for label in cell.split(",") if label.strip())
    return labels


TARGET_LABELS = {"instance", "job", "le", "__name__"}  # Prometheus' own, and histograms'


# ------------------------------------------------------------------ the parser itself
@pytest.mark.parametrize(
    ("expr", "metrics", "labels"),
    [
        ('up{job="kvship"} == 0', {"up"}, {"job"}),
        (
            'sum by (instance) (rate(kvship_store_hits_total{instance=~"$instance"}[5m]))',
            {"kvship_store_hits_total"},
            {"instance"},
        ),
        (
            "histogram_quantile(0.99, sum by (le, direction) "
            '(rate(kvship_transfer_duration_seconds_bucket{outcome="complete"}[$__rate_interval])))',
            {"kvship_transfer_duration_seconds_bucket"},
            {"le", "direction", "outcome"},
        ),
        (
            "(rate(lag_count[5m]) - ignoring (le) rate(lag_bucket{le='0.1'}[5m])) > 0",
            {"lag_count", "lag_bucket"},
            {"le"},
        ),
        (
            "a / on (instance) group_left (peer) b offset 5m > bool 1e-3 and c[1h:30s] < 2h",
            {"a", "b", "c"},
            {"instance", "peer"},
        ),
        (
            'sum without (peer) (x{peer!~"p:.*", code!="a{b}"}) or topk(3, y) unless Inf',
            {"x", "y"},
            {"peer", "code"},
        ),
        (
            'kvship_link_wire_bytes_per_second{peer=~"${peer:regex}"} * 8',
            {"kvship_link_wire_bytes_per_second"},
            {"peer"},
        ),
        ('count_values("version", build_info) > 0x10', {"build_info"}, set()),
        ("time() - max(last_seen:timestamp)", {"last_seen:timestamp"}, set()),
    ],
)
def test_promql_names(expr: str, metrics: set[str], labels: set[str]) -> None:
    assert promql_names(expr) == (metrics, labels)


def test_promql_names_rejects_unknown_functions() -> None:
    with pytest.raises(ValueError, match="rte"):
        promql_names("rte(kvship_chunks_sent_total[5m])")


def test_label_values_selector() -> None:
    query = 'label_values(kvship_link_wire_bytes_per_second{instance=~"$instance"}, peer)'
    assert label_values_selector(query) == (
        'kvship_link_wire_bytes_per_second{instance=~"$instance"}'
    )


# ------------------------------------------------------------------ the files
def test_dashboard_is_a_grafana_model() -> None:
    dashboard = load_dashboard()
    assert dashboard["title"] and dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"instance", "peer"} <= set(variables)
    peer_query = variables["peer"]["query"]["query"]
    assert peer_query.startswith("label_values(kvship_link_wire_bytes_per_second")
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    panels = [p for p in all_panels(dashboard) if p["type"] != "row"]
    assert len(panels) >= 12
    for panel in all_panels(dashboard):
        assert panel.get("title"), f"panel {panel['id']} has no title"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no target"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r}: empty expr"
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_alert_rules_are_well_formed() -> None:
    rules = load_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    documented = re.findall(r"^- \*\*(Kvship\w+)\*\*", OPERATIONS.read_text(), re.M)
    assert names == documented, "docs/operations.md 'Alerts that matter' differs"
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", str(rule["for"])), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    down = next(rule for rule in rules if rule["alert"] == "KvshipDown")
    assert 'job="kvship"' in down["expr"]


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_queries_name_only_exported_metrics(
    daemons: tuple[DaemonProcess, ...], source: str
) -> None:
    exported = {"up"}
    for daemon in daemons:
        exported |= exported_series(daemon)
    assert "kvship_transfers_total" in exported and "kvship_store_hits_total" in exported
    labels = documented_labels() | TARGET_LABELS
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    assert exprs
    unknown: dict[str, set[str]] = {}
    bad_labels: dict[str, set[str]] = {}
    for where, expr in exprs:
        metrics, used = promql_names(expr)
        assert metrics, f"{where}: no metric in {expr!r}"
        if metrics - exported:
            unknown[where] = metrics - exported
        if used - labels:
            bad_labels[where] = used - labels
    assert unknown == {}, "metrics kvshipd does not export"
    assert bad_labels == {}, "labels no kvship metric has"


# ------------------------------------------------------------------ promtool
def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    proc = promtool("check", "rules", str(ALERTS.relative_to(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in proc.stdout


@needs_promtool
def test_promtool_parses_the_dashboard_queries(tmp_path: Path) -> None:
    """promtool has no bare query parser: each dashboard query becomes a recording rule of
    a throwaway rule file (template variables replaced by what "All" selects)."""
    rules = [
        {"record": f"kvship:dashboard:q{i}", "expr": re.sub(r"\$\{?\w+\}?", ".*", expr)}
        for i, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml().safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def series(name: str, values: str) -> dict[str, str]:
    return {"series": name, "values": values}


def fires(alert: str, at: str, *label_sets: dict[str, str]) -> dict[str, Any]:
    """At ``at``, ``alert`` fires once for each label set (none: it does not fire); the
    rule's own labels (severity) are added by the test."""
    return {
        "eval_time": at,
        "alertname": alert,
        "exp_alerts": [{"exp_labels": dict(ls)} for ls in label_sets],
    }


A = 'instance="a:7472", job="kvship"'  # the daemon that should alert in each case
B = 'instance="b:7472", job="kvship"'  # one that should not
LA = {"instance": "a:7472", "job": "kvship"}

# promtool unit tests (https://prometheus.io/docs/prometheus/latest/configuration/unit_testing_rules/),
# one scrape a minute. Series notation: 'a+bxN' = a, a+b, ... N more samples.
RULE_TESTS: list[dict[str, Any]] = [
    {
        "input_series": [series(f"up{{{A}}}", "1 1 0x10"), series(f"up{{{B}}}", "1x12")],
        "alert_rule_test": [
            fires("KvshipDown", "2m"),  # down for 0 minutes
            fires("KvshipDown", "4m", LA),
        ],
    },
    {
        "input_series": [
            # a: at its 1 GB/s cap; b: same rate, no cap; c: half its cap; d: idle, cap 0
            series(f'kvship_link_wire_bytes_per_second{{{A}, peer="p:7470"}}', "99e7x20"),
            series(f'kvship_link_rate_limit_bytes_per_second{{{A}, peer="p:7470"}}', "1e9x20"),
            series(f'kvship_link_wire_bytes_per_second{{{B}, peer="p:7470"}}', "99e7x20"),
            series('kvship_link_wire_bytes_per_second{instance="c:7472", peer="p:7470"}', "5e8x20"),
            series(
                'kvship_link_rate_limit_bytes_per_second{instance="c:7472", peer="p:7470"}',
                "1e9x20",
            ),
            series('kvship_link_wire_bytes_per_second{instance="d:7472", peer="p:7470"}', "0x20"),
            series(
                'kvship_link_rate_limit_bytes_per_second{instance="d:7472", peer="p:7470"}', "0x20"
            ),
        ],
        "alert_rule_test": [
            fires("KvshipLinkSaturated", "5m"),
            fires("KvshipLinkSaturated", "15m", {**LA, "peer": "p:7470"}),
        ],
    },
    {
        "input_series": [
            # a: 10 complete and 1 failed a minute (9 %); b: 1 failed in 100; c: 1 of 2
            # fail, but only one transfer a minute (under the minimum volume)
            series(
                f'kvship_transfers_total{{{A}, direction="out", outcome="complete"}}', "0+10x40"
            ),
            series(f'kvship_transfers_total{{{A}, direction="out", outcome="failed"}}', "0+1x40"),
            series(
                f'kvship_transfers_total{{{B}, direction="out", outcome="complete"}}', "0+99x40"
            ),
            series(f'kvship_transfers_total{{{B}, direction="out", outcome="failed"}}', "0+1x40"),
            series(
                'kvship_transfers_total{instance="c:7472", direction="in", outcome="complete"}',
                "0+0.5x40",
            ),
            series(
                'kvship_transfers_total{instance="c:7472", direction="in", outcome="failed"}',
                "0+0.5x40",
            ),
        ],
        "alert_rule_test": [
            fires("KvshipTransferErrors", "3m"),
            fires("KvshipTransferErrors", "20m", LA),
        ],
    },
    {
        "input_series": [
            # a: 2 out transfers, no byte sent since minute 5; b: 2 out, sending;
            # c: 1 in transfer, nothing received since minute 5
            series(f'kvship_transfers_in_flight{{{A}, direction="out"}}', "2x30"),
            series(f'kvship_payload_sent_bytes_total{{{A}, peer="p:7470"}}', "0+1000x5 5000x25"),
            series(f"kvship_payload_received_bytes_total{{{A}}}", "0x30"),
            series(f'kvship_transfers_in_flight{{{B}, direction="out"}}', "2x30"),
            series(f'kvship_payload_sent_bytes_total{{{B}, peer="p:7470"}}', "0+1000x30"),
            series(f"kvship_payload_received_bytes_total{{{B}}}", "0x30"),
            series('kvship_transfers_in_flight{instance="c:7472", direction="in"}', "1x30"),
            series('kvship_payload_received_bytes_total{instance="c:7472"}', "0+1000x5 5000x25"),
        ],
        "alert_rule_test": [
            fires("KvshipTransfersStalled", "6m"),
            fires(
                "KvshipTransfersStalled",
                "15m",
                {**LA, "direction": "out"},
                {"instance": "c:7472", "direction": "in"},
            ),
        ],
    },
    {
        "input_series": [
            # a: 2 evictions a second against 2 look-ups (all misses); b: the same ratio
            # at 0.5 a second (under the minimum); c: 2 evictions against 10 look-ups
            series(f"kvship_store_evictions_total{{{A}}}", "0+120x60"),
            series(f"kvship_store_hits_total{{{A}}}", "0x60"),
            series(f"kvship_store_misses_total{{{A}}}", "0+120x60"),
            series(f"kvship_store_evictions_total{{{B}}}", "0+30x60"),
            series(f"kvship_store_hits_total{{{B}}}", "0x60"),
            series(f"kvship_store_misses_total{{{B}}}", "0+30x60"),
            series('kvship_store_evictions_total{instance="c:7472"}', "0+120x60"),
            series('kvship_store_hits_total{instance="c:7472"}', "0+480x60"),
            series('kvship_store_misses_total{instance="c:7472"}', "0+120x60"),
        ],
        "alert_rule_test": [
            fires("KvshipStoreThrashing", "20m"),
            fires("KvshipStoreThrashing", "45m", LA),
        ],
    },
    {
        "input_series": [
            # a: one sample in ten over 0.1 s; b: every sample at or under 0.1 s
            series(f"kvship_event_loop_lag_seconds_count{{{A}}}", "0+600x20"),
            series(f'kvship_event_loop_lag_seconds_bucket{{{A}, le="0.1"}}', "0+540x20"),
            series(f"kvship_event_loop_lag_seconds_count{{{B}}}", "0+600x20"),
            series(f'kvship_event_loop_lag_seconds_bucket{{{B}, le="0.1"}}', "0+600x20"),
        ],
        "alert_rule_test": [
            fires("KvshipLoopLag", "3m"),
            fires("KvshipLoopLag", "12m", LA),
        ],
    },
]


@needs_promtool
def test_promtool_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """Each alert fires for the daemon in trouble, only for it, and not before its
    ``for:``; annotations are left out (their wording is not under test)."""
    doc = yaml().safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml().safe_dump(doc))
    rule_labels = {rule["alert"]: rule.get("labels", {}) for rule in load_rules()}
    tests = copy.deepcopy([{"interval": "1m", **case} for case in RULE_TESTS])
    for case in tests:
        for check in case["alert_rule_test"]:
            for alert in check["exp_alerts"]:
                alert["exp_labels"].update(rule_labels[check["alertname"]])
    tested = {t["alertname"] for case in RULE_TESTS for t in case["alert_rule_test"]}
    assert tested == set(rule_labels), "an alert has no unit test"
    spec = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "tests.yml").write_text(yaml().safe_dump(spec))
    proc = promtool("test", "rules", "tests.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
