"""Randomised by request, the design's power holds at a busy desk and the false PROMOTE rate stays low.

Seeded trading days at the production design (90/10, 40 looks, one-sided alpha 0.005, 60 s label
horizon, outcomes 5–55 s late, t₃ P&L), driven through ``experiment simulate``'s code path. Time
blocks of one label horizon as clusters left a 430 req/s desk two or three clusters at the planned
information, so the t-corrected boundary stayed huge: +2 pp was promoted in 2 of these 20 days.
"""

from __future__ import annotations

import numpy as np
import pytest

from experiments.data import Observations
from experiments.simulate import experiment_for, simulate


def desk(rate_per_s: float, minutes: int, effect_pp: float, seed: int) -> Observations:
    """A day's exposures by request at ``rate_per_s``; the treatment's hit rate ``effect_pp`` above 55 %."""
    rng = np.random.default_rng(seed)
    n = int(rng.poisson(rate_per_s * minutes * 60))
    t = np.sort(rng.uniform(0, minutes * 60, n))
    arm = (rng.random(n) < 0.1).astype(np.int8)
    return Observations.build(t_s=t, unit=np.arange(n), arm=arm, outcome_t_s=t + rng.uniform(5, 55, n),
                              correct=(rng.random(n) < 0.55 + effect_pp / 100 * arm).astype(float),
                              pnl=1 + 2 * rng.standard_t(3, n), latency_ms=rng.lognormal(np.log(3), 0.4, n),
                              error=rng.random(n) < 0.001, start_s=0.0)


def decisions(rate_per_s: float, minutes: int, effect_pp: float, runs: int, *,
              every_s: float = 60.0) -> list[str]:
    """The first decision other than CONTINUE of each seeded day (or CONTINUE at its end)."""
    out = []
    for i in range(runs):
        obs = desk(rate_per_s, minutes, effect_pp, seed=1000 * int(rate_per_s) + i)
        e = experiment_for(obs, treatment_share=0.1, unit="request_id", label_horizon_s=60.0)
        out.append(simulate(e, obs, every_s)[-1].decision)
    return out


@pytest.mark.timeout(60)
def test_power_does_not_fall_as_traffic_grows():
    quiet = decisions(6.0, 300, 2.0, 20, every_s=180.0)  # the planned information takes about 4 hours
    busy = decisions(430.0, 10, 2.0, 20)  # ... and in about 4 minutes
    power_quiet, power_busy = quiet.count("PROMOTE") / 20, busy.count("PROMOTE") / 20
    assert power_busy >= 0.75 and power_busy >= power_quiet - 0.15, (quiet, busy)


@pytest.mark.timeout(60)
def test_no_effect_is_not_promoted_at_a_busy_desk():
    busy = decisions(430.0, 10, 0.0, 40)
    assert busy.count("PROMOTE") <= 1 and busy.count("KEEP") >= 38, busy


def test_the_traffic_measurement_runs_a_day():
    from experiments.traffic_power import run_one

    decision, minute = run_one((430.0, "A/A", 1))
    assert decision in ("KEEP", "PROMOTE") and 2 <= minute <= 15
