"""The PrfaaS router: hand-made decisions, bad input, and the link-drop scenario."""

from __future__ import annotations

import json

import pytest

from kvship.plan import load_profile, optimize
from kvship.router import LinkView, RemoteView, RouteError, Router, RouteRequest
from kvship.router.command import add_route_parser
from kvship.router.retune import EmpiricalPlanner
from kvship.router.scenario import run_link_drop

NOW = 1000.0
CAP = 12.5e9  # 100 Gbit/s in bytes/s


def figures(util: float = 0.1, queue_wait_s: float = 0.0, at: float = NOW) -> dict:
    return {
        "rate_limit_Bps": CAP,
        "wire_Bps": util * CAP,
        "queue_wait_s": queue_wait_s,
        "queued_bytes": 0,
        "rtt_s": 0.02,
        "connections": 4,
        "at": at,
    }


def link(**kw: float) -> LinkView:
    return LinkView.from_figures(figures(**kw), NOW)


@pytest.fixture
def router() -> Router:
    return Router(20_000)


def test_long_uncached_goes_remote(router: Router) -> None:
    d = router.decide(RouteRequest(50_000), link(), RemoteView(0))
    assert d.target == "remote" and d.incremental_tokens == 50_000
    assert "l=50000 > t=20000" in d.reason


def test_short_goes_local(router: Router) -> None:
    d = router.decide(RouteRequest(5_000), link(), RemoteView(0))
    assert d.target == "local" and "<=" in d.reason


def test_long_but_locally_cached_goes_local(router: Router) -> None:
    d = router.decide(
        RouteRequest(50_000, local_cached_tokens=45_000), link(util=0.8), RemoteView()
    )
    assert d.target == "local" and d.incremental_tokens == 5_000
    assert "local prefix (bandwidth scarce)" in d.reason and not d.ship_prefix_from_remote


def test_plentiful_bandwidth_uses_remote_cache(router: Router) -> None:
    req = RouteRequest(60_000, local_cached_tokens=0, remote_cached_tokens=30_000)
    d = router.decide(req, link(util=0.1), RemoteView())
    assert d.target == "remote" and d.ship_prefix_from_remote
    assert d.incremental_tokens == 30_000 and "best prefix" in d.reason
    assert "ship remote prefix" in d.reason


def test_scarce_bandwidth_ignores_remote_cache(router: Router) -> None:
    req = RouteRequest(30_000, local_cached_tokens=15_000, remote_cached_tokens=29_000)
    d = router.decide(req, link(util=0.8), RemoteView())
    assert d.target == "local" and not d.ship_prefix_from_remote
    assert d.incremental_tokens == 15_000


def test_egress_near_cap_backs_off(router: Router) -> None:
    d = router.decide(RouteRequest(30_000), link(util=0.95, queue_wait_s=90.0), RemoteView())
    assert d.target == "local" and d.backoff == pytest.approx(1.5)
    assert "back-off x1.50" in d.reason and "egress at 95%" in d.reason
    free = router.decide(RouteRequest(30_000), link(util=0.95, queue_wait_s=1.0), RemoteView())
    assert free.target == "remote" and free.backoff == 1.0


def test_remote_queue_backs_off_then_goes_local(router: Router) -> None:
    d = router.decide(RouteRequest(30_000), link(), RemoteView(queue_depth=32))
    assert d.target == "local" and "remote queue 32 > 16" in d.reason
    d = router.decide(RouteRequest(100_000), link(), RemoteView(queue_depth=64))
    assert d.target == "local" and d.reason.startswith("remote queue deep")


@pytest.mark.parametrize(
    ("view", "why"),
    [
        (LinkView.from_figures(None, NOW), "no link figures"),
        (LinkView.from_figures(figures(at=NOW - 30), NOW), "30.0 s old"),
        (LinkView.from_figures({**figures(), "at": None}, NOW), "no timestamp"),
        (LinkView.from_figures({"links": []}, NOW), "no peer link"),
        (LinkView.from_figures({**figures(), "connections": 0}, NOW), "no open connection"),
    ],
)
def test_missing_or_stale_figures_decide_local(router: Router, view: LinkView, why: str) -> None:
    d = router.decide(RouteRequest(100_000), view, RemoteView())
    assert d.target == "local" and d.reason.startswith("remote unreachable") and why in d.reason


def test_unreachable_remote_control_plane(router: Router) -> None:
    d = router.decide(RouteRequest(100_000), link(), RemoteView(reachable=False))
    assert d.target == "local" and "remote unreachable" in d.reason


