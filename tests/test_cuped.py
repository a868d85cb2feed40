"""CUPED: the adjusted difference is the regression-adjusted one, θ is pooled over the arms, a covariate that
explains nothing changes nothing, one that explains much removes much, unknown covariates stay unbiased,
and the accumulator gives the same adjustment however it is advanced. Tables carry the covariates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import statsmodels.api as sm

from experiments import cuped, data, simulate, stats
from experiments.data import Observations
from experiments.summary import Accumulator, summarize

END_S = 10_000.0  # after every row of a table (an hour) and its outcome


def table(seed: int = 3, n: int = 20_000, symbols: int = 50, *, effect: float = 0.03, noise: float = 0.01,
          unknown_symbols: int = 5, pnl: bool = True) -> Observations:
    """Requests of symbols whose hit rates differ (sd 8 pp); the covariate is each symbol's rate plus noise,
    unknown for the first ``unknown_symbols`` symbols. Randomised by request, 50/50."""
    rng = np.random.default_rng(seed)
    symbol = rng.integers(symbols, size=n)
    rate = 0.55 + rng.normal(0, 0.08, symbols)
    arm = (rng.random(n) < 0.5).astype(int)
    correct = (rng.random(n) < rate[symbol] + effect * arm).astype(float)
    x = (rate + rng.normal(0, noise, symbols))[symbol]
    x[symbol < unknown_symbols] = np.nan
    t = np.sort(rng.uniform(0, 3600, n))
    profit = 10 * rate[symbol] + rng.standard_t(4, n) if pnl else None
    return Observations.build(t_s=t, unit=np.arange(n), arm=arm, correct=correct, outcome_t_s=t, pnl=profit,
                              covariate_hit=x, covariate_pnl=None if profit is None else 10 * x)


def design(obs: Observations):
    return simulate.experiment_for(obs, unit="request_id", treatment_share=0.5, label_horizon_s=1.0)


def ols(obs: Observations, y: np.ndarray, x: np.ndarray):
    """Y on the arm and the covariate centred at its known rows' mean (unknown: that mean, i.e. 0),
    with errors clustered as the analysis clusters (blocks of 100 requests)."""
    z = np.where(np.isnan(x), 0.0, x - np.nanmean(x))
    regressors = sm.add_constant(np.column_stack([obs.arm, z]))
    blocks = np.arange(len(obs)) // 100
    return sm.OLS(y, regressors).fit(cov_type="cluster", cov_kwds={"groups": blocks})


def test_the_adjusted_hit_rate_difference_is_the_regression_adjusted_one():
    obs = table()
    s = summarize(design(obs), obs, END_S)
    d = stats.cluster_difference(*s.hit_values())
    fit = ols(obs, obs.correct, obs.covariate_hit)
    assert d.estimate == pytest.approx(fit.params[1], rel=1e-9)
    assert s.cuped["hit_rate"]["theta"] == pytest.approx(fit.params[2], rel=1e-9)  # θ pooled: one slope
    # Treating θ as known, the cluster-robust variance is the regression's to first order.
    assert d.variance == pytest.approx(fit.bse[1] ** 2, rel=0.01)
    assert s.cuped["hit_rate"]["covariate_share"] == pytest.approx(np.mean(~np.isnan(obs.covariate_hit)))


def test_the_adjusted_pnl_is_regression_adjusted_and_its_squares_are_the_adjusted_values():
    obs = table()
    s = summarize(design(obs), obs, END_S)
    sums, squares, counts = s.pnl_values()
    assert s.pnl_bounds is not None
    y = np.clip(obs.pnl, *s.pnl_bounds)  # the analysis's winsorised P&L
    fit = ols(obs, y, obs.covariate_pnl)
    assert stats.cluster_difference(sums, counts).estimate == pytest.approx(fit.params[1], rel=1e-9)
    theta = s.cuped["pnl"]["theta"]
    x = obs.covariate_pnl
    adjusted = y - theta * np.where(np.isnan(x), 0.0, x - np.nanmean(x))
    cell = (np.arange(len(obs)) // 100) * 2 + obs.arm
    direct = np.bincount(cell, weights=adjusted * adjusted, minlength=squares.size).reshape(squares.shape)
    np.testing.assert_allclose(squares, direct, rtol=1e-9)
    assert stats.independent_variance(sums, squares, counts) < stats.independent_variance(s.pnl_sum, s.pnl_sq,
                                                                                         s.pnl_n)


def test_a_covariate_that_explains_nothing_changes_the_variance_by_chance_only():
    obs = table(unknown_symbols=0, pnl=False)
    rng = np.random.default_rng(9)
    unrelated = Observations.build(t_s=obs.t_s, unit=obs.unit, arm=obs.arm, correct=obs.correct,
                                   outcome_t_s=obs.outcome_t_s, covariate_hit=rng.random(len(obs)))
    s = summarize(design(unrelated), unrelated, END_S)
    raw, adjusted = (stats.cluster_difference(*v) for v in ((s.hit_sum, s.hit_n), s.hit_values()))
    assert adjusted.variance == pytest.approx(raw.variance, rel=0.01)
    assert abs(s.cuped["hit_rate"]["variance_reduction"]) < 0.002


def test_a_strongly_correlated_covariate_removes_most_of_the_variance():
    """Symbols randomised as units (the between-symbol spread dominates): the symbol's own rate removes it."""
    rng = np.random.default_rng(4)
    n, symbols = 40_000, 200
    symbol = rng.integers(symbols, size=n)
    rate = np.clip(0.55 + rng.normal(0, 0.15, symbols), 0.02, 0.98)
    arm = (np.arange(symbols) % 2)[symbol]
    correct = (rng.random(n) < rate[symbol]).astype(float)
    t = np.sort(rng.uniform(0, 3600, n))
    obs = Observations.build(t_s=t, unit=symbol, arm=arm, correct=correct, outcome_t_s=t,
                             covariate_hit=rate[symbol])
    e = simulate.experiment_for(obs, unit="route", treatment_share=0.5, label_horizon_s=1.0)
    s = summarize(e, obs, END_S)
    raw, adjusted = (stats.cluster_difference(*v) for v in ((s.hit_sum, s.hit_n), s.hit_values()))
    assert adjusted.variance < 0.5 * raw.variance
    report = s.cuped["hit_rate"]
    assert report["effect_variance_reduction"] == pytest.approx(1 - adjusted.variance / raw.variance)
    assert report["variance_reduction"] > 0.05


