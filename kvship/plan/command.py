"""``kvship plan`` and ``kvship simulate``: argparse wiring for the main CLI.

The main CLI calls :func:`add_plan_parser` / :func:`add_simulate_parser` on its subparsers
and dispatches to ``args.func(args) -> int``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kvship.plan.distribution import PlanError
from kvship.plan.model import load_profile, plan
from kvship.plan.report import checks_table, checks_to_dict, plan_table, plan_to_dict, plot_plan
from kvship.plan.simulate import MAX_REQUESTS, check_deployments

DEFAULT_PROFILE = "prfaas-case-study"
DEPLOYMENT_CHOICES = ("prfaas", "homogeneous", "naive", "all")


def add_plan_parser(subparsers: Any) -> None:
    """Register ``plan``: optimise t and N_p/N_d, report Θ, Λ_max, egress and baselines."""
    p = subparsers.add_parser(
        "plan",
        help="PrfaaS throughput planner (threshold t, node split, Λ_max)",
        description="Choose the offload threshold t and the local prefill/decode split that "
        "maximise sustainable throughput Λ_max; compare with the profile's baselines.",
    )
    p.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        metavar="NAME_OR_PATH",
        help=f"built-in profile name or TOML file (default {DEFAULT_PROFILE})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="PATH.png", help="write the Θ curves as a PNG")
    p.set_defaults(func=run_plan)


def add_simulate_parser(subparsers: Any) -> None:
    """Register ``simulate``: discrete-event check of the planned deployments."""
    p = subparsers.add_parser(
        "simulate",
        help="discrete-event simulation of the planned deployments",
        description="Simulate each deployment at the planner's settings: saturated throughput "
        "(vs the planner's Λ_max), TTFT mean/P90 and egress at a reference load. Seeded.",
    )
    p.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        metavar="NAME_OR_PATH",
        help=f"built-in profile name or TOML file (default {DEFAULT_PROFILE})",
    )
    p.add_argument(
        "--deployment",
        default="all",
        metavar="|".join(DEPLOYMENT_CHOICES),
        help="which deployment of the profile to simulate (default all)",
    )
    p.add_argument(
        "--requests", type=int, default=4000, metavar="N", help="requests per run (default 4000)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="REQ_PER_S",
        help="arrival rate for the TTFT run (default: half the smallest planned "
        "Λ_max of the profile's deployments)",
    )
    p.add_argument(
        "--trace",
        metavar="FILE.jsonl",
        default=None,
        help="replay these requests for the TTFT run instead of Poisson arrivals "
        "(one JSON object per line: prompt_tokens, [cached_tokens, arrival_s, "
        "output_tokens])",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_simulate)


def run_plan(args: argparse.Namespace) -> int:
    try:
        result = plan(load_profile(args.profile))
        plot_path = plot_plan(result, args.plot) if args.plot else None
    except PlanError as exc:
        return _fail("plan", exc)
    if args.json:
        out = plan_to_dict(result)
        if plot_path is not None:
            out["plot"] = str(plot_path)
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        print(plan_table(result))
        if plot_path is not None:
            print(f"plot written to {plot_path}")
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    try:
        profile = load_profile(args.profile)
        if not 1 <= args.requests <= MAX_REQUESTS:
            raise PlanError(f"--requests: must be in 1..{MAX_REQUESTS}, got {args.requests}")
        if args.rate is not None and not args.rate > 0:
            raise PlanError(f"--rate: must be > 0 req/s, got {args.rate}")
        names = list(profile.deployments) if args.deployment == "all" else [args.deployment]
        for name in names:
            profile.deployment(name)
        trace = _read_trace(args.trace) if args.trace else None
        checks = check_deployments(
            profile, names, n_requests=args.requests, seed=args.seed, rate=args.rate, requests=trace
        )
    except PlanError as exc:
        return _fail("simulate", exc)
    if args.json:
        out = checks_to_dict(
            profile.name,
            checks,
            seed=args.seed,
            requests=args.requests,
            published=profile.published,
        )
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        print(checks_table(profile.name, checks, profile.published))
    return 0


def _read_trace(path: str) -> list[Any]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PlanError(f"--trace: cannot read {path!r}: {exc.strerror}") from exc
    out = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise PlanError(f"--trace: line {i} is not JSON: {exc.msg}") from exc
    return out


def _fail(cmd: str, exc: Exception) -> int:
    print(f"kvship {cmd}: error: {exc}", file=sys.stderr)
    return 2