def test_missing_length_is_a_clear_error(router: Router) -> None:
    with pytest.raises(RouteError, match=r"^request\.prompt_tokens: missing"):
        router.decide_dict({"local_cached_tokens": 3})
    with pytest.raises(RouteError, match=r"^request\.prompt_tokens: missing"):
        RouteRequest(None)  # type: ignore[arg-type]
    with pytest.raises(RouteError, match="exceeds the prompt"):
        RouteRequest(10, local_cached_tokens=11)
    with pytest.raises(RouteError, match="must be an integer"):
        RouteRequest(-5)


def test_decide_dict_is_json_in_json_out(router: Router) -> None:
    out = router.decide_dict(
        {"token_ids": list(range(40_000)), "link": figures(), "remote": {"queue_depth": 0}}, NOW
    )
    assert json.loads(json.dumps(out))["target"] == "remote"
    assert router.decide_dict({"prompt_tokens": 40_000}, NOW)["target"] == "local"


def test_retune_tracks_link_capacity() -> None:
    profile = load_profile("prfaas-case-study")
    point = optimize(profile, "prfaas")
    tuner = EmpiricalPlanner(profile, "prfaas", point.n_prefill_local)
    prompt, _ = profile.workload.lengths.sample(__import__("numpy").random.default_rng(0), 4096)
    t100 = tuner.best(prompt, 100e9 / 8).t_tokens
    t8 = tuner.best(prompt, 8e9 / 8).t_tokens
    assert t100 == pytest.approx(point.t_tokens, rel=0.1)  # empirical ≈ fitted planner
    assert t8 > 1.15 * t100  # a slower link offloads only longer prompts
    r = Router(point.t_tokens, tuner=tuner, retune_every=10_000, retune_min_samples=256)
    for n in prompt[:300]:
        r.decide(RouteRequest(int(n)), link(util=0.2), RemoteView())
    slow = {**figures(util=0.2), "rate_limit_Bps": 1e9}
    r.decide(RouteRequest(1000), LinkView.from_figures(slow, NOW), RemoteView())
    assert r.last_tune is not None and r.last_tune.link_Bps == 1e9
    assert r.threshold_tokens > t100


def test_route_cli_json(tmp_path, capsys) -> None:
    import argparse

    f = tmp_path / "links.json"
    f.write_text(json.dumps({"links": [{k: v for k, v in figures().items() if k != "at"}]}))
    parser = argparse.ArgumentParser()
    add_route_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["route", "--prompt-tokens", "60000", "--links-json", str(f), "--json"]
    )
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target"] == "remote" and out["reason"]
    args = parser.parse_args(["route", "--prompt-tokens", "60000"])
    assert args.func(args) == 0
    assert "remote unreachable" in capsys.readouterr().out


def test_link_drop_adaptive_beats_fixed_t() -> None:
    out = run_link_drop("prfaas-case-study", seed=0, requests=4000)
    r = out["ratios"]
    assert r["adaptive_vs_optimum"] >= 0.9
    assert r["fixed_vs_optimum"] < r["adaptive_vs_optimum"] - 0.05
    assert out["runs"]["adaptive"]["final_t_tokens"] > out["planner"]["before"]["t_tokens"]


def test_the_link_budget_sends_long_requests_local_as_the_cap_falls() -> None:
    """With a KV size and max_link_wait_s, a long request goes remote only while its KV,
    behind what the link already queues, fits the bound at the cap in force."""
    kv_per_token = 50_000.0  # bytes
    router = Router(1_000, kv_bytes=kv_per_token, max_link_wait_s=3.0)
    request = RouteRequest(2_000)  # 100 MB of KV
    fast = LinkView(True, cap_Bps=100e6, queued_bytes=0)
    assert router.decide(request, fast, RemoteView(0)).target == "remote"  # 1.0 s
    queued = LinkView(True, cap_Bps=100e6, queued_bytes=250_000_000)  # 3.5 s behind the queue
    d = router.decide(request, queued, RemoteView(0))
    assert d.target == "local" and d.reason.startswith("link would queue 3.5 s > 3 s")
    slow = LinkView(True, cap_Bps=20e6, queued_bytes=0)  # the cap fell: 5 s
    d = router.decide(request, slow, RemoteView(0))
    assert d.target == "local" and "cap 20.0 MB/s" in d.reason
    assert "l=2000 > t=1000" in d.reason  # the length verdict is still shown
    short = RouteRequest(500)
    assert router.decide(short, slow, RemoteView(0)).target == "local"
    assert not router.decide(short, slow, RemoteView(0)).reason.startswith("link would")
    # Off by default, and no KV size means no budget either.
    assert Router(1_000, kv_bytes=kv_per_token).decide(request, slow, RemoteView(0)).target == (
        "remote"
    )
    assert Router(1_000, max_link_wait_s=3.0).decide(request, slow, RemoteView(0)).target == (
        "remote"
    )
    with pytest.raises(RouteError, match="max_link_wait_s"):
        Router(1_000, max_link_wait_s=0)
