"""Discrete-event simulator of a PrfaaS deployment (heapq-based, seeded, bounded).

It checks the steady-state planner and covers what that model cannot: per-request length
variation, queueing (TTFT), bursts (an arrival-rate schedule), link drops (a link-capacity
schedule), prefix-cache hits and any routing policy.

Per request: arrival -> routing ``policy(request, state) -> "local" | "remote"`` ->
FIFO prefill queue (remote: N_prfaas instances, local: N_p instances; one request per
instance, service T_prefill(l) of its incremental length l) -> for remote prefill, the KV is
emitted layer-group by layer-group while the prefill runs (layer-wise pipelining) and each
group crosses the egress link as soon as it exists -> decode queue -> a decode slot (N_d ·
BS_max slots, each decoding one request at the SLO speed for L_out tokens). The link is a
token bucket paced at B_out(t), i.e. a FIFO byte server of rate B_out(t): S_kv(l) bytes take
S_kv(l) / B_out. A request's cached prefix is held on both sides (dedup), so only the KV of
its incremental l tokens is prefilled and shipped. Local prefill hands KV to local decode
over the cluster's RDMA fabric, taken as free.

TTFT = decode start + one decode step - arrival (the first token needs the whole KV and a slot).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kvship.plan.distribution import PlanError
from kvship.plan.model import MIB, Deployment, OperatingPoint, Profile, optimize

Route = str  # "local" | "remote"
Policy = Callable[["SimRequest", "SimState"], Route]
MAX_REQUESTS = 1_000_000
_GENERIC_SCHEDULE_STEP_S = 0.05


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class StepSchedule:
    """A piecewise-constant function of time, e.g. link Gbit/s or arrival req/s.

    ``steps`` = [(t0, v0), (t1, v1), ...] with t0 = 0 and increasing times: value v_i holds
    from t_i until t_{i+1} (the last one forever). Callable as ``schedule(t)``.
    """

    steps: tuple[tuple[float, float], ...]
    field_name: str = "schedule"

    def __post_init__(self) -> None:
        steps = tuple((float(t), float(v)) for t, v in self.steps)
        if not steps:
            raise PlanError(f"{self.field_name}: needs at least one (time, value) step")
        if steps[0][0] != 0.0:
            raise PlanError(f"{self.field_name}[0]: must start at time 0, got {steps[0][0]}")
        for i, (t, v) in enumerate(steps):
            if not (math.isfinite(t) and math.isfinite(v)):
                raise PlanError(f"{self.field_name}[{i}]: must be finite, got ({t}, {v})")
            if v < 0:
                raise PlanError(f"{self.field_name}[{i}]: negative value {v} at t={t}")
            if i and t <= steps[i - 1][0]:
                raise PlanError(f"{self.field_name}[{i}]: time {t} not after {steps[i - 1][0]}")
        object.__setattr__(self, "steps", steps)

    @classmethod
    def constant(cls, value: float, field_name: str = "schedule") -> StepSchedule:
        return cls(((0.0, value),), field_name)

    def _index(self, t: float) -> int:
        i = 0
        for j, (tj, _) in enumerate(self.steps):
            if tj <= t:
                i = j
        return i

    def __call__(self, t: float) -> float:
        return self.steps[self._index(t)][1]

    def next_change(self, t: float) -> float:
        """Time of the first step after t (inf if none)."""
        for tj, _ in self.steps:
            if tj > t:
                return tj
        return math.inf


@dataclass
class SimRequest:
    """One request and its timeline (seconds from the start of the run)."""

    id: int
    arrival_s: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    route: Route = ""
    prefill_start_s: float = math.nan
    prefill_end_s: float = math.nan
    kv_ready_s: float = math.nan
    decode_start_s: float = math.nan
    first_token_s: float = math.nan
    kv_bytes: float = 0.0
    _chunks_left: int = 0

    @property
    def incremental_tokens(self) -> int:
        """Tokens that must be prefilled: prompt minus cached prefix."""
        return self.prompt_tokens - self.cached_tokens


def requests_from_records(
    records: Iterable[Mapping[str, Any]], output_tokens: int
) -> list[SimRequest]:
    """Validate explicit requests (e.g. a JSONL trace): each needs ``prompt_tokens``
    (alias ``input_tokens``); ``cached_tokens``, ``arrival_s``, ``output_tokens`` optional."""
    out: list[SimRequest] = []
    last_arrival = 0.0
    for i, rec in enumerate(records):
        where = f"requests[{i}]"
        if not isinstance(rec, Mapping):
            raise PlanError(f"{where}: must be an object, got {type(rec).__name__}")
        key = "prompt_tokens" if "prompt_tokens" in rec else "input_tokens"
        if key not in rec or rec[key] is None:
            raise PlanError(f"{where}.prompt_tokens: missing (the request has no length)")
        prompt = _req_int(rec[key], f"{where}.{key}", 1)
        cached = _req_int(rec.get("cached_tokens", 0), f"{where}.cached_tokens", 0)
        if cached >= prompt:
            raise PlanError(
                f"{where}.cached_tokens: {cached} leaves nothing to prefill of {prompt}"
            )
        out_tok = _req_int(rec.get("output_tokens", output_tokens), f"{where}.output_tokens", 1)
        arrival = rec.get("arrival_s", last_arrival)
        if (
            isinstance(arrival, bool)
            or not isinstance(arrival, int | float)
            or not (math.isfinite(arrival) and arrival >= last_arrival)
        ):
            raise PlanError(
                f"{where}.arrival_s: must be a finite time >= the previous one, got {arrival!r}"
            )
        last_arrival = float(arrival)
        out.append(SimRequest(i, float(arrival), prompt, cached, out_tok))
    if not out:
        raise PlanError("requests: empty")
    return out


def _req_int(v: Any, name: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int | float) or v != int(v) or v < minimum:
        raise PlanError(f"{name}: must be an integer >= {minimum}, got {v!r}")
    return int(v)


def threshold_policy(t_tokens: float) -> Policy:
    """PrfaaS routing: remote iff the incremental length exceeds t."""

    def policy(request: SimRequest, state: SimState) -> Route:
        return "remote" if request.incremental_tokens > t_tokens else "local"

    return policy


def default_policy(dep: Deployment, t_tokens: float) -> Policy:
    """The routing a deployment's mode implies."""
    if dep.routing == "remote":
        return lambda request, state: "remote"
    if dep.routing == "local":
        return lambda request, state: "local"
    return threshold_policy(t_tokens)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SimResult:
    """Figures of one simulation run."""

    deployment: str
    mode: str  # "capacity" (saturated closed loop) or "open" (arrival process)
    seed: int
    requests: int
    completed: int
    arrival_rate: float | None
    throughput_rps: float
    offload_fraction: float
    t_tokens: float
    n_prefill_remote: int
    n_prefill_local: int
    n_decode: int
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    egress_mean_gbps: float
    egress_peak_gbps: float
    utilization: dict[str, float] = field(default_factory=dict)
    sim_time_s: float = 0.0
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- engine


