"""PrfaaS throughput model: profiles, profiled curves, Θ/Λ formulas and the grid search.

A request whose incremental length l exceeds the threshold t is prefilled on the remote
(PrfaaS) cluster and its KV shipped over the egress link; the rest are prefilled locally.
With p = P(l > t), l_long = E[l | l > t], l_short = E[l | l <= t]:

    Θ_prfaas = min(N_prfaas / T_remote(l_long), B_out / S_kv(l_long))
    Θ_pd-p   = N_p / T_local(l_short)
    Θ_pd-d   = N_d · BS_max / (T_decode · L_out)
    Λ_max    = min(Θ_prfaas / p, Θ_pd-p / (1 - p), Θ_pd-d)

t and the local split N_p / N_d are chosen by grid search. Pure computation: numpy + stdlib.
"""

from __future__ import annotations

import itertools
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from kvship.plan.distribution import LengthDistribution, PlanError

MIB = 2**20  # S_kv is given in MiB (binary); link rates in Gbit/s (decimal, 1e9 bit/s)
INTERPOLATIONS = ("loglog", "linear")
ROUTINGS = ("threshold", "local", "remote")
_COARSE_POINTS = 1201
_REFINE_POINTS = 401
_REFINE_ROUNDS = 3


# --------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class Curve:
    """A profiled quantity vs tokens, interpolated between points and extended by the end
    segments outside them. ``loglog`` = piecewise power law (straight lines on log-log axes),
    which follows prefill time and KV size across 1K..128K far better than straight lines."""

    field_name: str
    tokens: tuple[float, ...]
    values: tuple[float, ...]
    interpolation: str = "loglog"

    def __call__(self, tokens: float | np.ndarray) -> np.ndarray:
        x = np.asarray(self.tokens, dtype=float)
        y = np.asarray(self.values, dtype=float)
        q = np.asarray(tokens, dtype=float)
        if self.interpolation == "loglog":
            x, y = np.log(x), np.log(y)
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.log(np.maximum(q, 1e-300))
        out = _interp_extrapolate(q, x, y)
        return np.exp(out) if self.interpolation == "loglog" else out


def _interp_extrapolate(q: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.interp(q, x, y)
    lo_slope = (y[1] - y[0]) / (x[1] - x[0])
    hi_slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
    out = np.where(q < x[0], y[0] + (q - x[0]) * lo_slope, out)
    return np.where(q > x[-1], y[-1] + (q - x[-1]) * hi_slope, out)


def make_curve(
    field_name: str, tokens: Any, values: Any, interpolation: str, tokens_field: str | None = None
) -> Curve:
    """Validate one curve: at least two points, tokens strictly increasing, values positive
    and non-decreasing (a longer prompt never prefills faster or yields less KV)."""
    if interpolation not in INTERPOLATIONS:
        raise PlanError(
            f"{field_name}: interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}"
        )
    tok_name = tokens_field or f"{field_name}.tokens"
    tok = _number_list(tok_name, tokens)
    val = _number_list(field_name, values)
    if len(tok) != len(val):
        raise PlanError(f"{field_name}: {len(val)} values for {len(tok)} token points (must match)")
    if len(tok) < 2:
        raise PlanError(f"{field_name}: need at least 2 points, got {len(tok)}")
    for i, (a, b) in enumerate(itertools.pairwise(tok)):
        if a <= 0:
            raise PlanError(f"{tok_name}[{i}]: must be > 0, got {a}")
        if b <= a:
            raise PlanError(f"{tok_name}[{i + 1}]: not increasing ({b} after {a})")
    for i, v in enumerate(val):
        if v <= 0:
            raise PlanError(f"{field_name}[{i}]: must be > 0, got {v}")
        if i and v < val[i - 1]:
            raise PlanError(f"{field_name}[{i}]: non-monotonic ({v} after {val[i - 1]})")
    return Curve(field_name, tuple(tok), tuple(val), interpolation)


# --------------------------------------------------------------------------- profile


@dataclass(frozen=True)
class HardwareClass:
    """One instance type (e.g. 8×H200): its prefill-time curve, KV-size curve and decode batch."""

    name: str
    prefill_s: Curve
    kv_mib: Curve | None = None
    decode_batch: float | None = None
    description: str = ""


@dataclass(frozen=True)
class Workload:
    """Request mix: prompt lengths, output length and the decode-speed SLO."""

    lengths: LengthDistribution
    output_tokens: int
    decode_tokens_per_s: float

    @property
    def t_decode_s(self) -> float:
        """Decode step time at the SLO (one token per step per request)."""
        return 1.0 / self.decode_tokens_per_s


@dataclass(frozen=True)
class Deployment:
    """Instance counts and routing mode of one deployment (PrfaaS or a baseline)."""

    name: str
    routing: str
    local: str
    local_instances: int
    remote: str | None = None
    remote_instances: int = 0
    link_gbps: float = 0.0
    t_tokens: float | None = None
    n_prefill_local: int | None = None
    description: str = ""


@dataclass(frozen=True)
class Profile:
    """Everything the planner and simulator need, as read from one TOML file."""

    name: str
    workload: Workload
    hardware: Mapping[str, HardwareClass]
    deployments: Mapping[str, Deployment]
    published: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    source: str = ""
    sim: Mapping[str, Any] = field(default_factory=dict)

    @property
    def main(self) -> str:
        """The deployment the plan is about: ``prfaas`` if present, else the first one."""
        return "prfaas" if "prfaas" in self.deployments else next(iter(self.deployments))

    def deployment(self, name: str) -> Deployment:
        if name not in self.deployments:
            raise PlanError(
                f"deployment: unknown {name!r}; profile {self.name!r} has "
                f"{', '.join(self.deployments)}"
            )
        return self.deployments[name]


def builtin_profiles() -> list[str]:
    """Names of the profiles shipped inside the package."""
    root = resources.files("kvship.plan").joinpath("profiles")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """A built-in profile by name, or a TOML file by path."""
    text_path = str(name_or_path)
    path = Path(text_path)
    if path.suffix == ".toml" or path.exists():
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PlanError(f"profile: cannot read {text_path!r}: {exc.strerror}") from exc
        source = str(path)
    else:
        res = resources.files("kvship.plan").joinpath("profiles", f"{text_path}.toml")
        if not res.is_file():
            raise PlanError(
                f"profile: no built-in profile {text_path!r} and no such file "
                f"(built-in: {', '.join(builtin_profiles())})"
            )
        raw = res.read_bytes()
        source = f"builtin:{text_path}"
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"profile: {source} is not valid TOML: {exc}") from exc
    return parse_profile(data, source=source)


