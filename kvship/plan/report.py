"""Presenting plans and simulation checks: a text table, a JSON-ready dict, a PNG plot.

matplotlib is optional (the ``plot`` extra) and imported only inside :func:`plot_plan`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvship.plan.distribution import PlanError
from kvship.plan.model import OperatingPoint, Plan, local_splits, optimize, sweep
from kvship.plan.simulate import DeploymentCheck

_POINT_KEYS = (
    "t_tokens",
    "offload_fraction",
    "lambda_max",
    "egress_gbps",
    "n_prefill_remote",
    "n_prefill_local",
    "n_decode",
    "theta_prfaas",
    "theta_pd_p",
    "theta_pd_d",
    "bottleneck",
)


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The JSON object of ``kvship plan --json``: the main deployment's figures at top level,
    the baselines under ``baselines``, the profile's published table under ``published``."""
    out: dict[str, Any] = {"profile": plan.profile.name, "source": plan.profile.source}
    out.update(plan.main.to_dict())
    out["baselines"] = {name: p.to_dict() for name, p in plan.baselines.items()}
    out["gain_vs"] = {
        name: plan.main.lambda_max / p.lambda_max
        for name, p in plan.baselines.items()
        if p.lambda_max > 0
    }
    out["published"] = dict(plan.profile.published)
    out["units"] = {
        "lambda_max": "req/s",
        "theta_*": "req/s",
        "t_tokens": "tokens (incremental length)",
        "egress_gbps": "Gbit/s (1e9 bit/s; KV sizes in MiB = 2^20 bytes)",
    }
    return _clean(out)


def plan_table(plan: Plan) -> str:
    """Aligned text table: one column per deployment, published figures in brackets."""
    points = {plan.main.deployment: plan.main, **plan.baselines}
    pub: Mapping[str, Mapping[str, Any]] = plan.profile.published
    rows = [
        ("threshold t (tokens)", "t_tokens", "{:,.0f}"),
        ("offloaded fraction p", "offload_fraction", "{:.3f}"),
        ("remote prefill N_prfaas", "n_prefill_remote", "{}"),
        ("local prefill N_p", "n_prefill_local", "{}"),
        ("local decode N_d", "n_decode", "{}"),
        ("l_long (tokens)", "l_long_tokens", "{:,.0f}"),
        ("l_short (tokens)", "l_short_tokens", "{:,.0f}"),
        ("Θ_prfaas (req/s)", "theta_prfaas", "{:.2f}"),
        ("Θ_pd-p (req/s)", "theta_pd_p", "{:.2f}"),
        ("Θ_pd-d (req/s)", "theta_pd_d", "{:.2f}"),
        ("Λ_max (req/s)", "lambda_max", "{:.2f}"),
        ("bottleneck", "bottleneck", "{}"),
        ("mean egress (Gbit/s)", "egress_gbps", "{:.1f}"),
        ("link utilization", "link_utilization", "{:.1%}"),
    ]
    header = ["", *points]
    body = []
    for label, key, fmt in rows:
        line = [label]
        for name, p in points.items():
            line.append(_cell(getattr(p, key), pub.get(name, {}).get(key), fmt))
        body.append(line)
    title = f"kvship plan — profile {plan.profile.name} (published figures in [brackets])"
    gains = ", ".join(
        f"{plan.main.lambda_max / p.lambda_max:.2f}x vs {n}"
        for n, p in plan.baselines.items()
        if p.lambda_max > 0
    )
    return "\n".join([title, _grid([header, *body]), f"Λ_max gain: {gains}" if gains else ""])


def checks_to_dict(
    profile_name: str,
    checks: Sequence[DeploymentCheck],
    *,
    seed: int,
    requests: int,
    published: Mapping[str, Any],
) -> dict[str, Any]:
    """The JSON object of ``kvship simulate --json``."""
    deps: dict[str, Any] = {}
    rate = None
    for c in checks:
        rate = c.reference.arrival_rate
        deps[c.deployment] = {
            "planner_lambda_max": c.planner.lambda_max,
            "throughput_rps": c.capacity.throughput_rps,
            "throughput_vs_planner": c.throughput_vs_planner,
            "ttft_mean_s": c.reference.ttft_mean_s,
            "ttft_p90_s": c.reference.ttft_p90_s,
            "egress_mean_gbps": c.capacity.egress_mean_gbps,
            "egress_peak_gbps": c.capacity.egress_peak_gbps,
            "t_tokens": c.planner.t_tokens,
            "n_prefill_remote": c.planner.n_prefill_remote,
            "n_prefill_local": c.planner.n_prefill_local,
            "n_decode": c.planner.n_decode,
            "capacity_run": c.capacity.to_dict(),
            "reference_run": c.reference.to_dict(),
        }
    return _clean(
        {
            "profile": profile_name,
            "seed": seed,
            "requests": requests,
            "reference_rate": rate,
            "deployments": deps,
            "published": dict(published),
            "notes": {
                "throughput_rps": "saturated closed loop, every request decoding at the SLO",
                "ttft_*": "open-loop Poisson run at reference_rate (req/s)",
                "egress_*": "capacity run; peak over 1-s windows",
            },
        }
    )


