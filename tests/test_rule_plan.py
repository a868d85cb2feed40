"""The whole rule's plan: beta shared between the parts of PROMOTE; the other metric's boundary."""

import math

import numpy as np
import pytest
from test_analysis import world

from experiments import plan, stats
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
    assert alone.factor == pytest.approx(1.0) and alone.betas == {"primary": pytest.approx(0.2, abs=2e-3)}
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
    assert cheap.binding == "primary" and cheap.betas["error rate"] == plan.RATE_BETA
    # latency just under its 5 % limit needs far more comparisons than the primary needs information
    slow = _plan(latency_share=0.045, latency_per_info=0.01)
    assert slow.binding == "latency" and slow.factor > 1.5
    assert plan.share_exposures(0.045, 0.05, 0.004) > plan.share_exposures(0.02, 0.05, 0.004)
    assert "latency" not in _plan(latency_share=0.06, latency_per_info=0.27).betas  # the data contradict it


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