def parse_profile(data: Mapping[str, Any], source: str = "<dict>") -> Profile:
    """Build and validate a Profile from a TOML-shaped mapping."""
    wl = _table(data, "workload")
    if wl.get("distribution", "lognormal") != "lognormal":
        raise PlanError(
            f"workload.distribution: only 'lognormal' is supported, got {wl['distribution']!r}"
        )
    lengths = LengthDistribution(
        mu=_num(wl, "workload", "mu"),
        sigma=_num(wl, "workload", "sigma", positive=True),
        min_tokens=_num(wl, "workload", "min_tokens", positive=True),
        max_tokens=_num(wl, "workload", "max_tokens", positive=True),
        cache_hit_prob=_num(wl, "workload", "cache_hit_prob", default=0.0),
        cache_hit_fraction=_num(wl, "workload", "cache_hit_fraction", default=0.0),
    )
    workload = Workload(
        lengths=lengths,
        output_tokens=_int(wl, "workload", "output_tokens", minimum=1),
        decode_tokens_per_s=_num(wl, "workload", "decode_tokens_per_s", positive=True),
    )
    hw_table = _table(data, "hardware")
    hardware = {name: _hardware(name, _table(hw_table, name, "hardware")) for name in hw_table}
    dep_table = _table(data, "deployments")
    if not dep_table:
        raise PlanError("deployments: at least one deployment is required")
    deployments = {
        name: _deployment(name, _table(dep_table, name, "deployments"), hardware, lengths)
        for name in dep_table
    }
    return Profile(
        name=str(data.get("name", Path(source).stem)),
        description=str(data.get("description", "")),
        workload=workload,
        hardware=hardware,
        deployments=deployments,
        published=dict(data.get("published", {})),
        sim=dict(data.get("sim", {})),
        source=source,
    )


def _hardware(name: str, t: Mapping[str, Any]) -> HardwareClass:
    where = f"hardware.{name}"
    interp = str(t.get("interpolation", "loglog"))
    if interp not in INTERPOLATIONS:
        raise PlanError(f"{where}.interpolation: must be one of {INTERPOLATIONS}, got {interp!r}")
    if "tokens" not in t:
        raise PlanError(f"{where}.tokens: missing")
    if "prefill_s" not in t:
        raise PlanError(f"{where}.prefill_s: missing")
    tokens = t["tokens"]
    prefill = make_curve(f"{where}.prefill_s", tokens, t["prefill_s"], interp, f"{where}.tokens")
    kv = (
        make_curve(f"{where}.kv_mib", tokens, t["kv_mib"], interp, f"{where}.tokens")
        if "kv_mib" in t
        else None
    )
    batch = _num(t, where, "decode_batch", positive=True) if "decode_batch" in t else None
    return HardwareClass(name, prefill, kv, batch, str(t.get("description", "")))


