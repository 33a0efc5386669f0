"""Re-tuning the offload threshold t from recent lengths (an empirical planner).

The planner (`kvship.plan.model`) integrates a fitted log-normal; the router instead sees
the lengths that actually arrived. This module evaluates the same Θ/Λ formulas on the
empirical distribution of a bounded window of recent incremental lengths, at the link
capacity measured *now*, and returns the best t. It is vectorised numpy over the sorted
window (O(n log n), ~0.1-0.3 ms for 2 048 lengths), so the router runs it every K requests
or when the capacity moves, never per decision.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kvship.plan.distribution import PlanError
from kvship.plan.model import MIB, Curve, Profile


@dataclass(frozen=True)
class Tuned:
    """Result of one re-tune: the threshold and what the model expects from it."""

    t_tokens: float
    lambda_max: float
    offload_fraction: float
    link_Bps: float
    samples: int


class EmpiricalPlanner:
    """Λ_max(t) over an empirical length sample for one deployment at a fixed local split.

    The split N_p / N_d is a deployment decision (instances are not re-purposed per request),
    so only t is searched; ties go to the higher t (fewer bytes on the link).
    """

    def __init__(self, profile: Profile, deployment: str, n_prefill_local: int) -> None:
        dep = profile.deployment(deployment)
        if dep.remote is None or dep.remote_instances < 1:
            raise PlanError(f"deployment: {deployment!r} has no remote prefill cluster")
        if not 1 <= n_prefill_local < dep.local_instances:
            raise PlanError(
                f"n_prefill_local: {n_prefill_local} out of range 1..{dep.local_instances - 1}"
            )
        remote, local = profile.hardware[dep.remote], profile.hardware[dep.local]
        assert remote.kv_mib is not None and local.decode_batch is not None
        wl = profile.workload
        self.remote_prefill = remote.prefill_s
        self.remote_kv = remote.kv_mib
        self.local_prefill = local.prefill_s
        self.n_remote = dep.remote_instances
        self.n_local = n_prefill_local
        n_d = dep.local_instances - n_prefill_local
        self.theta_decode = n_d * local.decode_batch / (wl.t_decode_s * wl.output_tokens)

    def best(self, lengths: Sequence[float] | np.ndarray, link_Bps: float) -> Tuned:
        """The t maximising Λ on these lengths at this link rate (bytes/s)."""
        x = np.sort(np.asarray(lengths, dtype=float))
        n = len(x)
        if n < 2:
            raise PlanError(f"lengths: need at least 2 samples to re-tune, got {n}")
        cs = np.cumsum(x)
        k = np.arange(1, n + 1)  # k lengths local (x[:k]), n - k remote
        p = (n - k) / n
        l_short = cs / k
        with np.errstate(divide="ignore", invalid="ignore"):
            l_long = np.where(k < n, (cs[-1] - cs) / np.maximum(n - k, 1), np.nan)
        ll = np.where(np.isnan(l_long), x[-1], l_long)
        th_c = self.n_remote / self.remote_prefill(ll)
        th_l = max(link_Bps, 0.0) / (self.remote_kv(ll) * MIB)
        th_r = np.minimum(th_c, th_l)
        th_p = self.n_local / self.local_prefill(l_short)
        with np.errstate(divide="ignore", invalid="ignore"):
            cap_r = np.where(p > 0, th_r / p, np.inf)
            cap_p = np.where(p < 1, th_p / (1 - p), np.inf)
        lam = np.minimum(np.minimum(cap_r, cap_p), self.theta_decode)
        top = np.flatnonzero(lam >= lam.max() * (1 - 1e-9))
        i = int(top[-1])
        # t between the last local length and the first remote one (geometric midpoint)
        t = x[i] if i == n - 1 else math.sqrt(x[i] * x[i + 1])
        return Tuned(float(t), float(lam[i]), float(p[i]), float(link_Bps), n)


def fast_curve(curve: Curve) -> Callable[[float], float]:
    """A pure-Python scalar version of a profiled curve (same interpolation and end-segment
    extension) — ~1 µs a call instead of numpy's ~10 µs, for the per-request hot path."""
    loglog = curve.interpolation == "loglog"
    xs = [math.log(t) if loglog else t for t in curve.tokens]
    ys = [math.log(v) if loglog else v for v in curve.values]
    last = len(xs) - 2

    def f(tokens: float) -> float:
        q = math.log(max(tokens, 1e-300)) if loglog else tokens
        i = min(max(bisect.bisect_right(xs, q) - 1, 0), last)
        y = ys[i] + (q - xs[i]) * (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
        return math.exp(y) if loglog else y

    return f
