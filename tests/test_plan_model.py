"""kvship.plan: length distribution, profiles, throughput model, grid search, report, CLI."""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tomllib
from importlib import resources
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvship.plan import (
    LengthDistribution,
    PlanError,
    builtin_profiles,
    evaluate,
    load_profile,
    optimize,
    parse_profile,
    plan,
)
from kvship.plan.command import add_plan_parser, add_simulate_parser
from kvship.plan.model import make_curve, sweep
from kvship.plan.report import plan_table, plan_to_dict, plot_plan

CASE = "prfaas-case-study"


def case_dict() -> dict[str, Any]:
    text = resources.files("kvship.plan").joinpath("profiles", f"{CASE}.toml").read_text()
    return tomllib.loads(text)


@pytest.fixture(scope="module")
def case_plan():
    return plan(load_profile(CASE))


def run_cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kvship")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_plan_parser(sub)
    add_simulate_parser(sub)
    args = ap.parse_args(argv)
    return args.func(args)


# --------------------------------------------------------------------------- case study


def test_case_study_reproduces_published_table(case_plan) -> None:
    main = case_plan.main
    assert main.t_tokens == pytest.approx(19_400, rel=0.05)
    assert main.lambda_max == pytest.approx(3.24, rel=0.05)
    assert main.offload_fraction == pytest.approx(0.50, abs=0.03)
    assert (main.n_prefill_remote, main.n_prefill_local, main.n_decode) == (4, 3, 5)
    assert main.egress_gbps == pytest.approx(13.0, rel=0.20)
    assert main.theta_prfaas == pytest.approx(1.61, rel=0.05)
    assert main.theta_pd_p == pytest.approx(1.64, rel=0.05)
    assert main.theta_pd_d == pytest.approx(3.91, rel=0.05)
    homo, naive = case_plan.baselines["homogeneous"], case_plan.baselines["naive"]
    assert homo.lambda_max == pytest.approx(2.11, rel=0.05)
    assert (homo.n_prefill_local, homo.n_decode) == (9, 3)
    assert naive.lambda_max == pytest.approx(2.45, rel=0.05)
    assert (naive.n_prefill_remote, naive.n_decode) == (4, 8)
    assert naive.offload_fraction == 1.0 and homo.offload_fraction == 0.0