class SimState:
    """Read-only view of the running simulation handed to routing policies."""

    def __init__(self, sim: _Simulator) -> None:
        self._sim = sim

    @property
    def now(self) -> float:
        return self._sim.now

    @property
    def t_tokens(self) -> float:
        return self._sim.t_tokens

    @property
    def remote_queue(self) -> int:
        """Requests waiting for a remote prefill instance."""
        return len(self._sim.remote.queue)

    @property
    def remote_busy(self) -> int:
        return self._sim.remote.busy

    @property
    def local_queue(self) -> int:
        return len(self._sim.local.queue)

    @property
    def local_busy(self) -> int:
        return self._sim.local.busy

    @property
    def decode_queue(self) -> int:
        return len(self._sim.decode.queue)

    @property
    def link_gbps(self) -> float:
        """Link capacity right now."""
        return self._sim.capacity(self._sim.now)

    @property
    def link_backlog_s(self) -> float:
        """Seconds until the link has sent everything queued so far."""
        return max(0.0, self._sim.link_free_at - self._sim.now)

    @property
    def n_remote(self) -> int:
        return self._sim.remote.servers

    @property
    def n_prefill_local(self) -> int:
        return self._sim.local.servers


@dataclass
class _Pool:
    servers: int
    busy: int = 0
    busy_time: float = 0.0
    queue: deque[SimRequest] = field(default_factory=deque)


