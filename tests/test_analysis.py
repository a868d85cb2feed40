"""Decisions from per-arm data: HALT on SRM, ROLLBACK on guardrails, PROMOTE at a boundary, KEEP."""

import numpy as np
import pytest

from experiments.analysis import ArmData, analyze, planned_sample_size
from experiments.store import Experiment

EXP = Experiment("e1", "m", 1, 2, treatment_share=0.5, planned_looks=10, salt="s")
N = 20_000


def arm(exposures, hit_rate, *, outcomes=None, errors=0, latency_ms=5.0, seed=0):
    rng = np.random.default_rng(seed)
    outcomes = exposures if outcomes is None else outcomes
    return ArmData(exposures, errors, list(rng.gamma(4, latency_ms / 4, 500)),
                   correct=int(round(hit_rate * outcomes)), outcomes=outcomes)


def test_sample_ratio_mismatch_halts_before_anything_else():
    d = analyze(EXP, arm(10_500, 0.55), arm(9_500, 0.60), look=5, planned_n_per_arm=N)
    assert d.decision == "HALT" and "sample-ratio" in d.reason
    assert d.tests[0]["test"] == "sequential SRM (Dirichlet-multinomial)"


def test_much_worse_treatment_is_rolled_back_at_any_look():
    d = analyze(EXP, arm(5000, 0.60), arm(5000, 0.45), look=1, planned_n_per_arm=N)
    assert d.decision == "ROLLBACK" and "hit rate" in d.reason


def test_error_rate_guardrail_rolls_back():
    d = analyze(EXP, arm(5000, 0.55, errors=10), arm(5000, 0.55, errors=120), look=2, planned_n_per_arm=N)
    assert d.decision == "ROLLBACK" and "error rate" in d.reason


def test_latency_guardrail_rolls_back():
    d = analyze(EXP, arm(5000, 0.55, latency_ms=5), arm(5000, 0.55, latency_ms=15, seed=1), look=2,
                planned_n_per_arm=N)
    assert d.decision == "ROLLBACK" and "p95 latency" in d.reason


def test_clear_win_at_a_planned_look_is_promoted():
    d = analyze(EXP, arm(N, 0.55), arm(N, 0.575, seed=1), look=10, planned_n_per_arm=N)
    assert d.decision == "PROMOTE"
    assert {t["test"] for t in d.tests} >= {"two-proportion chi-square", "bootstrap p95 difference"}


def test_same_win_early_is_not_promoted_yet():
    d = analyze(EXP, arm(N // 10, 0.55), arm(N // 10, 0.575, seed=1), look=1, planned_n_per_arm=N)
    assert d.decision == "CONTINUE"


def test_no_effect_at_the_last_look_keeps_the_champion():
    d = analyze(EXP, arm(N, 0.55), arm(N, 0.552, seed=1), look=10, planned_n_per_arm=N)
    assert d.decision == "KEEP"


def test_planned_sample_size_for_two_points():
    assert 10_000 < planned_sample_size(EXP, 0.55) < 30_000


@pytest.mark.parametrize("decision", ["HALT", "ROLLBACK", "PROMOTE", "CONTINUE", "KEEP"])
def test_decisions_are_audit_records(decision):
    cases = {"HALT": (arm(10_500, .55), arm(9_500, .6), 5), "ROLLBACK": (arm(5000, .6), arm(5000, .45), 1),
             "PROMOTE": (arm(N, .55), arm(N, .575, seed=1), 10),
             "CONTINUE": (arm(N // 10, .55), arm(N // 10, .575, seed=1), 1),
             "KEEP": (arm(N, .55), arm(N, .552, seed=1), 10)}
    control, treatment, look = cases[decision]
    record = analyze(EXP, control, treatment, look=look, planned_n_per_arm=N).to_dict()
    assert record["decision"] == decision and record["look"] == look and record["at"] > 0
    assert all({"test", "statistic", "p_value"} <= set(t) for t in record["tests"])


def test_the_boundary_is_tested_once_per_look():
    win = (arm(N // 2, 0.55), arm(N // 2, 0.575, seed=1))
    again = analyze(EXP, *win, look=5, planned_n_per_arm=N, earlier_at_look="NOT_CROSSED")
    assert again.decision == "CONTINUE"
    kept = analyze(EXP, *win, look=5, planned_n_per_arm=N, earlier_at_look="PROMOTE")
    assert kept.decision == "PROMOTE"
    last = analyze(EXP, arm(N, 0.55), arm(N, 0.575, seed=1), look=10, planned_n_per_arm=N,
                   earlier_at_look="NOT_CROSSED")
    assert last.decision == "KEEP", "a later analysis at the last look does not get a second try"
