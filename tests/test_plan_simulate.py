"""kvship.plan.simulate: the discrete-event simulator against the planner, and its inputs."""

from __future__ import annotations

import argparse
import json
import tomllib
from importlib import resources
from typing import Any

import numpy as np
import pytest

from kvship.plan import (
    PlanError,
    SimRequest,
    SimState,
    StepSchedule,
    load_profile,
    optimize,
    parse_profile,
    simulate,
)
from kvship.plan.command import add_plan_parser, add_simulate_parser
from kvship.plan.simulate import check_deployments, reference_rate, requests_from_records

CASE = "prfaas-case-study"
N = 1500  # requests per run: enough for a steady window, small enough to stay fast


@pytest.fixture(scope="module")
def prof():
    return load_profile(CASE)


@pytest.fixture(scope="module")
def checks(prof):
    return {
        c.deployment: c
        for c in check_deployments(prof, list(prof.deployments), n_requests=N, seed=0)
    }


def run_cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kvship")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_plan_parser(sub)
    add_simulate_parser(sub)
    args = ap.parse_args(argv)
    return args.func(args)


def test_simulated_capacity_agrees_with_planner(checks) -> None:
    for name, c in checks.items():
        assert abs(c.throughput_vs_planner) < 0.10, (name, c.capacity.throughput_rps)
        assert c.capacity.completed == N and not c.capacity.truncated


def test_ttft_for_all_three_deployments(checks) -> None:
    for c in checks.values():
        r = c.reference
        assert r.completed == N
        assert 0 < r.ttft_mean_s <= r.ttft_p90_s <= r.ttft_p99_s
        assert r.throughput_rps == pytest.approx(r.arrival_rate, rel=0.15)
    # PrfaaS answers faster than the homogeneous H20 deployment at the same load
    assert checks["prfaas"].reference.ttft_mean_s < checks["homogeneous"].reference.ttft_mean_s
    assert checks["prfaas"].reference.ttft_p90_s < checks["homogeneous"].reference.ttft_p90_s


def test_egress_matches_planner(checks) -> None:
    c = checks["prfaas"]
    assert c.capacity.egress_mean_gbps == pytest.approx(c.planner.egress_gbps, rel=0.15)
    assert c.capacity.egress_mean_gbps <= c.capacity.egress_peak_gbps <= 100 + 1e-6
    assert c.capacity.offload_fraction == pytest.approx(c.planner.offload_fraction, abs=0.05)
    assert checks["homogeneous"].capacity.egress_mean_gbps == 0.0


def test_seeded_runs_are_deterministic(prof) -> None:
    a = simulate(prof, "prfaas", n_requests=300, seed=7, arrival_rate=2.0)
    b = simulate(prof, "prfaas", n_requests=300, seed=7, arrival_rate=2.0)
    c = simulate(prof, "prfaas", n_requests=300, seed=8, arrival_rate=2.0)
    assert a == b
    assert a.ttft_mean_s != c.ttft_mean_s


def test_link_drop_schedule_delays_remote_requests(prof) -> None:
    kw: dict[str, Any] = {"n_requests": 800, "seed": 3, "arrival_rate": 2.0}
    base = simulate(prof, "prfaas", **kw)
    drop = simulate(
        prof, "prfaas", link_schedule=StepSchedule(((0, 100), (60, 2), (180, 100))), **kw
    )
    down = simulate(
        prof, "prfaas", link_schedule=StepSchedule(((0, 100), (60, 0), (90, 100))), **kw
    )
    generic = simulate(
        prof, "prfaas", link_schedule=lambda t: 2.0 if 60 <= t < 180 else 100.0, **kw
    )
    assert drop.ttft_p99_s > base.ttft_p99_s
    assert down.completed == drop.completed == 800
    assert generic.ttft_mean_s == pytest.approx(drop.ttft_mean_s, rel=0.05)
    dead = simulate(prof, "prfaas", link_schedule=StepSchedule(((0, 100), (30, 0))), **kw)
    assert dead.completed < 800  # remote KV never arrives; the run still ends


def test_bursty_arrivals_raise_tail_latency(prof) -> None:
    steady = simulate(prof, "prfaas", n_requests=800, seed=1, arrival_rate=2.0)
    burst = simulate(
        prof,
        "prfaas",
        n_requests=800,
        seed=1,
        arrival_rate=StepSchedule(((0, 2.0), (60, 8.0), (90, 2.0))),
    )
    assert burst.ttft_p99_s > steady.ttft_p99_s


def test_policy_is_pluggable(prof) -> None:
    seen: list[tuple[int, float]] = []

    def only_tiny_local(request: SimRequest, state: SimState) -> str:
        seen.append((request.incremental_tokens, state.link_gbps))
        assert state.remote_queue >= 0 and state.link_backlog_s >= 0
        return "local" if request.incremental_tokens < 4096 else "remote"

    r = simulate(prof, "prfaas", n_requests=200, seed=0, arrival_rate=1.0, policy=only_tiny_local)
    assert len(seen) == 200 and all(g == 100.0 for _, g in seen)
    assert r.offload_fraction > 0.8
    with pytest.raises(PlanError, match="policy: returned 'elsewhere'"):
        simulate(
            prof, "prfaas", n_requests=10, arrival_rate=1.0, policy=lambda req, st: "elsewhere"
        )
    with pytest.raises(PlanError, match="no remote prefill instances"):
        simulate(
            prof, "homogeneous", n_requests=10, arrival_rate=1.0, policy=lambda req, st: "remote"
        )