_ARRIVE, _PREFILL_DONE, _CHUNK, _KV_READY, _DECODE_DONE = range(5)


class _Simulator:
    def __init__(
        self,
        profile: Profile,
        dep: Deployment,
        *,
        t_tokens: float,
        n_prefill_local: int,
        policy: Policy,
        link_schedule: Callable[[float], float] | None,
        chunks: int,
        max_time_s: float,
    ) -> None:
        wl = profile.workload
        self.dep, self.t_tokens, self.policy = dep, t_tokens, policy
        self.local_hw = profile.hardware[dep.local]
        self.remote_hw = profile.hardware[dep.remote] if dep.remote else None
        n_d = dep.local_instances - n_prefill_local
        assert self.local_hw.decode_batch is not None
        self.remote = _Pool(dep.remote_instances)
        self.local = _Pool(n_prefill_local)
        self.decode = _Pool(int(n_d * self.local_hw.decode_batch))
        self.t_decode = wl.t_decode_s
        self.chunks = chunks
        self.max_time = max_time_s
        self.schedule = link_schedule
        self.link_free_at = 0.0
        self.link_log: list[tuple[float, float, float]] = []  # (start, end, bytes)
        self.now = 0.0
        self.heap: list[tuple[float, int, int, SimRequest, int]] = []
        self.seq = 0
        self.state = SimState(self)
        self.on_first_token: Callable[[SimRequest], None] | None = None
        self.truncated = False

    def capacity(self, t: float) -> float:
        if self.schedule is None:
            return self.dep.link_gbps
        v = float(self.schedule(t))
        if not math.isfinite(v) or v < 0:
            raise PlanError(f"link_schedule: capacity must be >= 0 Gbit/s, got {v!r} at t={t:g}")
        return v

    def push(self, t: float, kind: int, req: SimRequest, arg: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, req, arg))

    def run(self) -> None:
        while self.heap:
            t, _, kind, req, arg = heapq.heappop(self.heap)
            if t > self.max_time:
                self.truncated = True
                break
            self.now = t
            if kind == _ARRIVE:
                self._arrive(req)
            elif kind == _PREFILL_DONE:
                self._prefill_done(req, arg)
            elif kind == _CHUNK:
                self._chunk(req)
            elif kind == _KV_READY:
                self._enqueue_decode(req)
            else:
                self.decode.busy -= 1
                self._start_decode()

    def _arrive(self, req: SimRequest) -> None:
        route = self.policy(req, self.state)
        if route not in ("local", "remote"):
            raise PlanError(f"policy: returned {route!r}, expected 'local' or 'remote'")
        pool = self.remote if route == "remote" else self.local
        if pool.servers == 0:
            raise PlanError(
                f"policy: routed request {req.id} to {route!r} but deployment "
                f"{self.dep.name!r} has no {route} prefill instances"
            )
        req.route = route
        pool.queue.append(req)
        self._start_prefill(pool, route == "remote")

    def _start_prefill(self, pool: _Pool, remote: bool) -> None:
        while pool.queue and pool.busy < pool.servers:
            req = pool.queue.popleft()
            pool.busy += 1
            hw = self.remote_hw if remote else self.local_hw
            assert hw is not None
            dur = float(hw.prefill_s(req.incremental_tokens))
            pool.busy_time += dur
            req.prefill_start_s, req.prefill_end_s = self.now, self.now + dur
            self.push(self.now + dur, _PREFILL_DONE, req, int(remote))
            if remote:
                assert hw.kv_mib is not None
                req.kv_bytes = float(hw.kv_mib(req.incremental_tokens)) * MIB
                req._chunks_left = self.chunks
                for k in range(1, self.chunks + 1):
                    self.push(self.now + dur * k / self.chunks, _CHUNK, req)

    def _prefill_done(self, req: SimRequest, remote: int) -> None:
        pool = self.remote if remote else self.local
        pool.busy -= 1
        if not remote:
            req.kv_ready_s = self.now
            self._enqueue_decode(req)
        self._start_prefill(pool, bool(remote))

    def _chunk(self, req: SimRequest) -> None:
        nbytes = req.kv_bytes / self.chunks
        start = max(self.now, self.link_free_at)
        end = self._transmit_end(start, nbytes)
        self.link_free_at = end
        self.link_log.append((start, end, nbytes))
        req._chunks_left -= 1
        if req._chunks_left == 0:
            req.kv_ready_s = end
            self.push(end, _KV_READY, req)

    def _transmit_end(self, start: float, nbytes: float) -> float:
        if self.schedule is None:
            return start + nbytes * 8 / (self.dep.link_gbps * 1e9)
        # Piecewise-constant capacity: exact for a StepSchedule; any other callable is read
        # every _GENERIC_SCHEDULE_STEP_S. Never past max_time (the link may stay down).
        t, left = start, nbytes
        step = self.schedule if isinstance(self.schedule, StepSchedule) else None
        while t <= self.max_time:
            rate = self.capacity(t) * 1e9 / 8
            seg_end = step.next_change(t) if step is not None else t + _GENERIC_SCHEDULE_STEP_S
            if rate > 0 and left <= rate * (seg_end - t):
                return t + left / rate
            if math.isinf(seg_end):
                break  # down for good
            left -= rate * (seg_end - t)
            t = seg_end
        return math.inf

    def _enqueue_decode(self, req: SimRequest) -> None:
        self.decode.queue.append(req)
        self._start_decode()

    def _start_decode(self) -> None:
        while self.decode.queue and self.decode.busy < self.decode.servers:
            req = self.decode.queue.popleft()
            self.decode.busy += 1
            dur = req.output_tokens * self.t_decode
            self.decode.busy_time += dur
            req.decode_start_s = self.now
            req.first_token_s = self.now + self.t_decode
            self.push(self.now + dur, _DECODE_DONE, req)
            if self.on_first_token is not None:
                self.on_first_token(req)


