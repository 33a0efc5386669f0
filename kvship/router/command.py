"""``kvship route`` and ``kvship simulate --scenario``: argparse wiring for the main CLI.

The main CLI calls :func:`add_route_parser` on its subparsers, and runs
:func:`run_scenario` for ``simulate --scenario``; each returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from typing import Any

from kvship.plan.distribution import PlanError
from kvship.router.policy import LinkView, RemoteView, RouteError, RouteRequest
from kvship.router.scenario import planned_router, run_link_drop

DEFAULT_PROFILE = "prfaas-case-study"


def add_route_parser(subparsers: Any) -> None:
    """Register ``route``: one routing decision and its reason."""
    p = subparsers.add_parser(
        "route",
        help="decide local or remote prefill for one request (PrfaaS router)",
        description="Route one request by the PrfaaS policy: threshold t from the profile's "
        "plan, link figures from a file or a daemon's GET /v1/links.",
    )
    p.add_argument("--prompt-tokens", type=int, required=True, metavar="N")
    p.add_argument("--local-cached", type=int, default=0, metavar="N")
    p.add_argument("--remote-cached", type=int, default=0, metavar="N")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--links-json", metavar="FILE", help="link figures (age = file mtime)")
    src.add_argument("--control", metavar="HOST:PORT", help="daemon control plane to read")
    p.add_argument("--remote-queue", type=int, default=0, metavar="N", help="remote queue depth")
    p.add_argument("--profile", default=DEFAULT_PROFILE, metavar="NAME_OR_PATH")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_route)


def _read_links(args: argparse.Namespace) -> LinkView:
    try:
        if args.links_json:
            with open(args.links_json, encoding="utf-8") as f:
                d = json.load(f)
            return LinkView.from_figures(d, fetched_at=os.stat(args.links_json).st_mtime)
        if args.control:
            url = f"http://{args.control}/v1/links"
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                d = json.load(resp)
            return LinkView.from_figures(d, fetched_at=time.time())
    except (OSError, ValueError) as exc:
        return LinkView.unreachable(f"cannot read link figures: {exc}")
    return LinkView.unreachable("no link figures given (--links-json or --control)")


def run_route(args: argparse.Namespace) -> int:
    try:
        req = RouteRequest(args.prompt_tokens, args.local_cached, args.remote_cached)
        router = planned_router(args.profile)
        decision = router.decide(req, _read_links(args), RemoteView(args.remote_queue))
    except (RouteError, PlanError) as exc:
        print(f"kvship route: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(decision.to_dict()))
    else:
        print(f"{decision.target}: {decision.reason}")
    return 0


def run_scenario(args: argparse.Namespace) -> int:
    try:
        out = run_link_drop(
            args.profile, seed=args.seed, requests=args.requests, after_gbps=args.after_gbps
        )
    except PlanError as exc:
        print(f"kvship simulate: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    lo, hi = out["link_gbps"]
    print(
        f"link-drop {lo:g} -> {hi:g} Gbit/s at t={out['drop_at_s']:.0f} s "
        f"({out['profile']}, seed {out['seed']}, {out['requests']} requests)"
    )
    print(f"{'policy':<20} {'t':>8} {'N_p':>4} {'post-drop req/s':>16} {'vs optimum':>11}")
    ref = out["runs"]["optimum"]["throughput_rps"]
    for k, r in out["runs"].items():
        t = r.get("final_t_tokens", r["t_tokens"])  # the adaptive run: t at the end
        rps = r["throughput_rps"]
        print(f"{k:<20} {t:>8.0f} {r['n_prefill_local']:>4} {rps:>16.3f} {rps / ref:>10.1%}")
    return 0