def test_plan_json_cli(capsys) -> None:
    assert run_cli(["plan", "--profile", CASE, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # exactly one JSON object
    for key in (
        "t_tokens",
        "offload_fraction",
        "lambda_max",
        "egress_gbps",
        "n_prefill_local",
        "n_decode",
    ):
        assert isinstance(out[key], int | float), key
    assert out["baselines"]["homogeneous"]["lambda_max"] == pytest.approx(2.11, rel=0.05)
    assert out["baselines"]["naive"]["lambda_max"] == pytest.approx(2.45, rel=0.05)
    assert out["published"]["prfaas"]["lambda_max"] == 3.24


def test_plan_table_cli(capsys) -> None:
    assert run_cli(["plan"]) == 0
    text = capsys.readouterr().out
    assert "Λ_max" in text and "homogeneous" in text and "[3.24]" in text


def test_optimum_balances_prefill_sides(case_plan) -> None:
    m = case_plan.main
    remote_side = m.theta_prfaas / m.offload_fraction
    local_side = m.theta_pd_p / (1 - m.offload_fraction)
    assert remote_side == pytest.approx(local_side, rel=1e-3)
    assert m.lambda_max == pytest.approx(min(remote_side, local_side, m.theta_pd_d))


def test_evaluate_matches_formulas_by_hand() -> None:
    prof = load_profile(CASE)
    pt = evaluate(prof, "prfaas", 19_400, 3)
    p, l_long, l_short = prof.workload.lengths.split(19_400.0)
    h200, h20 = prof.hardware["h200"], prof.hardware["h20"]
    th_r = min(4 / float(h200.prefill_s(l_long)), 100e9 / 8 / (float(h200.kv_mib(l_long)) * 2**20))
    th_p = 3 / float(h20.prefill_s(l_short))
    th_d = 5 * 20 / (1 / 40 * 1024)
    lam = min(th_r / p, th_p / (1 - p), th_d)
    assert pt.theta_prfaas == pytest.approx(th_r)
    assert pt.theta_pd_p == pytest.approx(th_p)
    assert pt.theta_pd_d == pytest.approx(th_d)
    assert pt.lambda_max == pytest.approx(lam)
    egress = lam * p * float(h200.kv_mib(l_long)) * 2**20 * 8 / 1e9
    assert pt.egress_gbps == pytest.approx(egress)


def test_splits_other_than_best_are_worse(case_plan) -> None:
    prof = load_profile(CASE)
    best = case_plan.main.lambda_max
    for n_p in range(1, 8):
        s = sweep(prof, prof.deployment("prfaas"), np.geomspace(200, 131072, 300), n_p)
        assert s["lambda"].max() <= best * (1 + 1e-6)


# --------------------------------------------------------------------------- distribution


def test_distribution_moments_agree_with_sampling() -> None:
    d = LengthDistribution(9.9, 1.0, 128, 131072)
    p, l_long, l_short = d.split(19_400.0)
    assert p * l_long + (1 - p) * l_short == pytest.approx(d.mean(), rel=1e-9)
    x, _ = d.sample(np.random.default_rng(1), 200_000)
    assert x.min() >= 128 and x.max() <= 131072
    assert (x > 19_400).mean() == pytest.approx(float(p), abs=0.005)
    assert x[x > 19_400].mean() == pytest.approx(float(l_long), rel=0.01)
    assert x.mean() == pytest.approx(d.mean(), rel=0.01)
    # median of the untruncated log-normal is e^mu; truncation at 128..128K barely moves it
    assert float(d.p_above(math.exp(9.9))) == pytest.approx(0.5, abs=0.02)


def test_distribution_cache_hits_shrink_incremental_length() -> None:
    d = LengthDistribution(9.9, 1.0, 128, 131072, cache_hit_prob=0.4, cache_hit_fraction=0.75)
    base = LengthDistribution(9.9, 1.0, 128, 131072)
    assert d.mean() == pytest.approx(base.mean() * (1 - 0.4 * 0.75), rel=1e-9)
    assert d.min_incremental == pytest.approx(32)
    assert float(d.p_above(19_400)) < float(base.p_above(19_400))
    prompt, cached = d.sample(np.random.default_rng(0), 50_000)
    assert (cached > 0).mean() == pytest.approx(0.4, abs=0.01)
    assert (prompt - cached).mean() == pytest.approx(d.mean(), rel=0.02)


@settings(max_examples=60, deadline=None)
@given(t=st.floats(min_value=129, max_value=131_000))
def test_conditional_means_bracket_the_threshold(t: float) -> None:
    d = _DIST
    p, l_long, l_short = (float(v) for v in d.split(t))
    assert 0 < p < 1
    assert l_short <= t * (1 + 1e-6) and l_long >= t * (1 - 1e-6)


_DIST = LengthDistribution(9.9, 1.0, 128, 131072)


# --------------------------------------------------------------------------- curves


def test_loglog_curve_hits_points_and_follows_power_law() -> None:
    c = make_curve("c", [1024, 8192, 32768, 131072], [0.44, 0.72, 1.84, 7.40], "loglog")
    assert np.allclose(c(np.array([1024, 8192, 32768, 131072])), [0.44, 0.72, 1.84, 7.40])
    mid = math.sqrt(32768 * 131072)  # geometric midpoint -> geometric mean of the values
    assert float(c(mid)) == pytest.approx(math.sqrt(1.84 * 7.40))
    assert 0 < float(c(128)) < 0.44  # extended below the first point along the first segment
    lin = make_curve("c", [1000, 2000], [1.0, 3.0], "linear")
    assert float(lin(1500)) == pytest.approx(2.0) and float(lin(3000)) == pytest.approx(5.0)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (
            lambda d: d["hardware"]["h200"].update(kv_mib=[190.8, 308.9, 701.3]),
            "hardware.h200.kv_mib",
        ),
        (
            lambda d: d["hardware"]["h200"].update(prefill_s=[0.44, 0.30, 1.84, 7.40]),
            "hardware.h200.prefill_s[1]",
        ),
        (
            lambda d: d["hardware"]["h200"].update(tokens=[1024, 1024, 32768, 131072]),
            "hardware.h200.tokens[1]",
        ),
        (lambda d: d["hardware"]["h200"].pop("prefill_s"), "hardware.h200.prefill_s"),
        (lambda d: d["hardware"]["h200"].update(tokens=[1024]), "hardware.h200.prefill_s"),
        (
            lambda d: d["deployments"]["prfaas"].update(link_gbps=-100),
            "deployments.prfaas.link_gbps",
        ),
        (
            lambda d: d["deployments"]["prfaas"].update(remote_instances=-4),
            "deployments.prfaas.remote_instances",
        ),
        (lambda d: d["workload"].update(decode_tokens_per_s=-40), "workload.decode_tokens_per_s"),
        (lambda d: d["workload"].update(sigma=0), "workload.sigma"),
        (lambda d: d["workload"].pop("mu"), "workload.mu"),
        (lambda d: d["hardware"]["h20"].update(decode_batch=-1), "hardware.h20.decode_batch"),
        (
            lambda d: d["deployments"]["prfaas"].update(t_tokens=200_000),
            "deployments.prfaas.t_tokens",
        ),
        (lambda d: d["deployments"]["prfaas"].update(remote="h100"), "deployments.prfaas.remote"),
        (
            lambda d: d["hardware"]["h200"].update(interpolation="cubic"),
            "hardware.h200.interpolation",
        ),
        (lambda d: d.pop("workload"), "workload"),
    ],
)
def test_bad_profiles_name_the_field(edit, field: str) -> None:
    data = copy.deepcopy(case_dict())
    edit(data)
    with pytest.raises(PlanError) as err:
        parse_profile(data)
    assert str(err.value).startswith(field), str(err.value)
    assert isinstance(err.value, ValueError)


