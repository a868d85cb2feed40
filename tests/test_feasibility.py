"""``experiment create`` and ``simulate`` say, before anything runs, whether the design can reach its planned
information within the horizon at the model's traffic; ``create`` refuses one that cannot, unless forced."""

from __future__ import annotations

import math
from dataclasses import replace

import models
import numpy as np
import pytest
from conftest import MODEL

from experiments import feasibility, simulate
from experiments.data import Observations
from experiments.store import Experiment, ExperimentStore, Margins
from protocol import keys
from streamserve.cli import main

DAY_S = feasibility.TRADING_DAY_S


def zipf_traffic(symbols: int, rate_per_s: float = 6.0, span_s: float = 3600.0) -> feasibility.Traffic:
    shares = 1 / np.arange(1, symbols + 1)
    shares /= shares.sum()
    n = int(rate_per_s * span_s)
    return feasibility.Traffic(n, span_s, {f"S{i}": round(n * w) for i, w in enumerate(shares)}, "test")


def test_thirty_symbols_at_90_10_can_never_reach_the_plan_by_request_can():
    by_symbol = Experiment("x", MODEL, 1, 2, treatment_share=0.1, unit="route")
    check = feasibility.for_design(by_symbol, zipf_traffic(30), horizon_s=DAY_S, hit_rate=0.55)
    assert check is not None and not check.feasible and math.isinf(check.needed_s)
    assert check.ceiling_fraction < 0.2 and "can never be reached" in check.line()
    by_request = Experiment("x", MODEL, 1, 2, treatment_share=0.1, unit="request_id")
    check = feasibility.for_design(by_request, zipf_traffic(30), horizon_s=DAY_S, hit_rate=0.55)
    assert check is not None and check.feasible and check.needed_s < DAY_S
    slow = feasibility.for_design(by_request, zipf_traffic(30, rate_per_s=0.2), horizon_s=DAY_S,
                                  hit_rate=0.55)
    assert slow is not None and DAY_S < slow.needed_s < math.inf and "beyond the horizon" in slow.line()


def test_the_time_needed_matches_the_information_formula():
    """By request the information after T seconds is λ T s (1 − s) / (p (1 − p))."""
    e = Experiment("x", MODEL, 1, 2, treatment_share=0.5, unit="request_id")
    check = feasibility.for_design(e, zipf_traffic(30, rate_per_s=10.0), horizon_s=DAY_S, hit_rate=0.5)
    assert check is not None
    info = 10.0 * check.needed_s * 0.25 / 0.25
    planned = feasibility.planned_information(e, hit_rate=0.5, pnl_reported=False)
    assert info == pytest.approx(planned, rel=1e-9)


def test_the_plan_is_the_whole_rules_when_pnl_is_reported():
    """A P&L guardrail that must be shown within its margin adds to the plan; a stricter margin adds more."""
    e = Experiment("x", MODEL, 1, 2, treatment_share=0.1, unit="request_id")
    primary_alone = feasibility.planned_information(e, hit_rate=0.55, pnl_reported=False)
    default = feasibility.planned_information(e, hit_rate=0.55)
    strict = feasibility.planned_information(replace(e, margins=Margins(pnl_per_trade=0.02)), hit_rate=0.55,
                                             pnl_variance=1.0)
    assert primary_alone < default < strict
    check = feasibility.for_design(e, zipf_traffic(30, rate_per_s=10.0), horizon_s=DAY_S, hit_rate=0.55,
                                   pnl_variance=4.0)
    assert check is not None and 10.0 * check.needed_s * 0.09 / (0.55 * 0.45) == pytest.approx(default)


def test_a_pnl_design_without_pnl_outcomes_is_not_estimated():
    e = Experiment("x", MODEL, 1, 2, primary="pnl", min_effect_pnl=0.1)
    assert feasibility.for_design(e, zipf_traffic(30), horizon_s=DAY_S) is None


@pytest.fixture
def two_versions(registry, production, tmp_path):
    registry.register(MODEL, models.linear_softmax(tmp_path / "v2.onnx", seed=2), input_spec=models.SPEC,
                      output_names=["probs"], labels=models.LABELS)


def recent_requests(r, registry, symbols: int, rate_per_s: float = 6.0, span_s: float = 600.0) -> Experiment:
    """Requests a previous, stopped experiment journaled over the last ``span_s``, with their routes
    (what create reads: the request streams are empty on a fleet that keeps up)."""
    store = ExperimentStore(r, registry)
    previous = store.create(MODEL, 1, 2, treatment_share=0.1)
    store.set_status(MODEL, "stopped", reason="the traffic for the next one")
    now_ms = int(r.time()[0]) * 1000
    rng = np.random.default_rng(1)
    n = int(rate_per_s * span_s)
    shares = 1 / np.arange(1, symbols + 1)
    routes = rng.choice(symbols, size=n, p=shares / shares.sum())
    pipe = r.pipeline(transaction=False)
    for i, route in enumerate(routes):
        at_ms = now_ms - int(span_s * 1000) + int(i * 1000 / rate_per_s)
        pipe.xadd(keys.experiment_journal(MODEL, previous.id), {"id": f"q{i}", "route": f"SYM{route}"},
                  id=f"{at_ms}-*")
    pipe.execute()
    return previous


def test_create_refuses_thirty_symbols_at_90_10_in_a_day_unless_forced(r, settings, registry, two_versions,
                                                                       capsys):
    previous = recent_requests(r, registry, 30)
    base = ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir),
            "experiment", "create", MODEL, "--control", "1", "--treatment", "2", "--share", "0.1"]
    assert main(base) == 2
    out = capsys.readouterr()
    assert "can never be reached" in out.out and "refused" in out.err and "--force" in out.err
    assert ExperimentStore(r, registry).get(MODEL).id == previous.id, "nothing was created"

    assert main([*base, "--force"]) == 0
    assert "can never be reached" in capsys.readouterr().out
    assert ExperimentStore(r, registry).get(MODEL).status == "running"


def test_create_by_request_at_the_same_traffic_is_told_it_fits(r, settings, registry, two_versions, capsys):
    recent_requests(r, registry, 30)
    assert main(["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir),
                 "experiment", "create", MODEL, "--control", "1", "--treatment", "2", "--share", "0.1",
                 "--unit", "request_id", "--max-days", "2"]) == 0
    out = capsys.readouterr().out
    assert "within the horizon of 2 trading days" in out
    assert "6 requests/s (the last experiment's journal)" in out


def test_create_without_recent_traffic_says_so_and_creates(r, settings, registry, two_versions, capsys):
    assert main(["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir),
                 "experiment", "create", MODEL, "--control", "1", "--treatment", "2"]) == 0
    assert "no recent traffic" in capsys.readouterr().out


def test_simulate_prints_the_estimate_for_its_table(tmp_path, capsys):
    rng = np.random.default_rng(5)
    n = 20_000
    units = rng.integers(30, size=n)
    offsets = rng.normal(0, 0.05, 30)  # symbols' hit rates differ by 5 pp (sd)
    correct = (rng.random(n) < 0.5 + offsets[units]).astype(float)
    obs = Observations.build(t_s=np.sort(rng.uniform(0, 3600, n)), unit=np.array([f"S{u}" for u in units]),
                             arm=(units < 3).astype(int), correct=correct)
    table = simulate.write_table(tmp_path / "t.parquet", obs)
    assert main(["experiment", "simulate", str(table), "--share", "0.1"]) == 0
    assert "feasibility: the planned information can never be reached" in capsys.readouterr().out
