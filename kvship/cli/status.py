"""``kvship status``: what a daemon is doing, read from its control plane (HTTP)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from .common import EXIT_USAGE, CliError, hostport_arg, human_bytes, print_json

DEFAULT_CONTROL = "127.0.0.1:7472"  # kvshipd's default control_listen
DEFAULT_INTERVAL = 2.0  # seconds between --watch refreshes
CLEAR = "\x1b[H\x1b[2J"  # cursor home, erase the screen
# The block stores' figures on /metrics (there is no JSON document of them).
STORE_SAMPLE = re.compile(r"^kvship_store_([a-z_]+?)(?:_total)? ([0-9.eE+-]+|NaN|[+-]Inf)$", re.M)


def add_status_parser(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="show a daemon's health, transfers, peer links and store (--watch: live)",
        description="Read /healthz, /v1/transfers, /v1/links and the store figures of /metrics "
        "from a kvshipd control plane; --watch redraws them live.",
    )
    p.add_argument(
        "--control",
        type=hostport_arg,
        default=os.environ.get("KVSHIP_CONTROL", DEFAULT_CONTROL),
        metavar="HOST:PORT",
        help=f"control plane address (default: $KVSHIP_CONTROL, else {DEFAULT_CONTROL})",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="per request (s, default 5)")
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object: health, transfers, links, store (--watch: one per line)",
    )
    p.add_argument(
        "--watch",
        action="store_true",
        help="redraw every --interval seconds until Ctrl-C (or --count refreshes)",
    )
    p.add_argument(
        "--interval",
        type=_positive_float,
        default=None,
        metavar="S",
        help=f"with --watch: seconds between refreshes (default {DEFAULT_INTERVAL:g})",
    )
    p.add_argument(
        "--count",
        type=_positive_int,
        default=None,
        metavar="N",
        help="with --watch: stop after N refreshes (default: until Ctrl-C)",
    )
    p.set_defaults(func=cmd_status)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def fetch(control: str, path: str, timeout: float) -> bytes:
    """GET one control-plane resource; a draining daemon answers 503 with a body we keep."""
    url = f"http://{control}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body: bytes = resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
        if exc.code != 503 or not body:
            raise CliError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"cannot reach kvshipd control plane at {control}: {reason}") from exc
    return body


def get_json(control: str, path: str, timeout: float) -> Any:
    """GET one control-plane JSON document."""
    body = fetch(control, path, timeout)
    try:
        return json.loads(body)
    except ValueError as exc:
        raise CliError(f"http://{control}{path}: not a kvshipd control plane (no JSON)") from exc


def store_figures(metrics_text: str) -> dict[str, float]:
    """``kvship_store_*`` samples of a /metrics page, by short name (``hits``, ``bytes``,
    ``capacity_bytes`` ...): the block stores' figures."""
    return {name: float(value) for name, value in STORE_SAMPLE.findall(metrics_text)}


def snapshot(control: str, timeout: float) -> dict[str, Any]:
    """Everything ``kvship status`` shows, read once from the control plane."""
    health = get_json(control, "/healthz", timeout)
    transfers = get_json(control, "/v1/transfers", timeout).get("transfers", [])
    links = get_json(control, "/v1/links", timeout).get("links", [])
    metrics = fetch(control, "/metrics", timeout).decode(errors="replace")
    return {
        "health": health,
        "transfers": transfers,
        "links": links,
        "store": store_figures(metrics),
    }


def render(control: str, status: dict[str, Any]) -> str:
    """The human-readable status: the daemon, its transfers, its links and its store."""
    health = status["health"]
    lines = [
        f"{health.get('node', '?')} at {control}: {health.get('status', '?')}, "
        f"version {health.get('version', '?')}, up {health.get('uptime_s', 0):.0f} s"
    ]
    lines += [f"  {k:<14} {a}" for k, a in sorted(health.get("addresses", {}).items())]
    lines += ["", transfer_table(status["transfers"]), "", link_table(status["links"])]
    lines += ["", store_table(status.get("store", {}))]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    if not args.watch and (args.interval is not None or args.count is not None):
        raise CliError("--interval and --count go with --watch", EXIT_USAGE)
    if args.watch:
        return watch(args)
    status = snapshot(args.control, args.timeout)
    if args.json:
        print_json(status)
    else:
        print(render(args.control, status))
    return 0