def test_unknown_covariates_leave_the_estimate_unbiased():
    """A/A with a third of the symbols unknown: the adjusted differences average to zero, with less spread."""
    raw, adjusted = [], []
    for seed in range(60):
        obs = table(seed, n=4_000, effect=0.0, unknown_symbols=17, noise=0.0, pnl=False)
        s = summarize(design(obs), obs, END_S)
        raw.append(stats.cluster_difference(s.hit_sum, s.hit_n).estimate)
        adjusted.append(stats.cluster_difference(*s.hit_values()).estimate)
    se = np.std(adjusted) / math.sqrt(len(adjusted))
    assert abs(np.mean(adjusted)) < 3 * se
    assert np.std(adjusted) < np.std(raw)


def test_too_few_or_no_covariates_give_exactly_the_raw_values():
    obs = table(n=3_000, symbols=400, unknown_symbols=399)  # about 7 rows with a covariate
    s = summarize(design(obs), obs, END_S)
    assert s.hit_values()[0] is s.hit_sum and s.cuped == {}
    plain = Observations.build(t_s=obs.t_s, unit=obs.unit, arm=obs.arm, correct=obs.correct, pnl=obs.pnl,
                               outcome_t_s=obs.outcome_t_s)
    assert data.absent(plain.covariate_hit) and plain.covariate_hit.nbytes == 8 * len(plain)  # a view
    s = summarize(design(plain), plain, END_S)
    assert s.hit_covariate is None and s.hit_values()[0] is s.hit_sum
    assert all(a is b for a, b in zip(s.pnl_values(), (s.pnl_sum, s.pnl_sq, s.pnl_n), strict=True))
    constant = Observations.build(t_s=obs.t_s, unit=obs.unit, arm=obs.arm, correct=obs.correct,
                                  outcome_t_s=obs.outcome_t_s, covariate_hit=np.full(len(obs), 0.5))
    assert summarize(design(constant), constant, END_S).cuped == {}  # nothing to explain with


def test_advancing_in_two_steps_gives_the_same_adjustment_as_one():
    obs = table()
    e = design(obs)
    steps = Accumulator(e, obs)
    steps.advance(1200.0)
    stepped = steps.advance(END_S)
    once = summarize(e, obs, END_S)
    for a, b in ((stepped.hit_values(), once.hit_values()), (stepped.pnl_values(), once.pnl_values())):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-9)
    assert stepped.cuped.keys() == once.cuped.keys() == {"hit_rate", "pnl"}
    for metric, report in once.cuped.items():
        assert stepped.cuped[metric] == pytest.approx(report, rel=1e-9)


def test_the_cuped_report_is_json_ready():
    import json

    obs = table()
    report = summarize(design(obs), obs, END_S).cuped
    assert set(report) == {"hit_rate", "pnl"}
    json.dumps(report, allow_nan=False)
    assert all(type(v) is float for metric in report.values() for v in metric.values())


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_tables_carry_the_covariate_columns(tmp_path, suffix):
    obs = table(n=2_000)
    back = simulate.read_table(simulate.write_table(tmp_path / f"t{suffix}", obs))
    for name in ("covariate_hit", "covariate_pnl"):
        np.testing.assert_array_equal(getattr(back, name), getattr(obs, name))  # NaN stays unknown
    plain = Observations.build(t_s=obs.t_s, unit=obs.unit, arm=obs.arm, correct=obs.correct)
    path = simulate.write_table(tmp_path / f"p{suffix}", plain)
    assert "covariate" not in (path.read_text().splitlines()[0] if suffix == ".csv" else "")
    assert data.absent(simulate.read_table(path).covariate_hit)


def test_a_bad_covariate_cell_is_named(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("time,unit,arm,correct,covariate_hit\n1,S1,control,1,0.5\n2,S1,control,1,abc\n")
    with pytest.raises(ValueError, match="t.csv, line 3, column 'covariate_hit': 'abc' is not a number"):
        data.read_table(path)
    path.write_text("time,unit,arm,covariate_pnl\n1,S1,control,inf\n")
    with pytest.raises(ValueError, match="line 2, column 'covariate_pnl'"):
        data.read_table(path)
    with pytest.raises(ValueError, match="covariate_hit: must be a finite number"):
        Observations.build(t_s=[1.0], unit=[0], arm=[0], covariate_hit=[math.inf])


def test_fit_refuses_moments_too_large_to_square():
    m = cuped.Moments.zeros((1, 2))
    m.add(np.array([0, 1] * 100), np.full(200, 1e200), np.ones(200))
    per_arm = np.array([[100.0, 100.0]])
    assert cuped.fit(m, per_arm, per_arm, per_arm) is None
