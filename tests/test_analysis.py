"""Decisions from observations: HALT on SRM or biased outcomes, ROLLBACK on shown harm, PROMOTE at a look."""

import json
import math

import numpy as np

from experiments import validate
from experiments.analysis import decide, evaluate, planned_sample_size
from experiments.data import Observations
from experiments.replay import replay
from experiments.store import Experiment, Margins
from experiments.summary import summarize

EXP = Experiment("e1", "m", 1, 2, treatment_share=0.5, unit="request_id", planned_looks=10, salt="s",
                 label_horizon_s=10.0, min_effect_pp=5.0)


def world(n=20_000, *, p=(0.55, 0.55), share=0.5, minutes=60, seed=0, errors=(0.001, 0.001),
          latency_ms=((3.0, 0.4), (3.0, 0.4)), pnl=(None, None), arrive=(1.0, 1.0), units=0, unit_sd=0.0,
          load_jump_at=None):
    """Observations of a simulated experiment over ``minutes``; ``units`` > 0 randomises by unit."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, minutes * 60, n))
    if units:
        unit = rng.integers(0, units, n)
        arm = (rng.random(units) < share).astype(int)[unit]
    else:
        unit, arm = np.arange(n), (rng.random(n) < share).astype(int)
    hit_p = np.where(arm == 1, p[1], p[0]) + (rng.normal(0, unit_sd, units)[unit] if units else 0)
    correct = (rng.random(n) < hit_p).astype(float)
    arrives = rng.random(n) < np.where(arm == 1, arrive[1], arrive[0])
    outcome_t = np.where(arrives, t + rng.uniform(0, 5, n), np.nan)
    median, sigma = np.where(arm == 1, latency_ms[1][0], latency_ms[0][0]), latency_ms[0][1]
    latency = rng.lognormal(np.log(median), sigma)
    if load_jump_at is not None:
        latency = latency + 20.0 * (t > load_jump_at)
    pnl_values = None
    if pnl[0] is not None:
        pnl_values = np.where(arm == 1, pnl[1], pnl[0]) + 2 * rng.standard_t(3, n)
    error = rng.random(n) < np.where(arm == 1, errors[1], errors[0])
    return Observations.build(t_s=t, unit=unit, arm=arm, error=error,
                              latency_ms=latency, outcome_t_s=outcome_t, correct=correct, pnl=pnl_values,
                              start_s=0.0)


def end(obs):
    return float(obs.t_s[-1]) + 60


def test_sample_ratio_mismatch_of_units_halts_before_anything_else():
    d = evaluate(EXP, world(share=0.45, p=(0.55, 0.75)), 3600)
    assert d.decision == "HALT" and "sample-ratio" in d.reason
    assert d.tests[0]["metric"] == "srm"


def test_outcomes_missing_more_in_one_arm_halt_instead_of_being_read():
    obs = world(p=(0.55, 0.65), arrive=(1.0, 0.9))
    d = evaluate(EXP, obs, end(obs))
    assert d.decision == "HALT" and "outcomes arrive" in d.reason


def test_a_treatment_whose_wrong_outcomes_come_late_is_halted_not_promoted():
    obs = world(p=(0.55, 0.55))
    late = (obs.arm == 1) & (obs.correct == 0)
    delayed = Observations.build(t_s=obs.t_s, unit=obs.unit, arm=obs.arm, correct=obs.correct,
                                 outcome_t_s=np.where(late, obs.t_s + 1800, obs.outcome_t_s), start_s=0.0)
    decisions = replay(EXP, delayed)
    assert decisions[-1].decision == "HALT" and "PROMOTE" not in [d.decision for d in decisions]


def test_only_matured_requests_count():
    obs = world(n=2000, minutes=10)
    s = summarize(EXP, obs, 300.0)
    matured = int(((obs.t_s <= 300.0 - EXP.label_horizon_s) & ~obs.error).sum())  # a failure is owed nothing
    assert s.matured.sum() == matured and s.exposures.sum() == int((obs.t_s <= 300.0).sum())
    assert s.hit_n.sum() <= matured


def test_clear_harm_on_the_primary_metric_is_rolled_back_early():
    decisions = replay(EXP, world(p=(0.60, 0.45)))
    last = decisions[-1]
    assert last.decision == "ROLLBACK" and "hit_rate shown worse" in last.reason
    assert last.info_fraction < 1 / 3


def test_error_rate_guardrail_rolls_back():
    obs = world(errors=(0.001, 0.03))
    d = evaluate(EXP, obs, end(obs))
    assert d.decision == "ROLLBACK" and "error rate" in d.reason


def test_latency_guardrail_rolls_back_on_a_slower_treatment():
    obs = world(latency_ms=((3.0, 0.4), (9.0, 0.4)))
    d = evaluate(EXP, obs, end(obs))
    assert d.decision == "ROLLBACK" and "latency" in d.reason


def test_a_load_change_in_both_arms_is_not_a_latency_regression():
    # 90/10 and latency +20 ms for everyone after 30 minutes: windows of the same minutes compare
    # like with like, where "each arm's latest N samples" would cover different periods.
    e = Experiment("e2", "m", 1, 2, treatment_share=0.1, unit="request_id", label_horizon_s=10.0)
    obs = world(share=0.1, load_jump_at=1800.0, seed=3)
    d = evaluate(e, obs, end(obs))
    latency = next(t for t in d.tests if t["metric"] == "latency_p95")
    assert d.decision != "ROLLBACK" and latency["ci_high"] < 5.0


def test_clear_win_is_promoted_at_a_planned_look_and_not_before():
    decisions = replay(EXP, world(p=(0.55, 0.62), n=40_000))
    assert decisions[0].decision == "CONTINUE" and decisions[0].reason.endswith("below the boundary")
    last = decisions[-1]
    assert last.decision == "PROMOTE" and last.boundary_tested and last.primary_crossed and last.look >= 1
    boundary = next(t for t in last.tests if t["role"] == "boundary")
    assert boundary["statistic"] >= boundary["threshold"]


def test_better_hit_rate_with_worse_pnl_is_never_promoted():
    obs = world(p=(0.55, 0.62), n=40_000, pnl=(1.0, -2.0))
    decisions = replay(EXP, obs)
    assert "PROMOTE" not in [d.decision for d in decisions]
    assert decisions[-1].decision == "ROLLBACK" and "pnl" in decisions[-1].reason


def test_pnl_primary_promotes_on_pnl_and_guards_the_hit_rate():
    e = Experiment("e3", "m", 1, 2, treatment_share=0.5, unit="request_id", planned_looks=10,
                   label_horizon_s=10.0, primary="pnl", min_effect_pnl=0.3,
                   margins=Margins(accuracy_pp=5.0))
    win = replay(e, world(n=40_000, pnl=(1.0, 1.5)))[-1]
    assert win.decision == "PROMOTE" and "boundary was crossed" in win.reason
    assert next(t for t in win.tests if t["role"] == "primary")["units"] == "P&L per trade"
    worse_hits = replay(e, world(n=40_000, pnl=(1.0, 1.5), p=(0.60, 0.50)))[-1]
    assert worse_hits.decision == "ROLLBACK" and "hit_rate worse" in worse_hits.reason


def test_the_boundary_is_tested_once_per_look():
    obs = world(p=(0.55, 0.62), n=40_000)
    first = evaluate(EXP, obs, end(obs))
    assert first.decision == "PROMOTE" and first.boundary_tested
    not_crossed = [{"look": first.look, "decision": "CONTINUE", "boundary_tested": True}]
    again = decide(EXP, summarize(EXP, obs, end(obs)), not_crossed)
    assert again.decision != "PROMOTE" and not again.boundary_tested
    crossed = [{"look": 1, "decision": "CONTINUE", "boundary_tested": True, "primary_crossed": True}]
    assert decide(EXP, summarize(EXP, obs, end(obs)), crossed).decision == "PROMOTE"


def test_no_effect_at_the_planned_information_keeps_the_champion():
    decisions = replay(EXP, world(n=60_000, seed=4))
    assert decisions[-1].decision == "KEEP" and decisions[-1].info_fraction >= 1


def test_too_few_units_decide_nothing_but_halt():
    e = Experiment("e4", "m", 1, 2, treatment_share=0.5, unit="route", label_horizon_s=10.0,
                   min_units_per_arm=5)
    obs = world(units=4, p=(0.55, 0.30), seed=5)
    d = evaluate(e, obs, end(obs))
    assert d.decision == "CONTINUE" and "units so far" in d.reason


def test_clustered_units_widen_the_interval():
    e = Experiment("e5", "m", 1, 2, treatment_share=0.5, unit="route", label_horizon_s=10.0)
    clustered = evaluate(e, (obs := world(units=40, unit_sd=0.08, seed=6)), end(obs))
    independent = evaluate(EXP, (obs2 := world(seed=6)), end(obs2))

    def width(d):
        t = next(t for t in d.tests if t["role"] == "primary")
        return t["ci_high"] - t["ci_low"]

    assert width(clustered) > 1.5 * width(independent)


def test_degenerate_data_never_raises():
    empty = Observations.build(t_s=[], unit=[], arm=[], start_s=0.0)
    assert evaluate(EXP, empty, 100.0).decision == "CONTINUE"
    one_unit = world(n=500, units=1, seed=7)
    evaluate(Experiment("e6", "m", 1, 2, unit="route", label_horizon_s=10.0), one_unit, end(one_unit))
    all_right = world(n=5000, p=(1.0, 1.0))
    d = evaluate(EXP, all_right, end(all_right))
    assert d.decision in ("CONTINUE", "KEEP")
    json.dumps(d.to_dict())


def test_decisions_are_audit_records():
    obs = world(n=5000)
    record = evaluate(EXP, obs, end(obs)).to_dict()
    assert set(record) >= {"decision", "reason", "look", "tests", "at", "now_s", "info_fraction", "exposures",
                           "units", "planned", "boundary_tested"}
    roles = {t["metric"]: t["role"] for t in record["tests"] if t["role"] != "boundary"}
    assert roles["hit_rate"] == "primary" and roles["error_rate"] == roles["latency_p95"] == "guardrail"
    assert all(t["units"] for t in record["tests"])
    assert json.loads(json.dumps(record))["planned"]["treatment"] > 0


def test_planned_sample_size_uses_the_allocation():
    even = planned_sample_size(EXP, 0.55)
    assert even.treatment == even.control
    ninety_ten = planned_sample_size(Experiment("e7", "m", 1, 2, treatment_share=0.1, min_effect_pp=5.0),
                                     0.55)
    assert ninety_ten.treatment < even.treatment < ninety_ten.control
    assert not math.isnan(planned_sample_size(EXP, float("nan")).treatment)


def test_light_validation_of_the_production_design():
    # A seeded handful of each scenario of `make validate-stats`; the full run is 2,000 each.
    picks = {"A/A, i.i.d. requests": 6, "-6 pp hit rate": 6, "A/A, treatment's wrong outcomes 30 min late": 4}
    for name, sims in picks.items():
        scenario = next(s for s in validate.SCENARIOS if s.name == name)
        decisions = [validate.run_one((scenario, seed))[0] for seed in range(sims)]
        assert "PROMOTE" not in decisions
        if name.startswith("-6"):
            assert decisions.count("ROLLBACK") == sims
        if "late" in name:
            assert decisions.count("HALT") == sims
