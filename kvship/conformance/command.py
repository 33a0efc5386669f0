"""``kvship conformance``: run the SPEC's rules against an implementation listening somewhere."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from .checks import CHECKS, FINAL, Target
from .link import is_unix
from .report import run

EXIT_FAILED = 1  # some check failed
EXIT_USAGE = 2


def _hostport(text: str) -> str:
    if is_unix(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port or [v6]:port")
    return text


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def add_conformance_parser(sub: Any) -> None:
    p = sub.add_parser(
        "conformance",
        help="check an implementation against protocol/SPEC.md (pass/fail table, --json)",
        description="Run the wire protocol's rules (protocol/SPEC.md) against any kvship "
        "implementation: its peer listener (the kit sends as a daemon), its engine listeners "
        "(the kit acts as an engine), and, given both addresses of one daemon, full round "
        "trips. Every check opens its own connections and is bounded by --timeout. Exit 0 "
        "only if no check failed. Hostile by design: point it at test daemons.",
    )
    p.add_argument("--peer", type=_hostport, metavar="HOST:PORT", help="the target's peer listener")
    p.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="ADDR",
        help="an engine listener: host:port (TCP) or a Unix socket path (adds the "
        "shared-memory checks); repeat for several",
    )
    p.add_argument(
        "--unreachable",
        type=_hostport,
        default="127.0.0.1:1",
        metavar="HOST:PORT",
        help="a destination nothing answers on, for the PEER_UNREACHABLE check "
        "(default 127.0.0.1:1)",
    )
    p.add_argument(
        "--timeout", type=_positive, default=5.0, metavar="S", help="per check (default 5 s)"
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="GLOB",
        help="run only the checks whose name matches (e.g. 'handshake.*'); repeatable",
    )
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_conformance)


def cmd_conformance(args: argparse.Namespace) -> int:
    if args.list:
        for c in (*CHECKS, *FINAL):
            print(f"{c.name:<40} {c.section:<18} {c.doc.splitlines()[0] if c.doc else ''}")
        return 0
    if not args.peer and not args.engine:
        print("kvship: error: give --peer and/or --engine", file=sys.stderr)
        return EXIT_USAGE
    target = Target(
        peer=args.peer,
        engines=tuple(args.engine),
        unreachable=args.unreachable,
        timeout=args.timeout,
    )
    report = asyncio.run(run(target, args.only))
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(report.table())
    return 0 if report.ok else EXIT_FAILED
