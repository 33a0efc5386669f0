"""``link-drop``: the link falls from 100 to 8 Gbit/s mid-run; fixed t vs the adaptive router.

One seeded capacity run (saturated closed loop) of the profile's main deployment per
policy, all with the same link schedule and the same requests:

* ``fixed``    - the planner's t for the original link, never changed;
* ``adaptive`` - :class:`~kvship.router.policy.Router` as the simulator's policy, fed link
  figures built from the simulator state (capacity, busy fraction, backlog);
* ``optimum``  - the planner re-run for the reduced link (t *and* the local split N_p/N_d);
* ``optimum_same_split`` - the planner for the reduced link with the split kept (the router
  controls t only; re-splitting instances is a deployment change).

Throughput is measured after the drop, once the whole closed-loop population present at
the drop has turned over, until the loop stops refilling.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from kvship.plan.distribution import PlanError
from kvship.plan.model import MIB, Profile, load_profile, optimize
from kvship.plan.simulate import (
    Policy,
    SimRequest,
    SimState,
    StepSchedule,
    simulate,
    threshold_policy,
)
from kvship.router.policy import LinkView, RemoteView, Router, RouteRequest
from kvship.router.retune import EmpiricalPlanner, fast_curve

SCENARIOS = ("link-drop",)


class SimRouterPolicy:
    """Adapts a :class:`Router` to the simulator's ``policy(request, state)``: builds the
    figures a daemon would serve (rate limit, wire rate, queue wait) from the sim state.
    Utilisation is an exponentially weighted busy fraction of the link (time constant
    ``tau_s``), as a daemon's measured wire rate would be."""

    def __init__(self, router: Router, tau_s: float = 5.0) -> None:
        self.router = router
        self.tau_s = tau_s
        self._busy = 0.0
        self._last = 0.0
        self.thresholds: list[tuple[float, float]] = []  # (time, t) at each change

    def __call__(self, req: SimRequest, state: SimState) -> str:
        now = state.now
        cap = state.link_gbps * 1e9 / 8
        backlog = state.link_backlog_s
        a = math.exp(-(now - self._last) / self.tau_s)
        self._busy = a * self._busy + (1 - a) * (1.0 if backlog > 0 else 0.0)
        self._last = now
        figures = {
            "at": now,
            "rate_limit_Bps": cap,
            "wire_Bps": self._busy * cap,
            "queue_wait_s": backlog,
            "connections": 1,
        }
        link = LinkView.from_figures(figures, now)
        request = RouteRequest(req.prompt_tokens, req.cached_tokens, req.cached_tokens)
        d = self.router.decide(request, link, RemoteView(state.remote_queue))
        if not self.thresholds or self.thresholds[-1][1] != d.threshold_tokens:
            self.thresholds.append((now, d.threshold_tokens))
        return d.target


def router_for(profile: Profile, deployment: str, t_tokens: float, n_prefill_local: int) -> Router:
    """A Router set up from a profile: KV size from the remote curve, re-tuned at this split."""
    dep = profile.deployment(deployment)
    assert dep.remote is not None
    kv_curve = profile.hardware[dep.remote].kv_mib
    assert kv_curve is not None
    kv_mib = fast_curve(kv_curve)
    return Router(
        t_tokens,
        egress_cap_Bps=dep.link_gbps * 1e9 / 8,
        kv_bytes=lambda tokens: kv_mib(tokens) * MIB,
        tuner=EmpiricalPlanner(profile, deployment, n_prefill_local),
    )


def planned_router(profile: Profile | str = "prfaas-case-study") -> Router:
    """The router a deployment starts with: t and the split from the planner's optimum."""
    prof = load_profile(profile) if isinstance(profile, str) else profile
    point = optimize(prof, prof.main)
    return router_for(prof, prof.main, point.t_tokens, point.n_prefill_local)


def _with_link(profile: Profile, name: str, gbps: float, n_p: int | None = None) -> Profile:
    dep = dataclasses.replace(profile.deployment(name), link_gbps=gbps, n_prefill_local=n_p)
    return dataclasses.replace(profile, deployments={**profile.deployments, name: dep})