# --------------------------------------------------------------------------- runs


def simulate(
    profile: Profile,
    deployment: str,
    *,
    n_requests: int = 4000,
    seed: int = 0,
    arrival_rate: float | StepSchedule | None = None,
    requests: Sequence[Mapping[str, Any]] | None = None,
    t_tokens: float | None = None,
    n_prefill_local: int | None = None,
    policy: Policy | None = None,
    link_schedule: Callable[[float], float] | None = None,
    population: int | None = None,
    max_time_s: float = 1e6,
) -> SimResult:
    """Run one deployment.

    With ``arrival_rate`` (req/s, or a StepSchedule for bursts) or explicit ``requests``:
    an open-loop run, reporting TTFT and egress at that load. With neither: a *capacity* run,
    a saturated closed loop in which ``population`` requests are always waiting or in
    prefill/transfer (a new one arrives whenever one starts decoding); its steady completion
    rate is the deployment's sustainable throughput with every request decoding at the SLO.
    t and N_p default to the planner's optimum; ``policy`` defaults to the deployment's routing.
    """
    dep = profile.deployment(deployment)
    if not 1 <= n_requests <= MAX_REQUESTS:
        raise PlanError(f"n_requests: must be in 1..{MAX_REQUESTS}, got {n_requests}")
    if not (math.isfinite(max_time_s) and max_time_s > 0):
        raise PlanError(f"max_time_s: must be > 0, got {max_time_s}")
    if t_tokens is None or n_prefill_local is None:
        best = optimize(profile, deployment)
        t_tokens = best.t_tokens if t_tokens is None else t_tokens
        n_prefill_local = best.n_prefill_local if n_prefill_local is None else n_prefill_local
    lengths = profile.workload.lengths
    if not lengths.min_incremental <= t_tokens <= lengths.max_tokens:
        raise PlanError(
            f"t_tokens: {t_tokens:g} is outside {lengths.min_incremental:g}..{lengths.max_tokens:g}"
        )
    if not 0 <= n_prefill_local < dep.local_instances:
        raise PlanError(
            f"n_prefill_local: {n_prefill_local} out of range 0..{dep.local_instances - 1}"
        )
    chunks = int(profile.sim.get("pipeline_chunks", 16))
    if chunks < 1:
        raise PlanError(f"sim.pipeline_chunks: must be >= 1, got {chunks}")
    sim = _Simulator(
        profile,
        dep,
        t_tokens=t_tokens,
        n_prefill_local=n_prefill_local,
        policy=policy or default_policy(dep, t_tokens),
        link_schedule=link_schedule,
        chunks=chunks,
        max_time_s=max_time_s,
    )
    rng = np.random.default_rng(seed)
    out_tokens = profile.workload.output_tokens
    if requests is not None:
        reqs = requests_from_records(requests, out_tokens)[:n_requests]
        mode, rate = "open", None
    else:
        prompt, cached = lengths.sample(rng, n_requests)
        reqs = [
            SimRequest(i, 0.0, int(p), int(c), out_tokens)
            for i, (p, c) in enumerate(zip(prompt, cached, strict=True))
        ]
        if arrival_rate is None:
            mode, rate = "capacity", None
        else:
            mode = "open"
            sched = (
                arrival_rate
                if isinstance(arrival_rate, StepSchedule)
                else StepSchedule.constant(_rate(arrival_rate), "arrival_rate")
            )
            rate = None if isinstance(arrival_rate, StepSchedule) else float(arrival_rate)
            for req, t in zip(reqs, _poisson_times(rng, sched, n_requests), strict=True):
                req.arrival_s = t
    if mode == "capacity":
        pop = population or _default_population(sim, n_requests)
        if not 1 <= pop <= n_requests:
            raise PlanError(f"population: must be in 1..{n_requests}, got {pop}")
        it = iter(reqs[pop:])

        def refill(_: SimRequest) -> None:
            nxt = next(it, None)
            if nxt is not None:
                nxt.arrival_s = sim.now
                sim.push(sim.now, _ARRIVE, nxt)

        sim.on_first_token = refill
        for req in reqs[:pop]:
            sim.push(0.0, _ARRIVE, req)
    else:
        for req in reqs:
            sim.push(req.arrival_s, _ARRIVE, req)
    sim.run()
    return _summarise(
        sim, reqs, mode, seed, rate, n_prefill_local, pop if mode == "capacity" else 0
    )


