"""``kvship status``: what a daemon is doing, read from its control plane (HTTP)."""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from typing import Any

from .common import CliError, hostport_arg, human_bytes, print_json

DEFAULT_CONTROL = "127.0.0.1:7472"  # kvshipd's default control_listen


def add_status_parser(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="show a daemon's health, transfers and peer links",
        description="Read /healthz, /v1/transfers and /v1/links from a kvshipd control plane.",
    )
    p.add_argument(
        "--control",
        type=hostport_arg,
        default=os.environ.get("KVSHIP_CONTROL", DEFAULT_CONTROL),
        metavar="HOST:PORT",
        help=f"control plane address (default: $KVSHIP_CONTROL, else {DEFAULT_CONTROL})",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="per request (s, default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object: health, transfers, links")
    p.set_defaults(func=cmd_status)


def get_json(control: str, path: str, timeout: float) -> Any:
    """GET one control-plane document; a draining daemon answers 503 with a body we keep."""
    url = f"http://{control}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
        if exc.code != 503 or not body:
            raise CliError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"cannot reach kvshipd control plane at {control}: {reason}") from exc
    try:
        return json.loads(body)
    except ValueError as exc:
        raise CliError(f"{url}: not a kvshipd control plane (no JSON)") from exc


def cmd_status(args: argparse.Namespace) -> int:
    health = get_json(args.control, "/healthz", args.timeout)
    transfers = get_json(args.control, "/v1/transfers", args.timeout).get("transfers", [])
    links = get_json(args.control, "/v1/links", args.timeout).get("links", [])
    if args.json:
        print_json({"health": health, "transfers": transfers, "links": links})
        return 0
    print(
        f"{health.get('node', '?')} at {args.control}: {health.get('status', '?')}, "
        f"version {health.get('version', '?')}, up {health.get('uptime_s', 0):.0f} s"
    )
    for kind, address in sorted(health.get("addresses", {}).items()):
        print(f"  {kind:<14} {address}")
    print()
    print(transfer_table(transfers))
    print()
    print(link_table(links))
    return 0


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
            lk["peer"],
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
    return f"peer links ({len(rows)}):\n" + table(header, rows)