def run_link_drop(
    profile: Profile | str = "prfaas-case-study",
    seed: int = 0,
    requests: int = 10000,
    *,
    before_gbps: float | None = None,
    after_gbps: float = 8.0,
    drop_fraction: float = 0.4,
    population: int | None = None,
) -> dict[str, Any]:
    """Run the four policies over one link-drop schedule; JSON-able figures and ratios."""
    prof = load_profile(profile) if isinstance(profile, str) else profile
    name = prof.main
    dep = prof.deployment(name)
    if dep.remote is None or dep.routing != "threshold":
        raise PlanError(f"deployment: {name!r} must route by threshold to a remote cluster")
    if not 1000 <= requests <= 200_000:
        raise PlanError(f"requests: must be in 1000..200000 for link-drop, got {requests}")
    if not after_gbps > 0:
        raise PlanError(f"after_gbps: must be > 0, got {after_gbps}")
    before = dep.link_gbps if before_gbps is None else before_gbps
    base = optimize(_with_link(prof, name, before), name)
    opt = optimize(_with_link(prof, name, after_gbps), name)
    opt_same = optimize(_with_link(prof, name, after_gbps, base.n_prefill_local), name)
    pop = population or max(1, min(100, requests // 5))
    drop_s = drop_fraction * requests / base.lambda_max
    sched = StepSchedule(((0.0, before), (drop_s, after_gbps)), "link_schedule")
    adaptive = SimRouterPolicy(router_for(prof, name, base.t_tokens, base.n_prefill_local))
    runs: dict[str, tuple[float, int, Policy]] = {
        "fixed": (base.t_tokens, base.n_prefill_local, threshold_policy(base.t_tokens)),
        "adaptive": (base.t_tokens, base.n_prefill_local, adaptive),
        "optimum": (opt.t_tokens, opt.n_prefill_local, threshold_policy(opt.t_tokens)),
        "optimum_same_split": (
            opt_same.t_tokens,
            opt_same.n_prefill_local,
            threshold_policy(opt_same.t_tokens),
        ),
    }
    out: dict[str, Any] = {}
    for key, (t, n_p, policy) in runs.items():
        out[key] = _run(prof, name, seed, requests, pop, sched, drop_s, t, n_p, policy)
    out["adaptive"]["final_t_tokens"] = adaptive.router.threshold_tokens
    out["adaptive"]["retunes_after_drop"] = [
        {"at_s": round(at, 3), "t_tokens": round(t, 1)}
        for at, t in adaptive.thresholds
        if at >= drop_s
    ][:5]
    ref, ref_same = out["optimum"]["throughput_rps"], out["optimum_same_split"]["throughput_rps"]
    ratios = {f"{k}_vs_optimum": out[k]["throughput_rps"] / ref for k in ("fixed", "adaptive")} | {
        f"{k}_vs_optimum_same_split": out[k]["throughput_rps"] / ref_same
        for k in ("fixed", "adaptive")
    }
    return {
        "scenario": "link-drop",
        "profile": prof.name,
        "deployment": name,
        "seed": seed,
        "requests": requests,
        "population": pop,
        "link_gbps": [before, after_gbps],
        "drop_at_s": drop_s,
        "planner": {
            "before": {
                "t_tokens": base.t_tokens,
                "n_prefill_local": base.n_prefill_local,
                "lambda_max": base.lambda_max,
            },
            "after": {
                "t_tokens": opt.t_tokens,
                "n_prefill_local": opt.n_prefill_local,
                "lambda_max": opt.lambda_max,
            },
            "after_same_split": {
                "t_tokens": opt_same.t_tokens,
                "n_prefill_local": opt_same.n_prefill_local,
                "lambda_max": opt_same.lambda_max,
            },
        },
        "runs": out,
        "ratios": ratios,
    }


def _run(
    prof: Profile,
    name: str,
    seed: int,
    n: int,
    pop: int,
    sched: StepSchedule,
    drop_s: float,
    t: float,
    n_p: int,
    policy: Policy,
) -> dict[str, Any]:
    seen: list[SimRequest] = []

    def recording(req: SimRequest, state: SimState) -> str:
        seen.append(req)
        return policy(req, state)

    res = simulate(
        prof,
        name,
        n_requests=n,
        seed=seed,
        t_tokens=t,
        n_prefill_local=n_p,
        policy=recording,
        link_schedule=sched,
        population=pop,
    )
    first = np.sort([r.first_token_s for r in seen if math.isfinite(r.first_token_s)])
    k1 = int(np.searchsorted(first, drop_s)) + pop
    k2 = min(len(first), n - pop) - 1
    if k2 - k1 < 50:
        raise PlanError(f"requests: {n} too few for a post-drop window (need more)")
    after = [r for r in seen if r.arrival_s >= drop_s]
    return {
        "t_tokens": t,
        "n_prefill_local": n_p,
        "throughput_rps": float((k2 - k1) / (first[k2] - first[k1])),
        "window_s": [float(first[k1]), float(first[k2])],
        "offload_fraction_after_drop": sum(r.route == "remote" for r in after) / max(len(after), 1),
        "throughput_whole_run_rps": res.throughput_rps,
    }
