"""The whole rule's plan: beta shared between the parts of PROMOTE; the other metric's boundary."""

import math

import numpy as np
import pytest
from test_analysis import world

from experiments import plan, stats
from experiments.analysis import evaluate
from experiments.data import Observations
from experiments.replay import replay
from experiments.store import Experiment, Margins

K, ALPHA = 40, 0.005


def test_boundary_power_inverts_the_drift_the_design_plans_with():
    for power in (0.5, 0.8, 0.9, 0.95):
        drift = stats.sequential_drift(K, ALPHA, power)
        assert stats.boundary_power(K, ALPHA, drift) == pytest.approx(power, abs=1e-3)
    assert stats.boundary_power(1, ALPHA, stats.sequential_drift(1, ALPHA, 0.8)) == pytest.approx(0.8)
    assert stats.boundary_power(K, ALPHA, 0.0) <= ALPHA * 1.5  # no effect: the boundary's own alpha


def _plan(**ratios: float) -> plan.RulePlan:
    return plan.rule_plan(0.02, plan.Ratios(**ratios), alpha=ALPHA, power=0.8, looks=K, error_alpha=0.025,
                          latency_alpha=0.004)


def test_the_parts_share_beta_and_the_plan_grows_only_as_much_as_they_need():
    alone = _plan()
    # the rate guardrails' 2 % of beta is kept for them whether or not their rates are measured yet
    assert 1.0 < alone.factor < 1.06 and alone.betas == {"primary": pytest.approx(0.18, abs=2e-3)}
    loose, tight = _plan(other_margin_z=0.05), _plan(other_margin_z=0.0124)
    for p in (loose, tight):
        assert sum(p.betas.values()) <= 0.2 + 1e-9  # the union bound: the rule's power is at least 80 %
    assert 1.0 <= loose.factor < tight.factor  # a stricter margin (in standard errors) needs more
    assert loose.factor < 1.05 and tight.binding == "primary and other metric"
    hopeless = _plan(other_margin_z=1e-4)
    assert hopeless.capped and hopeless.factor == pytest.approx(plan.MAX_PLAN_FACTOR)


def test_rate_guardrails_are_sized_at_their_measured_rates():
    # 0.1 % errors against a 0.5 pp margin need a few thousand treatment exposures: they do not bind
    cheap = _plan(error_rate=0.001, error_margin=0.005, exposures_per_info=0.27, latency_share=0.02,
                  latency_per_info=0.27)
    assert cheap.binding == "primary" and cheap.betas["error rate"] == plan.MAX_RATE_BETA
    # latency just under its 5 % limit needs far more comparisons than the primary needs information
    slow = _plan(latency_share=0.045, latency_per_info=0.01)
    assert slow.binding == "latency" and slow.factor > 1.5
    assert plan.share_exposures(0.045, 0.05, 0.004) > plan.share_exposures(0.02, 0.05, 0.004)


def test_a_rate_hovering_at_its_margin_moves_the_plan_by_at_most_the_rate_factor_either_side():
    below, at, past = (_plan(latency_share=share, latency_per_info=0.27) for share in (0.0499, 0.05, 0.06))
    assert below.information == at.information == past.information  # no jump when the estimate crosses
    assert at.factor == pytest.approx(plan.RATE_PLAN_FACTOR * _plan().factor, rel=0.05)
    assert at.capped and at.binding == "latency" and at.betas["latency"] is None


def test_the_rate_share_leaves_the_primary_a_positive_beta_at_any_power():
    for power in (0.9, 0.98, 0.995):
        p = plan.rule_plan(0.02, plan.Ratios(error_rate=0.001, error_margin=0.005, exposures_per_info=0.27,
                                             latency_share=0.02, latency_per_info=0.27),
                           alpha=ALPHA, power=power, looks=K, error_alpha=0.025, latency_alpha=0.004)
        assert plan.rate_share(power) <= (1 - power) / 4 and not p.capped
        assert 0 < p.betas["primary"] <= (1 - power) - 2 * plan.rate_share(power) + 2e-3


PNL_SD = 2 * math.sqrt(3)  # world()'s P&L: 2 × Student-t with 3 df


def _design(**margins: float) -> Experiment:
    return Experiment("e", "m", 1, 2, treatment_share=0.5, unit="request_id", planned_looks=10, salt="s",
                      label_horizon_s=10.0, min_effect_pp=5.0, margins=Margins(**margins))