def checks_table(
    profile_name: str, checks: Sequence[DeploymentCheck], published: Mapping[str, Mapping[str, Any]]
) -> str:
    """Aligned text table of simulated vs planned figures."""
    if not checks:
        return ""
    header = ["", *(c.deployment for c in checks)]
    rate = checks[0].reference.arrival_rate

    def row(label: str, fn: Any, key: str | None = None, fmt: str = "{:.2f}") -> list[str]:
        return [
            label,
            *(
                _cell(fn(c), published.get(c.deployment, {}).get(key) if key else None, fmt)
                for c in checks
            ),
        ]

    rows = [
        row("planner Λ_max (req/s)", lambda c: c.planner.lambda_max, "lambda_max"),
        row("simulated throughput (req/s)", lambda c: c.capacity.throughput_rps),
        row("sim vs planner", lambda c: c.throughput_vs_planner, fmt="{:+.1%}"),
        row("offloaded fraction", lambda c: c.capacity.offload_fraction, fmt="{:.3f}"),
        row("egress mean (Gbit/s)", lambda c: c.capacity.egress_mean_gbps, fmt="{:.1f}"),
        row("egress peak 1 s (Gbit/s)", lambda c: c.capacity.egress_peak_gbps, fmt="{:.1f}"),
        row("TTFT mean (s)", lambda c: c.reference.ttft_mean_s, "ttft_mean_s"),
        row("TTFT P90 (s)", lambda c: c.reference.ttft_p90_s, "ttft_p90_s"),
        row("egress mean at ref. rate", lambda c: c.reference.egress_mean_gbps, fmt="{:.1f}"),
    ]
    where = f"{rate:.3f} req/s" if rate is not None else "the given trace"
    title = (
        f"kvship simulate — profile {profile_name}; throughput = saturated closed loop, "
        f"TTFT at {where}; published in [brackets]"
    )
    return "\n".join([title, _grid([header, *rows])])


def plot_plan(plan: Plan, path: str | Path) -> Path:
    """PNG: Θ curves over t at the chosen split, and Λ_max over the N_p/N_d splits."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlanError(
            "plot: matplotlib is not installed (pip install 'kvship[plot]' or matplotlib)"
        ) from exc
    profile, main = plan.profile, plan.main
    dep = profile.deployment(main.deployment)
    lengths = profile.workload.lengths
    ts = np.geomspace(max(lengths.min_incremental, 256.0), lengths.max_tokens, 400)
    s = sweep(profile, dep, ts, main.n_prefill_local)
    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ts, s["cap_remote"], label="Θ_prfaas / p")
    ax1.plot(ts, s["cap_local"], label="Θ_pd-p / (1 − p)")
    ax1.plot(ts, s["theta_pd_d"], label="Θ_pd-d")
    ax1.plot(ts, np.where(s["p"] > 1e-9, s["theta_prfaas"], np.nan), ":", label="Θ_prfaas")
    ax1.plot(ts, np.where(s["p"] < 1 - 1e-9, s["theta_pd_p"], np.nan), ":", label="Θ_pd-p")
    ax1.plot(ts, s["lambda"], "k", lw=2.5, alpha=0.5, label="Λ")
    ax1.axvline(main.t_tokens, color="grey", ls="--", lw=1)
    ax1.set_xscale("log")
    top = max(main.lambda_max, main.theta_pd_d) * 1.6
    ax1.set_ylim(0, top)
    ax1.set_xlabel("threshold t (incremental tokens)")
    ax1.set_ylabel("req/s")
    ax1.set_title(
        f"{dep.name}: N_p/N_d = {main.n_prefill_local}/{main.n_decode}, t* = {main.t_tokens:,.0f}"
    )
    ax1.legend(fontsize=8)
    splits = local_splits(dep)
    lam, dec, pre = [], [], []
    for n_p in splits:
        best = _best_for_split(plan, n_p)
        lam.append(best.lambda_max)
        dec.append(best.theta_pd_d)
        pre.append(
            min(
                _cap(best.theta_prfaas, best.offload_fraction),
                _cap(best.theta_pd_p, 1 - best.offload_fraction),
            )
        )
    x = np.arange(len(splits))
    ax2.bar(x, lam, color="tab:grey", alpha=0.6, label="Λ_max (best t)")
    ax2.plot(x, dec, "o-", label="Θ_pd-d")
    ax2.plot(x, pre, "s-", label="prefill-side capacity at best t")
    for k, (name, p) in enumerate(plan.baselines.items()):
        ax2.axhline(p.lambda_max, ls="--", lw=1, color=f"C{k + 3}", label=f"{name} Λ_max")
    ax2.set_xticks(x, [f"{n}/{dep.local_instances - n}" for n in splits])
    ax2.set_ylim(0, max(max(lam), *(min(v, top) for v in dec)) * 1.3)
    ax2.set_xlabel("N_p / N_d (local prefill / decode instances)")
    ax2.set_ylabel("req/s")
    ax2.set_title("Λ_max over the local split")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    try:
        fig.savefig(out, format="png", dpi=110)
    except OSError as exc:
        raise PlanError(f"plot: cannot write {str(out)!r}: {exc.strerror}") from exc
    return out


def _best_for_split(plan: Plan, n_p: int) -> OperatingPoint:
    from dataclasses import replace

    profile = plan.profile
    dep = replace(profile.deployment(plan.main.deployment), n_prefill_local=n_p)
    prof = replace(profile, deployments={**profile.deployments, dep.name: dep})
    return optimize(prof, dep.name)


def _cap(theta: float | None, share: float) -> float:
    if share <= 0:
        return math.inf
    return (theta or 0.0) / share


def _cell(value: Any, published: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = "—"
    elif isinstance(value, float) and math.isinf(value):
        text = "∞"
    else:
        text = fmt.format(value)
    if published is not None:
        pub = fmt.format(published) if isinstance(published, int | float) else str(published)
        text += f" [{pub}]"
    return text


def _grid(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> null, numpy scalars -> Python numbers."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