def test_prefix_cache_hits_cut_offload_and_egress(prof) -> None:
    text = resources.files("kvship.plan").joinpath("profiles", f"{CASE}.toml").read_text()
    data = tomllib.loads(text)
    data["workload"].update(cache_hit_prob=0.5, cache_hit_fraction=0.8)
    cached = parse_profile(data)
    t = optimize(prof, "prfaas").t_tokens
    a = simulate(
        prof, "prfaas", n_requests=600, seed=2, arrival_rate=1.5, t_tokens=t, n_prefill_local=3
    )
    b = simulate(
        cached, "prfaas", n_requests=600, seed=2, arrival_rate=1.5, t_tokens=t, n_prefill_local=3
    )
    assert b.offload_fraction < a.offload_fraction
    assert b.egress_mean_gbps < a.egress_mean_gbps
    assert b.ttft_mean_s < a.ttft_mean_s
    assert optimize(cached, "prfaas").lambda_max > optimize(prof, "prfaas").lambda_max


def test_explicit_requests_and_missing_lengths(prof) -> None:
    recs = [
        {"prompt_tokens": 50_000, "arrival_s": 0.0},
        {"input_tokens": 2_000, "cached_tokens": 1_000, "arrival_s": 0.5},
    ]
    r = simulate(prof, "prfaas", requests=recs)
    assert r.completed == 2 and r.offload_fraction == 0.5
    with pytest.raises(PlanError, match=r"requests\[1\]\.prompt_tokens: missing"):
        requests_from_records([{"prompt_tokens": 10}, {"arrival_s": 1.0}], 1024)
    with pytest.raises(PlanError, match=r"requests\[0\]\.prompt_tokens: missing"):
        requests_from_records([{"prompt_tokens": None}], 1024)
    with pytest.raises(PlanError, match=r"requests\[0\]\.cached_tokens"):
        requests_from_records([{"prompt_tokens": 10, "cached_tokens": 10}], 1024)
    with pytest.raises(PlanError, match=r"requests\[1\]\.arrival_s"):
        requests_from_records(
            [{"prompt_tokens": 10, "arrival_s": 5}, {"prompt_tokens": 10, "arrival_s": 1}], 1024
        )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"arrival_rate": -1.0}, "arrival_rate"),
        ({"n_requests": 0}, "n_requests"),
        ({"t_tokens": 500_000.0, "n_prefill_local": 3}, "t_tokens"),
        ({"n_prefill_local": 8, "t_tokens": 19_000.0}, "n_prefill_local"),
        ({"link_schedule": StepSchedule(((0, 100),)), "max_time_s": -1}, "max_time_s"),
    ],
)
def test_bad_simulation_parameters(prof, kwargs, field: str) -> None:
    with pytest.raises(PlanError, match=f"^{field}"):
        simulate(prof, "prfaas", **{"n_requests": 10, **kwargs})


def test_step_schedule_validation() -> None:
    with pytest.raises(PlanError, match="must start at time 0"):
        StepSchedule(((5, 1.0),))
    with pytest.raises(PlanError, match=r"link\[1\]: negative"):
        StepSchedule(((0, 1.0), (5, -1.0)), "link")
    with pytest.raises(PlanError, match="not after"):
        StepSchedule(((0, 1.0), (0, 2.0)))
    s = StepSchedule(((0, 1.0), (10, 2.0)))
    assert s(9.99) == 1.0 and s(10) == 2.0 and s.next_change(10) == np.inf


def test_runs_are_bounded_in_time(prof) -> None:
    r = simulate(prof, "prfaas", n_requests=500, seed=0, arrival_rate=1.0, max_time_s=60.0)
    assert r.truncated and r.completed < 500 and r.sim_time_s <= 60.0


def test_simulate_cli_json(capsys, tmp_path) -> None:
    assert run_cli(["simulate", "--deployment", "homogeneous", "--requests", "300", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    dep = out["deployments"]["homogeneous"]
    for key in (
        "planner_lambda_max",
        "throughput_rps",
        "ttft_mean_s",
        "ttft_p90_s",
        "egress_mean_gbps",
        "egress_peak_gbps",
    ):
        assert isinstance(dep[key], float), key
    assert out["reference_rate"] == pytest.approx(reference_rate(load_profile(CASE)))
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"prompt_tokens": 1000}\n{"arrival_s": 2}\n')
    assert (
        run_cli(["simulate", "--deployment", "prfaas", "--requests", "50", "--trace", str(trace)])
        == 2
    )
    assert "requests[1].prompt_tokens: missing" in capsys.readouterr().err
    assert run_cli(["simulate", "--deployment", "bogus", "--requests", "50"]) == 2
    assert "deployment: unknown 'bogus'" in capsys.readouterr().err
