"""The live PrfaaS routing policy: prefill a request locally or in the remote cluster.

Rule (every decision returns its reason):

1. No usable link figures (none, stale, link down) or remote control plane unreachable
   -> **local** ("remote unreachable: ...").
2. Bandwidth *scarce* (utilisation = wire_Bps / cap >= ``scarce_utilisation``, 0.7) -> judge
   the incremental length l = prompt - local cached prefix. *Plentiful* -> l = prompt - the
   best cached prefix anywhere; if that prefix sits remotely, its KV is shipped across
   (``ship_prefix_from_remote``).
3. Remote queue depth >= ``remote_queue_hard`` -> **local** ("remote queue deep").
4. Back-off: the effective threshold is t · f with
   f_egress = queue_wait_s / ``queue_wait_target_s`` when utilisation >= ``busy_utilisation``
   (0.9) and chunks wait longer than the target (60 s: the link is at its cap *and* a queue
   builds; a shorter target over-reacts, since a fully used link always queues a little),
   f_remote = depth / ``remote_queue_soft`` when the remote queue exceeds the soft limit,
   f = min(``max_backoff`` (2), f_egress · f_remote) (each factor >= 1).
5. **remote** iff l > t · f, else **local**.
6. Link budget (``max_link_wait_s``, off by default): a remote verdict turns **local**
   when the request's KV (``kv_bytes(l)``) behind the link's queued bytes would take longer
   than the bound at the link's cap ("link would queue ..."); so as the cap falls, fewer
   long requests go remote and local prefill takes the overflow.

t itself is re-tuned (``retune.EmpiricalPlanner``) from a ring of recent incremental lengths
at the current link capacity every ``retune_every`` decisions and whenever the capacity moves
by more than ``retune_on_cap_change`` — amortised, so ``decide`` stays in the µs range.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kvship.router.retune import EmpiricalPlanner, Tuned

LOCAL, REMOTE = "local", "remote"


class RouteError(ValueError):
    """Bad routing input; the message starts with the offending field."""


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """One request: its prompt length (or token ids) and the cached prefix on each side."""

    prompt_tokens: int
    local_cached_tokens: int = 0
    remote_cached_tokens: int = 0

    def __post_init__(self) -> None:
        if self.prompt_tokens is None:
            raise RouteError(
                "request.prompt_tokens: missing (the request has no length; "
                "give prompt_tokens or token_ids)"
            )
        _check_int("request.prompt_tokens", self.prompt_tokens, 1)
        _check_int("request.local_cached_tokens", self.local_cached_tokens, 0)
        _check_int("request.remote_cached_tokens", self.remote_cached_tokens, 0)
        for name in ("local_cached_tokens", "remote_cached_tokens"):
            if getattr(self, name) > self.prompt_tokens:
                raise RouteError(
                    f"request.{name}: {getattr(self, name)} exceeds the prompt "
                    f"({self.prompt_tokens} tokens)"
                )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RouteRequest:
        """From JSON: ``prompt_tokens`` or ``token_ids`` (a list), cached counts optional."""
        if not isinstance(d, Mapping):
            raise RouteError(f"request: must be an object, got {type(d).__name__}")
        n = d.get("prompt_tokens")
        if n is None and d.get("token_ids") is not None:
            ids = d["token_ids"]
            if not isinstance(ids, Sequence) or isinstance(ids, str | bytes):
                raise RouteError(f"request.token_ids: must be a list, got {type(ids).__name__}")
            n = len(ids)
        if n is None:
            raise RouteError(
                "request.prompt_tokens: missing (the request has no length; "
                "give prompt_tokens or token_ids)"
            )
        return cls(n, d.get("local_cached_tokens", 0), d.get("remote_cached_tokens", 0))


@dataclass(frozen=True, slots=True)
class LinkView:
    """The egress link's figures as last read from the daemon (GET /v1/links), not fetched
    here. ``reachable`` is False when there are none, they are stale or the link is down."""

    reachable: bool
    why: str = ""
    cap_Bps: float | None = None
    wire_Bps: float = 0.0
    queue_wait_s: float = 0.0
    queued_bytes: int = 0
    rtt_s: float | None = None
    age_s: float = 0.0

    @classmethod
    def unreachable(cls, why: str) -> LinkView:
        return cls(False, why)

    @classmethod
    def from_figures(
        cls,
        d: Mapping[str, Any] | None,
        now: float | None = None,
        *,
        fetched_at: float | None = None,
        max_age_s: float = 5.0,
    ) -> LinkView:
        """Read a figures dict (``PeerLink.figures_json()``; a GET /v1/links body with one
        link also works). Its age comes from ``d["at"]`` (unix seconds) or ``fetched_at``;
        figures older than ``max_age_s`` or of unknown age count as unreachable."""
        if not d:
            return cls(False, "no link figures")
        if "links" in d:
            links = d["links"]
            if not links:
                return cls(False, "no link figures (daemon has no peer link)")
            d = links[0]
            assert d is not None
        at = d.get("at", fetched_at)
        if at is None:
            return cls(False, "link figures carry no timestamp")
        now = time.time() if now is None else now
        age = now - float(at)
        if age > max_age_s:
            return cls(False, f"link figures are {age:.1f} s old (> {max_age_s:g} s)")
        if d.get("connected") is False or d.get("connections") == 0:
            return cls(False, "peer link has no open connection", age_s=age)
        cap = d.get("rate_limit_Bps")
        return cls(
            True,
            "",
            float(cap) if cap is not None else None,
            float(d.get("wire_Bps") or 0.0),
            float(d.get("queue_wait_s") or 0.0),
            int(d.get("queued_bytes") or 0),
            None if d.get("rtt_s") is None else float(d["rtt_s"]),
            age,
        )


@dataclass(frozen=True, slots=True)
class RemoteView:
    """The remote prefill cluster as its control plane last reported it."""

    queue_depth: int = 0
    reachable: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> RemoteView:
        if d is None:
            return cls(0, True)  # no queue figure: judge by the link alone
        q = d.get("queue_depth", 0)
        _check_int("remote.queue_depth", q, 0)
        return cls(q, bool(d.get("reachable", True)))


@dataclass(frozen=True, slots=True)
class Decision:
    """Where to prefill, and why."""

    target: str
    reason: str
    incremental_tokens: int
    threshold_tokens: float
    ship_prefix_from_remote: bool = False
    effective_threshold_tokens: float = math.nan
    backoff: float = 1.0
    utilisation: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("effective_threshold_tokens", "threshold_tokens"):
            if not math.isfinite(d[k]):
                d[k] = None
        return d


# --------------------------------------------------------------------------- the router


class Router:
    """Per-request PrfaaS routing with back-off and an amortised threshold re-tune."""

    def __init__(
        self,
        threshold_tokens: float,
        *,
        egress_cap_Bps: float | None = None,
        kv_bytes: float | Callable[[float], float] | None = None,
        tuner: EmpiricalPlanner | None = None,
        scarce_utilisation: float = 0.7,
        busy_utilisation: float = 0.9,
        queue_wait_target_s: float = 60.0,
        remote_queue_soft: int = 16,
        remote_queue_hard: int = 64,
        max_backoff: float = 2.0,
        max_link_wait_s: float | None = None,
        window: int = 2048,
        retune_every: int = 256,
        retune_min_samples: int = 256,
        retune_on_cap_change: float = 0.1,
    ) -> None:
        if not (isinstance(threshold_tokens, int | float) and threshold_tokens > 0):
            raise RouteError(f"threshold_tokens: must be > 0, got {threshold_tokens!r}")
        if not 0 < scarce_utilisation <= busy_utilisation:
            raise RouteError("scarce_utilisation: must be in (0, busy_utilisation]")
        if not 0 < remote_queue_soft < remote_queue_hard:
            raise RouteError("remote_queue_soft: must be in (0, remote_queue_hard)")
        if max_backoff < 1 or queue_wait_target_s <= 0 or window < 2 or retune_every < 1:
            raise RouteError("max_backoff >= 1, queue_wait_target_s > 0, window >= 2 required")
        if max_link_wait_s is not None and not max_link_wait_s > 0:
            raise RouteError(f"max_link_wait_s: must be > 0, got {max_link_wait_s!r}")
        self.threshold_tokens = float(threshold_tokens)
        self.egress_cap_Bps = egress_cap_Bps
        self._kv = kv_bytes
        self.tuner = tuner
        self.scarce_utilisation = scarce_utilisation
        self.busy_utilisation = busy_utilisation
        self.queue_wait_target_s = queue_wait_target_s
        self.remote_queue_soft = remote_queue_soft
        self.remote_queue_hard = remote_queue_hard
        self.max_backoff = max_backoff
        self.max_link_wait_s = max_link_wait_s
        self.retune_every = retune_every
        self.retune_min_samples = max(2, min(retune_min_samples, window))
        self.retune_on_cap_change = retune_on_cap_change
        self._ring = [0] * window
        self._n = 0  # lengths seen so far (ring index = _n % window)
        self._since_tune = 0
        self._tuned_cap: float | None = None
        self.last_tune: Tuned | None = None

    # -- re-tuning ---------------------------------------------------------------

    def recent_lengths(self) -> list[int]:
        """The bounded window of recent incremental lengths (oldest first not guaranteed)."""
        return self._ring[: min(self._n, len(self._ring))]

    def retune(self, cap_Bps: float) -> Tuned | None:
        """Re-compute t from the recent lengths at this capacity (no-op without a tuner or
        with too few samples). Called by ``decide`` on schedule; callable on demand."""
        self._since_tune = 0
        if self.tuner is None or min(self._n, len(self._ring)) < self.retune_min_samples:
            return None
        self._tuned_cap = cap_Bps
        self.last_tune = self.tuner.best(self.recent_lengths(), cap_Bps)
        self.threshold_tokens = self.last_tune.t_tokens
        return self.last_tune

    def kv_bytes(self, tokens: float) -> float | None:
        """Estimated KV bytes of ``tokens`` (None when no KV size was configured)."""
        kv = self._kv
        if kv is None:
            return None
        return kv(tokens) if callable(kv) else kv * tokens

    # -- the decision --------------------------------------------------------------

    def decide(self, request: RouteRequest, link: LinkView, remote: RemoteView) -> Decision:
        """Route one request (pure apart from the length ring and the amortised re-tune)."""
        prompt = request.prompt_tokens
        lc, rc = request.local_cached_tokens, request.remote_cached_tokens
        l_local = prompt - lc
        if not link.reachable:
            return self._local(l_local, f"remote unreachable: {link.why}")
        if not remote.reachable:
            return self._local(l_local, "remote unreachable: remote control plane did not answer")
        cap = link.cap_Bps if link.cap_Bps is not None else self.egress_cap_Bps
        if cap is None or cap <= 0:
            if cap is None:
                return self._local(l_local, "remote unreachable: link capacity unknown")
            return self._local(l_local, "remote unreachable: link capacity is 0")
        util = link.wire_Bps / cap
        scarce = util >= self.scarce_utilisation
        length = l_local if scarce else prompt - max(lc, rc)
        ship_prefix = not scarce and rc > lc
        # ring + amortised re-tune
        self._ring[self._n % len(self._ring)] = length
        self._n += 1
        self._since_tune += 1
        tuned = self._tuned_cap
        if self.tuner is not None and (
            self._since_tune >= self.retune_every
            or (tuned is not None and abs(cap - tuned) > self.retune_on_cap_change * tuned)
            or (tuned is None and self._n == self.retune_min_samples)
        ):
            self.retune(cap)
        t = self.threshold_tokens
        depth = remote.queue_depth
        if depth >= self.remote_queue_hard:
            return Decision(
                LOCAL,
                f"remote queue deep ({depth} >= {self.remote_queue_hard}): prefill locally",
                l_local,
                t,
                False,
                math.inf,
                self.max_backoff,
                util,
            )
        f = 1.0
        why = []
        qw = link.queue_wait_s
        if util >= self.busy_utilisation and qw > self.queue_wait_target_s:
            f = qw / self.queue_wait_target_s
            why.append(f"egress at {util:.0%} of cap, chunks wait {qw:.1f} s")
        if depth > self.remote_queue_soft:
            f *= depth / self.remote_queue_soft
            why.append(f"remote queue {depth} > {self.remote_queue_soft}")
        if f > self.max_backoff:
            f = self.max_backoff
        t_eff = t * f
        basis = "local prefix (bandwidth scarce)" if scarce else "best prefix (bandwidth plentiful)"
        if length > t_eff:
            target = REMOTE
            cmp = f"l={length} > t={t_eff:.0f}"
        else:
            target = LOCAL
            cmp = f"l={length} <= t={t_eff:.0f}"
        reason = f"{cmp} vs {basis}, link {util:.0%} used"
        wait = self._link_wait(length, link, cap) if target == REMOTE else None
        if wait is not None and self.max_link_wait_s is not None and wait > self.max_link_wait_s:
            # The request is long enough for remote, but its KV would wait on the link past
            # the bound: local prefill takes the overflow, so the link's queue stays bounded.
            target = LOCAL
            reason = (
                f"link would queue {wait:.1f} s > {self.max_link_wait_s:g} s "
                f"(cap {cap / 1e6:.1f} MB/s, {link.queued_bytes} B queued): prefill locally; "
                + reason
            )
        if why:
            reason += f"; back-off x{f:.2f}: " + ", ".join(why)
        if ship_prefix:
            reason += f"; ship remote prefix ({rc} > {lc} cached locally)"
        return Decision(target, reason, length, t, ship_prefix, t_eff, f, util)

    def _link_wait(self, length: int, link: LinkView, cap: float) -> float | None:
        """Seconds this request's KV would take through the link behind what is queued
        (None without a KV size)."""
        kv = self.kv_bytes(length)
        return None if kv is None else (link.queued_bytes + kv) / cap

    def _local(self, l_local: int, reason: str) -> Decision:
        t = self.threshold_tokens
        return Decision(LOCAL, reason, l_local, t, False, t, 1.0, None)

    # -- JSON face (for POST /v1/route and the CLI) ------------------------------------

    def decide_dict(self, body: Mapping[str, Any], now: float | None = None) -> dict[str, Any]:
        """JSON in, JSON out: ``{"prompt_tokens" | "token_ids", "local_cached_tokens",
        "remote_cached_tokens", "link": <figures, with "at">, "remote": {"queue_depth"}}``.
        Raises RouteError on a bad request; a missing link means 'decide local'."""
        if not isinstance(body, Mapping):
            raise RouteError(f"body: must be an object, got {type(body).__name__}")
        req = RouteRequest.from_dict(body)
        link = LinkView.from_figures(body.get("link"), now)
        remote = RemoteView.from_dict(body.get("remote"))
        return self.decide(req, link, remote).to_dict()


def _check_int(name: str, v: Any, minimum: int) -> None:
    if v is None:
        raise RouteError(f"{name}: missing")
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise RouteError(f"{name}: must be an integer >= {minimum}, got {v!r}")
