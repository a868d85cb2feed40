"""The CUPED simulation's world: each row carries its symbol's pre-period covariate, the raw replay sees
none, and a day replays both ways."""

from __future__ import annotations

import numpy as np

from experiments import data, symbol_power
from experiments.symbol_power import Design


def test_a_day_carries_each_symbols_covariate_and_the_raw_replay_none():
    d = Design("test", "route", 30, 0.5, 5.0)
    obs = symbol_power.day(d, 0.0, seed=3)
    symbols = np.unique(obs.unit)
    per_symbol = [np.unique(obs.covariate_hit[obs.unit == s]) for s in symbols]
    assert all(len(v) == 1 for v in per_symbol), "one covariate per symbol"
    rates = [np.nanmean(obs.correct[obs.unit == s]) for s in symbols]
    weight = [int((obs.unit == s).sum()) for s in symbols]
    busy = np.argsort(weight)[-10:]  # the busiest symbols' rates are measured well enough to compare
    assert np.corrcoef(np.concatenate(per_symbol)[busy], np.array(rates)[busy])[0, 1] > 0.5
    raw = symbol_power.without_covariates(obs)
    assert data.absent(raw.covariate_hit) and data.absent(raw.covariate_pnl)


def test_one_day_replays_raw_and_with_cuped():
    d = Design("test", "request_id", 40, 0.1, 430.0)
    raw, adjusted = symbol_power.run_one((d, "+2 pp", 1, 2_000))
    assert raw.decision in ("PROMOTE", "KEEP", "CONTINUE", "ROLLBACK", "HALT") and raw.close_fraction > 0
    assert adjusted.close_fraction > 0 and adjusted.minute <= symbol_power.minutes_for(d)