def _deployment(
    name: str,
    t: Mapping[str, Any],
    hardware: Mapping[str, HardwareClass],
    lengths: LengthDistribution,
) -> Deployment:
    where = f"deployments.{name}"
    routing = str(t.get("routing", "threshold"))
    if routing not in ROUTINGS:
        raise PlanError(f"{where}.routing: must be one of {ROUTINGS}, got {routing!r}")
    local = _hw_ref(t, where, "local", hardware)
    if hardware[local].decode_batch is None:
        raise PlanError(f"hardware.{local}.decode_batch: missing (needed to decode in {where})")
    n_local = _int(t, where, "local_instances", minimum=1)
    remote: str | None = None
    n_remote, link = 0, 0.0
    if routing != "local":
        remote = _hw_ref(t, where, "remote", hardware)
        if hardware[remote].kv_mib is None:
            raise PlanError(f"hardware.{remote}.kv_mib: missing (needed to ship KV in {where})")
        n_remote = _int(t, where, "remote_instances", minimum=1)
        link = _num(t, where, "link_gbps", positive=True)
    if routing != "remote" and n_local < 2:
        raise PlanError(f"{where}.local_instances: need >= 2 (prefill + decode), got {n_local}")
    t_fixed = _num(t, where, "t_tokens", default=None)
    if t_fixed is not None:
        _check_threshold(f"{where}.t_tokens", t_fixed, lengths)
    n_p = _int(t, where, "n_prefill_local", minimum=0) if "n_prefill_local" in t else None
    if n_p is not None and not (1 if routing != "remote" else 0) <= n_p <= n_local - 1:
        raise PlanError(f"{where}.n_prefill_local: {n_p} leaves no valid split of {n_local}")
    return Deployment(
        name=name,
        routing=routing,
        local=local,
        local_instances=n_local,
        remote=remote,
        remote_instances=n_remote,
        link_gbps=link,
        t_tokens=t_fixed,
        n_prefill_local=n_p,
        description=str(t.get("description", "")),
    )


def _check_threshold(name: str, t: float, lengths: LengthDistribution) -> None:
    if t > lengths.max_tokens:
        raise PlanError(f"{name}: {t:g} is beyond the max length {lengths.max_tokens:g}")
    if t < lengths.min_incremental:
        raise PlanError(f"{name}: {t:g} is below the min length {lengths.min_incremental:g}")


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class OperatingPoint:
    """One deployment at one (t, N_p) setting, with every Θ and the resulting Λ_max."""

    deployment: str
    routing: str
    t_tokens: float
    offload_fraction: float
    l_long_tokens: float | None
    l_short_tokens: float | None
    n_prefill_remote: int
    n_prefill_local: int
    n_decode: int
    theta_prfaas: float | None
    theta_prfaas_compute: float | None
    theta_prfaas_link: float | None
    theta_pd_p: float | None
    theta_pd_d: float
    lambda_max: float
    bottleneck: str
    egress_gbps: float
    link_gbps: float
    link_utilization: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sweep(
    profile: Profile, dep: Deployment, t: np.ndarray, n_prefill_local: int
) -> dict[str, np.ndarray]:
    """All Θ terms and Λ over an array of thresholds at one local split (vectorised)."""
    wl = profile.workload
    t = np.asarray(t, dtype=float)
    p, l_long, l_short = wl.lengths.split(t)
    n_d = dep.local_instances - n_prefill_local
    local = profile.hardware[dep.local]
    inf = np.full_like(t, np.inf)
    nan = np.full_like(t, np.nan)
    if dep.remote is not None and dep.remote_instances > 0:
        remote = profile.hardware[dep.remote]
        assert remote.kv_mib is not None
        ll = np.where(np.isnan(l_long), wl.lengths.mean(), l_long)
        kv_bytes = remote.kv_mib(ll) * MIB
        th_c = dep.remote_instances / remote.prefill_s(ll)
        th_l = dep.link_gbps * 1e9 / 8.0 / kv_bytes
        th_r = np.minimum(th_c, th_l)
    else:
        kv_bytes, th_c, th_l, th_r = nan, nan, nan, np.zeros_like(t)
    if n_prefill_local > 0:
        ls = np.where(np.isnan(l_short), wl.lengths.mean(), l_short)
        th_p = n_prefill_local / local.prefill_s(ls)
    else:
        th_p = np.zeros_like(t)
    assert local.decode_batch is not None
    th_d = np.full_like(t, n_d * local.decode_batch / (wl.t_decode_s * wl.output_tokens))
    with np.errstate(divide="ignore", invalid="ignore"):
        cap_r = np.where(p > 0, th_r / p, inf)
        cap_p = np.where(p < 1, th_p / (1 - p), inf)
    lam = np.minimum(np.minimum(cap_r, cap_p), th_d)
    egress = np.where(p > 0, lam * p * kv_bytes * 8 / 1e9, 0.0)
    return {
        "t": t,
        "p": p,
        "l_long": l_long,
        "l_short": l_short,
        "theta_prfaas": th_r,
        "theta_prfaas_compute": th_c,
        "theta_prfaas_link": th_l,
        "theta_pd_p": th_p,
        "theta_pd_d": th_d,
        "cap_remote": cap_r,
        "cap_local": cap_p,
        "lambda": lam,
        "egress_gbps": egress,
    }


