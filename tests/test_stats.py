"""Experiment statistics: scipy's own numbers, SRM detection, sequential error rates."""

import numpy as np
import pytest
from scipy import stats

from experiments import stats as S
from experiments.validate import main as validate_main


def test_p_values_are_scipys_own():
    assert S.two_proportions(530, 1000, 580, 1000).p_value == pytest.approx(
        stats.chi2_contingency([[530, 470], [580, 420]], correction=False)[1], rel=1e-12)
    assert S.mcnemar_exact(40, 62).p_value == pytest.approx(stats.binomtest(62, 102, 0.5).pvalue, rel=1e-12)
    rng = np.random.default_rng(0)
    a, b = rng.standard_t(3, 400), rng.standard_t(3, 400) + 0.3
    assert S.trimmed_welch(a, b).p_value == pytest.approx(
        stats.ttest_ind(b, a, equal_var=False, trim=0.1).pvalue, rel=1e-12)
    assert S.error_rates(30, 10_000, 55, 10_000).p_value == pytest.approx(
        stats.fisher_exact([[55, 9945], [30, 9970]])[1], rel=1e-12)
    assert S.sample_ratio_mismatch([9000, 1000], [0.9, 0.1]).p_value == pytest.approx(1.0)


def test_two_proportion_interval_and_sign():
    result = S.two_proportions(500, 1000, 560, 1000)
    assert result.estimate == pytest.approx(0.06) and result.ci_low < 0.06 < result.ci_high
    assert result.ci_low > 0, "a 6 pp difference at n=1000 per arm is clearly positive"


def test_srm_detects_a_90_10_split_drifting_to_88_12_at_20000():
    assert S.sample_ratio_mismatch([17_600, 2_400], [0.9, 0.1]).p_value < 0.001
    assert S.sample_ratio_mismatch([18_030, 1_970], [0.9, 0.1]).p_value > 0.001


def test_bootstrap_quantile_difference_covers_the_shift():
    rng = np.random.default_rng(1)
    a = rng.gamma(2.0, 1.0, 3000)
    b = rng.gamma(2.0, 1.0, 3000) + 2.0
    result = S.quantile_difference(a, b, q=0.95, n_resamples=500)
    assert result.ci_low < 2.0 < result.ci_high and result.ci_low > 1.0


def test_confidence_sequence_holds_at_every_look():
    rng = np.random.default_rng(2)
    sums = np.cumsum(rng.standard_normal((400, 1500)), axis=1)
    ns = np.arange(1, 1501)
    radius = np.array([S.confidence_sequence(0.0, 1.0, int(n), 0.05)[1] for n in ns])
    assert (np.abs(sums / ns) > radius).any(axis=1).mean() <= 0.05


def test_obrien_fleming_bounds_shape():
    bounds = S.obrien_fleming_bounds(40, 0.005)
    assert np.all(np.diff(bounds) < 0), "strict early, lenient late"
    assert 2.576 < bounds[-1] < 3.0, "slightly above the fixed-design z_{0.995}"


def test_light_simulation_meets_the_targets(capsys):
    assert validate_main(["--sims", "2000", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "A/A false promotions" in out and "OK" in out
    null = S.simulate_promotions(0.55, 0.0, 8000, looks=40, alpha=0.005, sims=2000, seed=4)
    assert null["sequential"] <= 0.01 < 0.15 < null["naive_peeking_p05"]


def _srm_paths(paths: int, looks: int, per_look: int, share: float, seed: int) -> np.ndarray:
    """Cumulative (control, treatment) exposures at each look: shape (paths, looks, 2)."""
    rng = np.random.default_rng(seed)
    treatment = rng.binomial(per_look, share, size=(paths, looks)).cumsum(axis=1)
    total = per_look * np.arange(1, looks + 1)
    return np.stack([total - treatment, treatment], axis=-1)


def test_sequential_srm_checked_at_every_look_keeps_false_halts_below_alpha():
    # A/A at 90/10, checked at 200 analyses (one a minute): the chi-square test checked that
    # often halts far more than its nominal 0.1 %; the anytime-valid test stays below it.
    counts = _srm_paths(2000, 200, 100, 0.10, seed=3)
    log_bf = S.srm_log_bayes_factor(counts, [0.9, 0.1])
    sequential_false_halts = np.mean((log_bf >= np.log(1 / 0.001)).any(axis=1))
    expected = counts.sum(axis=-1, keepdims=True) * np.array([0.9, 0.1])
    chi2 = (((counts - expected) ** 2) / expected).sum(axis=-1)
    chi_square_false_halts = np.mean((stats.chi2.sf(chi2, df=1) < 0.001).any(axis=1))
    assert sequential_false_halts <= 0.002
    assert chi_square_false_halts > 3 * max(sequential_false_halts, 0.001)


def test_sequential_srm_detects_a_real_mismatch_and_agrees_with_its_vector_form():
    counts = _srm_paths(500, 200, 100, 0.12, seed=4)  # 88/12 where 90/10 was configured
    detected = (S.srm_log_bayes_factor(counts, [0.9, 0.1]) >= np.log(1000)).any(axis=1)
    assert detected.mean() >= 0.95
    single = S.sequential_srm([17_600, 2_400], [0.9, 0.1])
    assert single.p_value < 0.001 and single.estimate == pytest.approx(0.12)
    assert single.statistic == pytest.approx(float(S.srm_log_bayes_factor(np.array([17_600, 2_400]),
                                                                          [0.9, 0.1])))
    assert S.sequential_srm([9000, 1000], [0.9, 0.1]).p_value == 1.0
    assert S.sequential_srm([0, 0], [0.9, 0.1]).p_value == 1.0