def test_threshold_beyond_max_length_is_rejected() -> None:
    prof = load_profile(CASE)
    with pytest.raises(PlanError, match=r"t_tokens: 200000 is beyond the max length 131072"):
        evaluate(prof, "prfaas", 200_000, 3)
    with pytest.raises(PlanError, match="n_prefill_local"):
        evaluate(prof, "prfaas", 19_400, 8)
    with pytest.raises(PlanError, match="deployment: unknown 'nope'"):
        optimize(prof, "nope")


def test_profile_files_and_names(tmp_path) -> None:
    assert CASE in builtin_profiles()
    with pytest.raises(PlanError, match="no built-in profile 'nope'"):
        load_profile("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [\n")
    with pytest.raises(PlanError, match="not valid TOML"):
        load_profile(bad)
    with pytest.raises(PlanError, match="cannot read"):
        load_profile(tmp_path / "missing.toml")
    good = tmp_path / "mine.toml"
    text = resources.files("kvship.plan").joinpath("profiles", f"{CASE}.toml").read_text()
    good.write_text(text.replace("link_gbps = 100", "link_gbps = 10"))
    small_link = plan(load_profile(good))
    assert small_link.main.lambda_max < 3.24 and small_link.main.egress_gbps <= 10 + 1e-9


def test_link_limited_deployment_reports_link_bottleneck() -> None:
    data = case_dict()
    data["deployments"]["naive"]["link_gbps"] = 5
    prof = parse_profile(data)
    naive = optimize(prof, "naive")
    assert naive.bottleneck == "link"
    assert naive.egress_gbps == pytest.approx(5.0, rel=1e-6)


def test_cli_reports_errors(capsys, tmp_path) -> None:
    assert run_cli(["plan", "--profile", str(tmp_path / "x.toml")]) == 2
    assert "kvship plan: error: profile: cannot read" in capsys.readouterr().err


# --------------------------------------------------------------------------- report


def test_report_dict_is_json_clean(case_plan) -> None:
    out = plan_to_dict(case_plan)
    text = json.dumps(out, allow_nan=False)
    assert json.loads(text)["baselines"]["homogeneous"]["theta_prfaas"] is None
    assert "homogeneous" in plan_table(case_plan)


def test_plot_writes_png(case_plan, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    path = plot_plan(case_plan, tmp_path / "theta.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(case_plan, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(PlanError, match="matplotlib is not installed"):
        plot_plan(case_plan, tmp_path / "x.png")