def evaluate(
    profile: Profile, deployment: str, t_tokens: float, n_prefill_local: int
) -> OperatingPoint:
    """Θ and Λ_max of a deployment at a given threshold and local prefill count."""
    dep = profile.deployment(deployment)
    _check_threshold("t_tokens", t_tokens, profile.workload.lengths)
    lo = 0 if dep.routing == "remote" else 1
    if not lo <= n_prefill_local <= dep.local_instances - 1:
        raise PlanError(
            f"n_prefill_local: {n_prefill_local} out of range {lo}..{dep.local_instances - 1}"
        )
    s = sweep(profile, dep, np.array([float(t_tokens)]), n_prefill_local)
    return _point(dep, s, 0, n_prefill_local)


def _point(dep: Deployment, s: Mapping[str, np.ndarray], i: int, n_p: int) -> OperatingPoint:
    def opt(key: str) -> float | None:
        v = float(s[key][i])
        return None if math.isnan(v) else v

    p = float(s["p"][i])
    remote = dep.remote_instances > 0
    terms = {  # every stage within 0.1 % of Λ counts as a bottleneck
        "remote prefill": float(s["theta_prfaas_compute"][i]) / p if remote and p > 0 else math.inf,
        "link": float(s["theta_prfaas_link"][i]) / p if remote and p > 0 else math.inf,
        "local prefill": float(s["cap_local"][i]),
        "decode": float(s["theta_pd_d"][i]),
    }
    lam = float(s["lambda"][i])
    egress = float(s["egress_gbps"][i])
    return OperatingPoint(
        deployment=dep.name,
        routing=dep.routing,
        t_tokens=float(s["t"][i]),
        offload_fraction=p,
        l_long_tokens=opt("l_long") if p > 0 else None,
        l_short_tokens=opt("l_short") if p < 1 else None,
        n_prefill_remote=dep.remote_instances,
        n_prefill_local=n_p,
        n_decode=dep.local_instances - n_p,
        theta_prfaas=float(s["theta_prfaas"][i]) if remote else None,
        theta_prfaas_compute=opt("theta_prfaas_compute") if remote else None,
        theta_prfaas_link=opt("theta_prfaas_link") if remote else None,
        theta_pd_p=float(s["theta_pd_p"][i]) if n_p > 0 else None,
        theta_pd_d=float(s["theta_pd_d"][i]),
        lambda_max=lam,
        bottleneck=" + ".join(k for k, v in terms.items() if v <= lam * (1 + 1e-3)),
        egress_gbps=egress,
        link_gbps=dep.link_gbps,
        link_utilization=egress / dep.link_gbps if dep.link_gbps > 0 else 0.0,
    )


def threshold_range(profile: Profile, dep: Deployment) -> tuple[float, float]:
    """Thresholds the search may pick: all-remote routing pins t to the shortest length,
    all-local to the longest."""
    lengths = profile.workload.lengths
    lo, hi = lengths.min_incremental, lengths.max_tokens
    if dep.routing == "remote":
        return lo, lo
    if dep.routing == "local":
        return hi, hi
    if dep.t_tokens is not None:
        return dep.t_tokens, dep.t_tokens
    return lo, hi


def local_splits(dep: Deployment) -> list[int]:
    """Candidate local prefill counts N_p (N_d = local_instances - N_p >= 1)."""
    if dep.n_prefill_local is not None:
        return [dep.n_prefill_local]
    if dep.routing == "remote":
        return [0]
    return list(range(1, dep.local_instances))