def _rate(v: float) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise PlanError(f"arrival_rate: must be > 0 req/s, got {v!r}")
    return float(v)


def _poisson_times(rng: np.random.Generator, sched: StepSchedule, n: int) -> np.ndarray:
    """n arrival times of a Poisson process whose rate follows a step schedule."""
    out = np.empty(n)
    t = 0.0
    for i in range(n):
        while True:
            r = sched(t)
            nxt = sched.next_change(t)
            gap = rng.exponential(1.0 / r) if r > 0 else math.inf
            if t + gap < nxt:
                t += gap
                break
            if math.isinf(nxt):
                raise PlanError(f"arrival_rate: rate is 0 from t={t:g} on; cannot place arrivals")
            t = nxt  # memoryless: restart the draw in the next step
        out[i] = t
    return out


def _default_population(sim: _Simulator, n: int) -> int:
    servers = sim.remote.servers + sim.local.servers
    return max(1, min(max(200, 24 * servers), n // 5))


def _summarise(
    sim: _Simulator,
    reqs: list[SimRequest],
    mode: str,
    seed: int,
    rate: float | None,
    n_p: int,
    population: int,
) -> SimResult:
    done = [r for r in reqs if not math.isnan(r.first_token_s)]
    ttft = np.array([r.first_token_s - r.arrival_s for r in done]) if done else np.array([np.nan])
    first = np.sort(np.array([r.first_token_s for r in done]))
    if mode == "capacity" and len(first) >= 10:
        # steady window: after warm-up, before the closed loop stops refilling
        k1 = int(0.2 * len(reqs))
        k2 = min(len(first), len(reqs) - population) - 1
        k1 = min(k1, max(k2 - 2, 0))
        span = first[k2] - first[k1]
        throughput = (k2 - k1) / span if span > 0 else math.nan
        t0, t1 = first[k1], first[k2]
    else:
        t0 = min((r.arrival_s for r in reqs), default=0.0)
        t1 = float(first[-1]) if len(first) else t0
        throughput = len(done) / (t1 - t0) if t1 > t0 else math.nan
    mean_e, peak_e = _egress(sim.link_log, t0, t1)
    routed = [r for r in reqs if r.route]
    horizon = max(sim.now, 1e-9)
    util = {
        "remote_prefill": sim.remote.busy_time / (sim.remote.servers * horizon)
        if sim.remote.servers
        else 0.0,
        "local_prefill": sim.local.busy_time / (sim.local.servers * horizon)
        if sim.local.servers
        else 0.0,
        "decode": sim.decode.busy_time / (sim.decode.servers * horizon)
        if sim.decode.servers
        else 0.0,
    }
    return SimResult(
        deployment=sim.dep.name,
        mode=mode,
        seed=seed,
        requests=len(reqs),
        completed=len(done),
        arrival_rate=rate,
        throughput_rps=float(throughput),
        offload_fraction=sum(r.route == "remote" for r in routed) / max(len(routed), 1),
        t_tokens=sim.t_tokens,
        n_prefill_remote=sim.remote.servers,
        n_prefill_local=n_p,
        n_decode=sim.dep.local_instances - n_p,
        ttft_mean_s=float(np.mean(ttft)),
        ttft_p50_s=float(np.percentile(ttft, 50)),
        ttft_p90_s=float(np.percentile(ttft, 90)),
        ttft_p99_s=float(np.percentile(ttft, 99)),
        egress_mean_gbps=mean_e,
        egress_peak_gbps=peak_e,
        utilization=util,
        sim_time_s=sim.now,
        truncated=sim.truncated,
    )


def _egress(
    log: list[tuple[float, float, float]], t0: float, t1: float, bin_s: float = 1.0
) -> tuple[float, float]:
    """Mean Gbit/s over [t0, t1] and the peak over 1-s bins. The link sends its FIFO one
    chunk at a time, so bytes sent so far is a piecewise-linear function of time."""
    if not log or not t1 > t0:
        return 0.0, 0.0
    arr = np.array([e for e in log if math.isfinite(e[1])])
    if arr.size == 0:
        return 0.0, 0.0
    starts, ends, nbytes = arr[:, 0], arr[:, 1], arr[:, 2]
    cum = np.cumsum(nbytes)
    knots_t = np.empty(2 * len(arr))
    knots_b = np.empty(2 * len(arr))
    knots_t[0::2], knots_t[1::2] = starts, ends
    knots_b[0::2], knots_b[1::2] = cum - nbytes, cum

    def sent(t: np.ndarray | float) -> np.ndarray | np.float64:
        return np.interp(t, knots_t, knots_b, left=0.0, right=float(cum[-1]))

    mean = float(sent(t1) - sent(t0)) * 8 / 1e9 / (t1 - t0)
    edges = np.arange(math.floor(starts[0]), math.ceil(ends[-1]) + bin_s, bin_s)
    peak = float(np.max(np.diff(sent(edges)))) * 8 / 1e9 / bin_s if len(edges) > 1 else 0.0
    return mean, peak


# --------------------------------------------------------------------------- planner check


@dataclass(frozen=True)
class DeploymentCheck:
    """A deployment simulated at the planner's settings: saturated capacity vs Λ_max, plus
    TTFT and egress at a reference arrival rate."""

    deployment: str
    planner: OperatingPoint
    capacity: SimResult
    reference: SimResult

    @property
    def throughput_vs_planner(self) -> float:
        """Relative gap of the simulated capacity to the planner's Λ_max."""
        return self.capacity.throughput_rps / self.planner.lambda_max - 1.0


def reference_rate(profile: Profile) -> float:
    """Half the smallest planned Λ_max of the profile's deployments: a load every deployment
    carries, so their TTFTs compare like for like."""
    return 0.5 * min(optimize(profile, n).lambda_max for n in profile.deployments)


def check_deployments(
    profile: Profile,
    names: Sequence[str],
    *,
    n_requests: int = 4000,
    seed: int = 0,
    rate: float | None = None,
    requests: Sequence[Mapping[str, Any]] | None = None,
) -> list[DeploymentCheck]:
    """Simulate each named deployment at its planned (t, N_p)."""
    ref = reference_rate(profile) if rate is None and requests is None else rate
    out = []
    for name in names:
        point = optimize(profile, name)
        kw: dict[str, Any] = {
            "n_requests": n_requests,
            "seed": seed,
            "t_tokens": point.t_tokens,
            "n_prefill_local": point.n_prefill_local,
        }
        cap = simulate(profile, name, **kw)
        if requests is not None:
            refr = simulate(profile, name, requests=requests, **kw)
        else:
            refr = simulate(profile, name, arrival_rate=ref, **kw)
        out.append(DeploymentCheck(name, point, cap, refr))
    return out
