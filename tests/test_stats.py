"""Experiment statistics: scipy's own numbers, SRM detection, sequential error rates."""

import numpy as np
import pytest
from scipy import stats

from experiments import stats as S


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


def test_two_proportions_never_raises_on_degenerate_arms():
    assert S.two_proportions(500, 500, 90, 90).p_value == 1.0  # both all-correct: scipy alone raises
    assert S.two_proportions(0, 500, 0, 90).p_value == 1.0
    assert S.two_proportions(0, 0, 3, 5).p_value == 1.0


def test_cluster_difference_is_statsmodels_cluster_robust_ols():
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(5)
    for both_arms_per_cluster in (False, True):
        clusters = rng.integers(0, 30, 3000)
        arm = rng.integers(0, 2, 3000) if both_arms_per_cluster else (clusters % 7 == 0).astype(int)
        y = rng.normal(0.1 * arm + rng.normal(0, 1, 30)[clusters], 1.0)
        sums, counts = np.zeros((30, 2)), np.zeros((30, 2))
        np.add.at(sums, (clusters, arm), y)
        np.add.at(counts, (clusters, arm), 1)
        d = S.cluster_difference(sums, counts)
        fit = sm.OLS(y, sm.add_constant(arm.astype(float))).fit(cov_type="cluster",
                                                                cov_kwds={"groups": clusters})
        assert d.estimate == pytest.approx(fit.params[1], rel=1e-9)
        assert d.variance == pytest.approx(fit.cov_params()[1, 1], rel=1e-9)


def test_cluster_variance_is_never_below_the_independent_one():
    # Two clusters can give a sandwich near zero by chance; the floor keeps the interval honest.
    sums, counts = np.array([[10.0, 5.0], [10.0, 5.0]]), np.array([[20.0, 10.0], [20.0, 10.0]])
    assert S.cluster_difference(sums, counts).variance == 0.0
    floor = S.independent_variance(sums, sums, counts)
    assert S.cluster_difference(sums, counts, floor=floor).variance == floor > 0
    assert S.cluster_difference(np.zeros((1, 2)), np.array([[3.0, 0.0]])).information == 0.0


def test_sample_size_with_the_allocation_ratio_matches_statsmodels():
    power = pytest.importorskip("statsmodels.stats.power")
    for p, effect, share in ((0.55, 0.02, 0.10), (0.55, 0.02, 0.5), (0.30, 0.05, 0.25)):
        ours = S.sample_size_two_proportions(p, effect, alpha=0.005, power=0.8, looks=1,
                                             treatment_share=share)
        ratio = (1 - share) / share
        # NormalIndPower standardises by one sd for both arms; the sd whose allocation-weighted
        # variance is ours, p_t(1-p_t) + p_c(1-p_c)/r, makes the two formulas the same design.
        sd = np.sqrt(((p + effect) * (1 - p - effect) + p * (1 - p) / ratio) / (1 + 1 / ratio))
        theirs = power.NormalIndPower().solve_power(effect / sd, alpha=0.005, power=0.8, ratio=ratio,
                                                     alternative="larger")
        assert ours.treatment == pytest.approx(theirs, rel=0.001)
        assert ours.control == pytest.approx(ours.treatment * ratio, abs=1)
    pooled_sd = np.sqrt(0.56 * 0.44)  # the textbook pooled form at the production design: within 1 %
    textbook = power.NormalIndPower().solve_power(0.02 / pooled_sd, alpha=0.005, power=0.8, ratio=9,
                                                  alternative="larger")
    assert S.sample_size_two_proportions(0.55, 0.02, alpha=0.005, power=0.8, looks=1,
                                         treatment_share=0.1).treatment == pytest.approx(textbook, rel=0.01)
    sequential = S.sample_size_two_proportions(0.55, 0.02, alpha=0.005, power=0.8, looks=40,
                                               treatment_share=0.1)
    assert 8100 < sequential.treatment < 8400 and sequential.control > 70_000  # 14,816 per arm at 50/50


def test_error_rate_sequence_covers_a_rare_rate_at_every_look():
    # 0.1 % errors, 300 looks of 10 requests: the beta-binomial mixture must hold at every look,
    # where a plug-in variance (0 errors → ±0) misses almost always.
    rng = np.random.default_rng(6)
    misses = 0
    for _ in range(300):
        x = np.cumsum(rng.random(3000) < 0.001)[9::10]
        n = np.arange(10, 3001, 10)
        bounds = [S.bernoulli_confidence_sequence(int(a), int(b), 0.025) for a, b in zip(x, n, strict=True)]
        misses += any(not lo <= 0.001 <= hi for lo, hi in bounds)
    assert misses / 300 <= 0.025
    assert S.bernoulli_confidence_sequence(0, 300, 0.025)[1] > 0.012  # not the plug-in ±0


def test_error_rate_sequence_bounds_solve_the_mixture():
    from scipy.special import betaln

    def log_mixture(p, x, n):
        return betaln(0.5 + x, 0.5 + n - x) - betaln(0.5, 0.5) - x * np.log(p) - (n - x) * np.log1p(-p)

    for x, n in ((3, 3000), (500, 1000), (1, 1), (0, 50)):
        low, high = S.bernoulli_confidence_sequence(x, n, 0.05)
        if x:
            assert log_mixture(low, x, n) == pytest.approx(np.log(20), abs=1e-6)
        if x < n:
            assert log_mixture(high, x, n) == pytest.approx(np.log(20), abs=1e-6)
    assert S.bernoulli_confidence_sequence(0, 0, 0.05) == (0.0, 1.0)


def test_mixture_radius_holds_at_every_look():
    rng = np.random.default_rng(2)
    sums = np.cumsum(rng.standard_normal((1000, 1500)), axis=1)
    n = np.arange(1, 1501)
    rho = S.mixture_rho(500, 0.05)
    radius = np.array([S.mixture_radius(float(k), 0.05, rho) for k in n])
    assert (sums / n > radius).any(axis=1).mean() <= 0.05  # one-sided, checked 1,500 times
    assert (sums / n > 1.645 / np.sqrt(n)).any(axis=1).mean() > 0.3  # a fixed interval checked as often


def test_t_corrections_shrink_to_normal_with_many_clusters():
    assert S.t_boundary(2.8, 3) > 4 and S.t_boundary(2.8, 10_000) == pytest.approx(2.8, abs=0.01)
    assert S.t_widen(0.005, 5) > 1.5 and S.t_widen(0.005, 0) == np.inf


def test_obrien_fleming_bounds_shape():
    bounds = S.obrien_fleming_bounds(40, 0.005)
    assert np.all(np.diff(bounds) < 0), "strict early, lenient late"
    assert 2.576 < bounds[-1] < 3.0, "slightly above the fixed-design z_{0.995}"
    assert S.obrien_fleming_bounds(1, 0.005)[0] == pytest.approx(stats.norm.ppf(0.995))


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