def test_promote_waits_for_the_other_metrics_boundary_and_records_it():
    obs = world(n=60_000, p=(0.55, 0.62), pnl=(1.0, 1.0), seed=3)
    records = replay(_design(), obs, every_s=60)
    last = records[-1]
    assert last.decision == "PROMOTE" and last.noninferior and last.primary_crossed
    shown = [t for t in last.basis["tests"] if t["metric"] == "pnl" and t["role"] == "boundary"]
    assert shown and "non-inferiority" in shown[0]["test"] and shown[0]["statistic"] >= shown[0]["threshold"]
    assert last.planned["rule"]["factor"] >= 1.0 and "other metric" in last.planned["rule"]["betas"]


def test_pnl_at_the_margin_is_never_shown_non_inferior_and_the_plan_ends_in_keep():
    """A treatment that wins trades but is worse by exactly the default margin (0.05 sd): no PROMOTE."""
    promoted = 0
    for seed in range(4):
        obs = world(n=60_000, p=(0.55, 0.62), pnl=(1.0, 1.0 - 0.05 * PNL_SD * 3), seed=seed)
        decisions = replay(_design(pnl_per_trade=0.05 * PNL_SD * 3), obs, every_s=60)
        promoted += decisions[-1].decision == "PROMOTE"
        assert not any(d.noninferior for d in decisions)
    assert promoted == 0


def test_a_forged_or_malformed_record_does_not_count_as_a_crossing():
    """Audit records are read back from Redis: truthy strings, looks outside the plan or a missing
    boundary test do not make a part shown."""
    obs = world(n=4_000, p=(0.55, 0.62), pnl=(1.0, 1.0), seed=3)
    forged = [{"look": 0, "decision": "CONTINUE", "primary_crossed": "no", "noninferior": "false"},
              {"look": 99, "decision": "CONTINUE", "boundary_tested": True, "primary_crossed": True,
               "noninferior": True, "basis": {"tests": []}},
              {"look": 1, "decision": "CONTINUE", "boundary_tested": True, "primary_crossed": True,
               "noninferior": True, "basis": {"tests": [{"metric": "hit_rate", "role": "boundary",
                                                          "statistic": 1.0, "threshold": 3.0}]}}]
    for record in forged:
        d = evaluate(_design(), obs, 600.0, [record])
        assert d.decision != "PROMOTE" and not d.noninferior, record


def test_pnl_without_spread_asks_only_that_no_loss_be_shown():
    o = world(n=60_000, p=(0.55, 0.62), seed=3)
    flat = Observations.build(t_s=o.t_s, unit=o.unit, arm=o.arm, error=o.error, latency_ms=o.latency_ms,
                              outcome_t_s=o.outcome_t_s, correct=o.correct, pnl=np.zeros(len(o)), start_s=0.0)
    assert replay(_design(), flat, every_s=60)[-1].decision == "PROMOTE"


def test_an_experiment_that_crossed_under_the_earlier_rule_keeps_its_pnl_check():
    """Records written before the non-inferiority boundary have no ``noninferior``: not KEEP at once."""
    obs = world(n=60_000, p=(0.55, 0.62), pnl=(1.0, 1.0), seed=3)
    old = [{"look": 10, "decision": "CONTINUE", "boundary_tested": True, "primary_crossed": True,
            "info_fraction": 1.0, "basis": {"tests": [{"metric": "hit_rate", "role": "boundary",
                                                       "statistic": 4.0, "threshold": 2.7}]}}]
    d = evaluate(_design(), obs, float(obs.t_s[-1]) + 60, old)
    assert d.decision == "PROMOTE" and "every guardrail shown inside" in d.reason


def test_margin_zero_asks_only_that_no_loss_be_shown():
    obs = world(n=60_000, p=(0.55, 0.62), pnl=(1.0, 1.0), seed=3)
    last = replay(_design(pnl_per_trade=0.0), obs, every_s=60)[-1]
    assert last.decision == "PROMOTE" and not last.noninferior
    assert "other metric" not in last.planned["rule"]["betas"]


def test_the_plan_is_in_the_audit_trail_json_ready():
    obs = world(n=5_000, pnl=(1.0, 1.0))
    rule = replay(_design(), obs, every_s=600)[-1].to_dict()["planned"]["rule"]
    assert set(rule) == {"information", "primary_alone", "factor", "betas", "binding", "capped"}
    assert all(np.isfinite(v) for v in (rule["information"], rule["primary_alone"], rule["factor"]))