def watch(args: argparse.Namespace) -> int:
    """Refresh every ``--interval`` seconds until Ctrl-C or ``--count`` refreshes.

    On a terminal each refresh redraws the screen; otherwise (a pipe, a file) refreshes
    follow each other, a blank line apart, and with ``--json`` one object a line. A refresh
    that cannot reach the daemon shows the error and the watch goes on (a restarting daemon
    comes back); the exit code is 1 if the last refresh failed."""
    interval = DEFAULT_INTERVAL if args.interval is None else args.interval
    tty = sys.stdout.isatty()
    refreshes = 0
    failed = False
    next_at = time.monotonic()
    try:
        while args.count is None or refreshes < args.count:
            if refreshes:
                time.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at + interval, time.monotonic())
            try:
                status: dict[str, Any] = snapshot(args.control, args.timeout)
                failed = False
            except CliError as exc:
                status, failed = {"error": str(exc)}, True
            status = {"time": round(time.time(), 3), **status}
            refreshes += 1
            if args.json:
                print(json.dumps(status), flush=True)
                continue
            stamp = time.strftime("%H:%M:%S", time.localtime(status["time"]))
            head = f"every {interval:g} s, {stamp}" + (" (Ctrl-C to stop)" if tty else "")
            body = f"error: {status['error']}" if failed else render(args.control, status)
            frame = f"{head}\n{body}"
            if tty:
                print(CLEAR + frame, flush=True)
            else:
                print(("\n" if refreshes > 1 else "") + frame, flush=True)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends
    return 1 if failed else 0


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def transfer_table(transfers: list[dict[str, Any]]) -> str:
    if not transfers:
        return "transfers: none"
    rows = [
        [
            t["transfer_id"],
            t["request_id"],
            t["direction"],
            t["state"],
            f"{human_bytes(t['bytes_done'])} / {human_bytes(t['total_bytes'])}",
            f"{t['goodput_GBps']:.3f}",
            t.get("error") or "",
        ]
        for t in transfers
    ]
    header = ["id", "request", "dir", "state", "bytes done/total", "GB/s", "error"]
    return f"transfers ({len(rows)}):\n" + table(header, rows)


def link_table(links: list[dict[str, Any]]) -> str:
    """One row per peer link: its cap, what it achieves, compression, queue and RTT."""
    if not links:
        return "peer links: none"
    header = ["peer", "conns", "xfers", "cap", "wire/s", "payload/s", "ratio", "queued", "rtt"]
    rows = [
        [
            lk["peer"] if lk.get("connected", True) else f"{lk['peer']} (down: {lk.get('why')})",
            str(lk["connections"]),
            str(lk["transfers"]),
            str(lk.get("rate_limit", "?")),
            human_bytes(lk.get("wire_Bps", 0)),
            human_bytes(lk.get("payload_Bps", 0)),
            f"{lk.get('compression_ratio', 1.0):.2f}",
            human_bytes(lk.get("queued_bytes", 0)),
            "-" if lk.get("rtt_s") is None else f"{lk['rtt_s'] * 1000:.2f} ms",
        ]
        for lk in links
    ]
    advice = sorted({line for lk in links for line in lk.get("kernel_advice") or ()})
    notes = "".join(f"\n  note: {line}" for line in advice)
    return f"peer links ({len(rows)}):\n" + table(header, rows) + notes


def store_table(store: dict[str, float]) -> str:
    """The prefix-dedup block stores: what they hold against their bound, and how look-ups
    went since the daemon started."""
    if not store:
        return "store: no figures (the daemon exports no kvship_store_* metrics)"
    held, capacity = store.get("bytes", 0.0), store.get("capacity_bytes", 0.0)
    hits, misses = store.get("hits", 0.0), store.get("misses", 0.0)
    header = ["held", "capacity", "used", "pinned", "blocks", "states", "models"]
    header += ["hits", "misses", "hit ratio", "evictions", "refused"]
    row = [
        human_bytes(held),
        human_bytes(capacity),
        f"{100 * held / capacity:.1f} %" if capacity else "-",
        human_bytes(store.get("pinned_bytes", 0.0)),
        f"{store.get('blocks', 0):.0f}",
        f"{store.get('states', 0):.0f}",
        f"{store.get('models', 0):.0f}",
        f"{hits:.0f}",
        f"{misses:.0f}",
        f"{100 * hits / (hits + misses):.1f} %" if hits + misses else "-",
        f"{store.get('evictions', 0):.0f}",
        f"{store.get('refused', 0):.0f}",
    ]
    return "store:\n" + table(header, [row])
