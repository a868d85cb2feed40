"""PROMOTE needs the P&L guardrail shown non-inferior within a default margin (a fraction of P&L's sd):
a model that wins trades but loses money is not promoted, and +2 pp with P&L unchanged still is."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.analysis import PNL_MARGIN_SD, pnl_margin
from experiments.data import Observations
from experiments.simulate import experiment_for, simulate
from experiments.store import Margins
from experiments.summary import summarize

PNL_SD = 2 * np.sqrt(2.5 / 0.5)  # 2 × Student-t with 2.5 df


def desk(effect_pp: float, pnl_sd_effect: float, seed: int, rate_per_s: float = 430.0,
         minutes: int = 10) -> Observations:
    """By request at 90/10: hit rate +``effect_pp``, mean P&L per trade ``pnl_sd_effect`` sd apart."""
    rng = np.random.default_rng(seed)
    n = int(rng.poisson(rate_per_s * minutes * 60))
    t = np.sort(rng.uniform(0, minutes * 60, n))
    arm = (rng.random(n) < 0.1).astype(np.int8)
    pnl = 1 + 2 * rng.standard_t(2.5, n) + pnl_sd_effect * PNL_SD * arm
    return Observations.build(t_s=t, unit=np.arange(n), arm=arm, outcome_t_s=t + rng.uniform(5, 55, n),
                              correct=(rng.random(n) < 0.55 + effect_pp / 100 * arm).astype(float), pnl=pnl,
                              latency_ms=rng.lognormal(np.log(3), 0.4, n), error=rng.random(n) < 0.001,
                              start_s=0.0)


def first_decisions(effect_pp: float, pnl_sd_effect: float, runs: int) -> list[str]:
    out = []
    for seed in range(runs):
        obs = desk(effect_pp, pnl_sd_effect, seed)
        e = experiment_for(obs, treatment_share=0.1, unit="request_id", label_horizon_s=60.0)
        out.append(simulate(e, obs, 60.0)[-1].decision)
    return out


@pytest.mark.timeout(60)
def test_winning_trades_that_lose_money_are_not_promoted_but_a_real_win_is():
    losing = first_decisions(3.0, -0.05, 20)  # without the default margin: 4 of these 20 promoted
    assert "PROMOTE" not in losing, losing
    winning = first_decisions(2.0, 0.0, 20)
    assert winning.count("PROMOTE") >= 14, winning


def test_the_default_margin_is_a_fraction_of_the_pnl_sd_and_an_explicit_one_wins():
    obs = desk(0.0, 0.0, seed=1, minutes=2)
    e = experiment_for(obs, treatment_share=0.1, unit="request_id", label_horizon_s=60.0)
    s = summarize(e, obs, float(obs.t_s[-1]))
    assert s.pnl_sd > 0 and pnl_margin(e, s) == pytest.approx(PNL_MARGIN_SD * s.pnl_sd)
    explicit = experiment_for(obs, treatment_share=0.1, unit="request_id", margins=Margins(pnl_per_trade=0.3))
    assert pnl_margin(explicit, s) == 0.3
    early = summarize(e, obs, obs.start_s + 30.0)  # nothing matured: no scale yet (P&L not shown worse)
    assert pnl_margin(e, early) == 0.0