def optimize(profile: Profile, deployment: str) -> OperatingPoint:
    """Grid search over t (log-spaced, then refined around the best point) and N_p.

    Ties in Λ_max (e.g. when decode caps it) go to the point with the most prefill headroom,
    i.e. where Θ_prfaas/p and Θ_pd-p/(1-p) balance.
    """
    dep = profile.deployment(deployment)
    lo, hi = threshold_range(profile, dep)
    best: tuple[tuple[float, float, int], OperatingPoint] | None = None
    for n_p in local_splits(dep):
        s = _search_t(profile, dep, n_p, lo, hi)
        i = _best_index(s)
        point = _point(dep, s, i, n_p)
        key = (_round(point.lambda_max), _round(_headroom(s, i)), point.n_decode)
        if best is None or key > best[0]:
            best = (key, point)
    assert best is not None
    return best[1]


def _search_t(
    profile: Profile, dep: Deployment, n_p: int, lo: float, hi: float
) -> dict[str, np.ndarray]:
    if lo == hi:
        return sweep(profile, dep, np.array([lo]), n_p)
    ts = np.geomspace(lo, hi, _COARSE_POINTS)
    s = sweep(profile, dep, ts, n_p)
    for _ in range(_REFINE_ROUNDS):
        i = _best_index(s)
        a, b = ts[max(i - 1, 0)], ts[min(i + 1, len(ts) - 1)]
        ts = np.unique(np.concatenate([np.geomspace(a, b, _REFINE_POINTS), [lo, hi]]))
        s = sweep(profile, dep, ts, n_p)
    return s


def _headroom(s: Mapping[str, np.ndarray], i: int) -> float:
    return float(min(s["cap_remote"][i], s["cap_local"][i]))


def _best_index(s: Mapping[str, np.ndarray]) -> int:
    lam = s["lambda"]
    top = np.flatnonzero(lam >= lam.max() * (1 - 1e-9))
    head = np.minimum(s["cap_remote"][top], s["cap_local"][top])
    return int(top[int(np.argmax(head))])


def _round(x: float) -> float:
    return float(f"{x:.9g}") if math.isfinite(x) else x


@dataclass(frozen=True)
class Plan:
    """The optimised main deployment plus its baselines."""

    profile: Profile
    main: OperatingPoint
    baselines: Mapping[str, OperatingPoint]


def plan(profile: Profile) -> Plan:
    """Optimise every deployment of the profile."""
    main = optimize(profile, profile.main)
    baselines = {n: optimize(profile, n) for n in profile.deployments if n != profile.main}
    return Plan(profile, main, baselines)


# --------------------------------------------------------------------------- field checks


def _table(data: Mapping[str, Any], key: str, parent: str = "") -> Mapping[str, Any]:
    where = f"{parent}.{key}" if parent else key
    if key not in data:
        raise PlanError(f"{where}: missing table")
    value = data[key]
    if not isinstance(value, Mapping):
        raise PlanError(f"{where}: must be a table, got {type(value).__name__}")
    return value


def _num(
    t: Mapping[str, Any], where: str, key: str, *, positive: bool = False, default: Any = ...
) -> Any:
    if key not in t:
        if default is ...:
            raise PlanError(f"{where}.{key}: missing")
        return default
    v = t[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise PlanError(f"{where}.{key}: must be a finite number, got {v!r}")
    if v < 0 or (positive and v == 0):
        raise PlanError(f"{where}.{key}: must be {'> 0' if positive else '>= 0'}, got {v!r}")
    return float(v)


def _int(t: Mapping[str, Any], where: str, key: str, *, minimum: int) -> int:
    if key not in t:
        raise PlanError(f"{where}.{key}: missing")
    v = t[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise PlanError(f"{where}.{key}: must be an integer, got {v!r}")
    if v < minimum:
        raise PlanError(f"{where}.{key}: must be >= {minimum}, got {v}")
    return v


def _hw_ref(t: Mapping[str, Any], where: str, key: str, hw: Mapping[str, HardwareClass]) -> str:
    if key not in t:
        raise PlanError(f"{where}.{key}: missing (name of a [hardware.*] class)")
    name = str(t[key])
    if name not in hw:
        raise PlanError(f"{where}.{key}: unknown hardware class {name!r} (have {', '.join(hw)})")
    return name


def _number_list(name: str, values: Any) -> list[float]:
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise PlanError(f"{name}: must be a list of numbers, got {values!r}")
    out: list[float] = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise PlanError(f"{name}[{i}]: must be a finite number, got {v!r}")
        out.append(float(v))
    return out
