"""Prompt-length distribution for the planner and the simulator.

The planner needs p = P(l > t) and the conditional means E[l | l > t], E[l | l <= t] of the
*incremental* length l (prompt minus cached prefix) for many thresholds t. We integrate the
truncated log-normal density on a fixed, fine grid in log-length space once (trapezoid rule),
keep the cumulative mass and first moment, and read any t off them by interpolation: fast,
vectorised and deterministic (no sampling, no SciPy).

Prefix-cache hits are a two-component mixture: with probability ``cache_hit_prob`` a request
finds ``cache_hit_fraction`` of its prompt cached, so its incremental length is the prompt
length scaled by (1 - fraction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

ArrayLike = float | np.ndarray


class PlanError(ValueError):
    """Bad planner/simulator input; the message names the offending field.

    Defined here, in the lowest module of the package, so every module can raise it without
    import cycles; ``kvship.plan`` re-exports it.
    """


@dataclass(frozen=True)
class LengthDistribution:
    """Truncated log-normal prompt lengths (tokens), optionally thinned by prefix-cache hits."""

    mu: float
    sigma: float
    min_tokens: float
    max_tokens: float
    cache_hit_prob: float = 0.0
    cache_hit_fraction: float = 0.0
    grid_points: int = 20001
    _x: np.ndarray = field(init=False, repr=False, compare=False)
    _mass: np.ndarray = field(init=False, repr=False, compare=False)
    _moment: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_finite("workload.mu", self.mu)
        _check_positive("workload.sigma", self.sigma)
        _check_positive("workload.min_tokens", self.min_tokens)
        _check_finite("workload.max_tokens", self.max_tokens)
        if self.max_tokens <= self.min_tokens:
            raise PlanError(
                f"workload.max_tokens: must exceed min_tokens ({self.max_tokens} <= "
                f"{self.min_tokens})"
            )
        if not 0.0 <= self.cache_hit_prob <= 1.0:
            raise PlanError(
                f"workload.cache_hit_prob: must be in [0, 1], got {self.cache_hit_prob}"
            )
        if not 0.0 <= self.cache_hit_fraction < 1.0:
            raise PlanError(
                f"workload.cache_hit_fraction: must be in [0, 1), got {self.cache_hit_fraction}"
            )
        if self.grid_points < 101:
            raise PlanError(f"grid_points: need at least 101, got {self.grid_points}")
        x = np.linspace(math.log(self.min_tokens), math.log(self.max_tokens), self.grid_points)
        dens = np.exp(-0.5 * ((x - self.mu) / self.sigma) ** 2)
        mass = _cumtrapz(dens, x)
        if not mass[-1] > 0.0:
            raise PlanError("workload: the length range holds no probability mass")
        moment = _cumtrapz(dens * np.exp(x), x)
        object.__setattr__(self, "_x", x)
        object.__setattr__(self, "_mass", mass / mass[-1])
        object.__setattr__(self, "_moment", moment / mass[-1])

    # -- mixture components: (weight, scale of incremental length vs prompt length)
    def _components(self) -> list[tuple[float, float]]:
        h, f = self.cache_hit_prob, self.cache_hit_fraction
        if h == 0.0 or f == 0.0:
            return [(1.0, 1.0)]
        return [(w, s) for w, s in ((1.0 - h, 1.0), (h, 1.0 - f)) if w > 0.0]

    @property
    def min_incremental(self) -> float:
        """Shortest incremental length that can occur."""
        return min(s for _, s in self._components()) * self.min_tokens

    def _tail(self, t: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """(P(l > t), E[l; l > t]) summed over the mixture."""
        t_arr = np.asarray(t, dtype=float)
        p = np.zeros_like(t_arr)
        m = np.zeros_like(t_arr)
        for w, s in self._components():
            xs = np.log(np.maximum(t_arr / s, 1e-300))
            p += w * (1.0 - np.interp(xs, self._x, self._mass, left=0.0, right=1.0))
            m += (
                w
                * s
                * (
                    self._moment[-1]
                    - np.interp(xs, self._x, self._moment, left=0.0, right=self._moment[-1])
                )
            )
        return p, m

    def mean(self) -> float:
        """E[l] over all requests."""
        return float(sum(w * s * self._moment[-1] for w, s in self._components()))

    def p_above(self, t: ArrayLike) -> np.ndarray:
        """P(l > t): the fraction of requests a threshold t sends to the remote cluster."""
        return self._tail(t)[0]

    def split(self, t: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p, l_long, l_short) at threshold(s) t; a mean is NaN where its side is empty."""
        p, m_above = self._tail(t)
        total = self.mean()
        with np.errstate(divide="ignore", invalid="ignore"):
            l_long = np.where(p > 1e-12, m_above / np.where(p > 0, p, 1.0), np.nan)
            q = 1.0 - p
            l_short = np.where(q > 1e-12, (total - m_above) / np.where(q > 0, q, 1.0), np.nan)
        return p, l_long, l_short

    def quantile(self, q: ArrayLike) -> np.ndarray:
        """Prompt-length quantile (ignoring cache hits)."""
        return np.exp(np.interp(np.asarray(q, dtype=float), self._mass, self._x))

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n (prompt_tokens, cached_tokens) pairs by inverse-CDF sampling on the same grid."""
        prompt = np.rint(self.quantile(rng.random(n))).astype(np.int64)
        prompt = np.clip(prompt, math.ceil(self.min_tokens), math.floor(self.max_tokens))
        hit = rng.random(n) < self.cache_hit_prob
        cached = np.where(hit, np.floor(prompt * self.cache_hit_fraction), 0).astype(np.int64)
        return prompt, cached


def _cumtrapz(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(y)
    out[1:] = np.cumsum(0.5 * (y[1:] + y[:-1]) * np.diff(x))
    return out


def _check_finite(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise PlanError(f"{name}: must be a finite number, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    _check_finite(name, value)
    if value <= 0:
        raise PlanError(f"{name}: must be > 0, got {value!r}")
