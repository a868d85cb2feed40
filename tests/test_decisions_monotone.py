"""Decisions stand once taken (only shown harm changes them), information never goes down, and every
decision records the numbers it rests on."""

from __future__ import annotations

import json

import numpy as np

from experiments.analysis import decide
from experiments.data import Observations
from experiments.replay import replay
from experiments.simulate import experiment_for, simulate, write_table
from experiments.store import Experiment
from experiments.summary import summarize
from streamserve.cli import main

EXP = Experiment("e1", "m", 1, 2, treatment_share=0.5, unit="request_id", planned_looks=10, salt="s",
                 label_horizon_s=10.0, min_effect_pp=5.0)
PRODUCTION = Experiment("p", "m", 1, 2, treatment_share=0.1, unit="request_id", label_horizon_s=60.0)


def bad_then_good(seed: int = 0, n: int = 40_000, minutes: int = 60, errors_after_s: float | None = None,
                  effect: tuple[float, float] = (-0.15, 0.20)) -> Observations:
    """By request, 50/50: the treatment is ``effect[0]`` worse for 10 minutes, then ``effect[1]`` better.

    Replayed past its first decision, the rule without memory rolled this back at minute 2 and
    promoted it at minute 26. ``errors_after_s``: from then on 20 % of the treatment's requests fail.
    """
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, minutes * 60, n))
    arm = (rng.random(n) < 0.5).astype(int)
    p = 0.55 + arm * np.where(t < 600, *effect)
    error = None
    if errors_after_s is not None:
        error = (arm == 1) & (t > errors_after_s) & (rng.random(n) < 0.2)
    return Observations.build(t_s=t, unit=np.arange(n), arm=arm, outcome_t_s=t + rng.uniform(0, 5, n),
                              correct=(rng.random(n) < p).astype(float), error=error,
                              latency_ms=rng.lognormal(np.log(3), 0.4, n), start_s=0.0)


def busy_desk(rate_per_s: float, minutes: int, seed: int) -> Observations:
    """The production design's A/B by request at ``rate_per_s``: +2 pp, heavy-tailed P&L, delayed outcomes."""
    rng = np.random.default_rng(seed)
    n = int(rng.poisson(rate_per_s * minutes * 60))
    t = np.sort(rng.uniform(0, minutes * 60, n))
    arm = (rng.random(n) < 0.1).astype(np.int8)
    return Observations.build(t_s=t, unit=np.arange(n), arm=arm, outcome_t_s=t + rng.uniform(5, 55, n),
                              correct=(rng.random(n) < 0.55 + 0.02 * arm).astype(float),
                              pnl=1 + 2 * rng.standard_t(3, n), latency_ms=rng.lognormal(np.log(3), 0.4, n),
                              start_s=0.0)


def test_a_rollback_is_never_reversed_by_later_data():
    decisions = replay(EXP, bad_then_good(), stop=False)
    seen = [d.decision for d in decisions]
    first = seen.index("ROLLBACK")
    assert "PROMOTE" not in seen and set(seen[first:]) == {"ROLLBACK"}
    rollback = decisions[first]
    later = decisions[-1]
    # The later analyses still measure (the treatment now looks better), but the decision stands on the
    # numbers it was taken on.
    primary = next(t for t in later.tests if t["role"] == "primary")
    assert primary["ci_low"] > 0 and later.reason.startswith("ROLLBACK stands since look")
    assert later.basis == rollback.basis and rollback.basis["tests"][0]["metric"] == "hit_rate"
    assert rollback.basis["tests"][0]["ci_high"] < rollback.basis["tests"][0]["threshold"]


def test_a_promote_stands_until_harm_is_shown_then_rolls_back():
    e = Experiment("e2", "m", 1, 2, treatment_share=0.5, unit="request_id", planned_looks=10, salt="s",
                   label_horizon_s=10.0, min_effect_pp=5.0)
    decisions = replay(e, bad_then_good(errors_after_s=2400.0, effect=(0.20, 0.20)), stop=False)
    seen = [d.decision for d in decisions]
    promoted, rolled_back = seen.index("PROMOTE"), seen.index("ROLLBACK")
    assert promoted < rolled_back and set(seen[promoted:rolled_back]) == {"PROMOTE"}
    assert set(seen[rolled_back:]) == {"ROLLBACK"} and decisions[-1].now_s > 2400 + 600
    assert "error rate" in decisions[rolled_back].reason and "after PROMOTE" in decisions[rolled_back].reason
    assert decisions[rolled_back].basis["tests"][0]["metric"] == "error_rate"


def test_a_promote_records_its_boundary_and_guardrails_and_a_keep_never_turns_into_promote():
    obs = bad_then_good(effect=(0.10, 0.10))
    decisions = replay(EXP, obs)
    promote = decisions[-1]
    assert promote.decision == "PROMOTE"
    boundary = next(t for t in promote.basis["tests"] if t["role"] == "boundary")
    assert boundary["statistic"] >= boundary["threshold"] and promote.basis["look"] == promote.look >= 1
    assert promote.basis["info_fraction"] == promote.info_fraction > 0
    assert {t["metric"] for t in promote.basis["tests"] if t["role"] == "guardrail"} >= {"error_rate",
                                                                                          "latency_p95"}
    json.dumps(promote.to_dict())
    kept = [{"look": EXP.planned_looks, "decision": "KEEP", "reason": "planned information reached",
             "info_fraction": 1.2, "boundary_tested": True, "primary_crossed": False}]
    again = decide(EXP, summarize(EXP, obs, float(obs.t_s[-1])), kept)
    # The data would cross the boundary now, but the planned information was spent without crossing.
    assert again.decision == "KEEP" and again.basis["info_fraction"] == 1.2 and "KEEP stands" in again.reason
    assert not again.boundary_tested


def test_the_information_fraction_never_goes_down_at_a_busy_desk():
    for seed in range(3):
        fractions = [d.info_fraction for d in replay(PRODUCTION, busy_desk(430.0, 8, seed), stop=False)]
        assert fractions[-1] > 1 and all(b >= a for a, b in zip(fractions, fractions[1:], strict=False)), \
            fractions


def test_simulate_stops_at_the_first_decision_unless_asked(tmp_path, capsys):
    obs = bad_then_good(n=8_000, minutes=20)
    e = experiment_for(obs, treatment_share=0.5, planned_looks=10, label_horizon_s=10.0, min_effect_pp=5.0,
                       unit="request_id")
    assert [d.decision for d in simulate(e, obs, 60)][-2:] == ["CONTINUE", "ROLLBACK"]
    table = write_table(tmp_path / "t.csv", obs)
    args = ["experiment", "simulate", str(table), "--json", "--share", "0.5", "--looks", "10", "--horizon-s",
            "10", "--min-effect-pp", "5", "--unit", "request_id"]
    assert main(args) == 0
    stopped = [json.loads(line)["decision"] for line in capsys.readouterr().out.splitlines()]
    assert main([*args, "--continue-after-decision"]) == 0
    going_on = [json.loads(line)["decision"] for line in capsys.readouterr().out.splitlines()]
    assert stopped[-1] == "ROLLBACK" and stopped.count("ROLLBACK") == 1
    assert len(going_on) == 20 and going_on[:len(stopped)] == stopped and set(going_on[len(stopped):]) == \
        {"ROLLBACK"}
