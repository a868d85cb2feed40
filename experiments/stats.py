"""Statistics for experiments: scipy's own tests where scipy has one, always-valid ones where not.

What the live analysis (``experiments.analysis``) uses:

- Sample-ratio mismatch checked at every analysis: an anytime-valid Bayes factor of a
  Dirichlet-multinomial mixture against the configured split (Lindon & Malek, 2022,
  with ``scipy.stats.dirichlet_multinomial`` and ``multinomial``).
- Effects of hit rate and P&L: difference of per-arm ratio means with a
  cluster-robust (Liang–Zeger) variance on per-unit sums — statsmodels' OLS
  ``cov_type="cluster"`` — never below the independent-observations variance.
- Promotion: an O'Brien–Fleming-shaped group-sequential boundary at planned looks,
  calibrated by simulating the correlated look statistics, t-corrected for the
  number of clusters; the matching sample size with the allocation ratio.
- Guardrails, checked as often as one likes: normal-mixture confidence sequences
  (Howard et al., 2021) for the effects, and the conjugate beta-binomial mixture
  for rates of rare events (errors, outcome arrival, latency exceedances), which
  keeps its coverage at a 0.1 % rate where a plug-in variance does not.

Fixed-sample reference tests, equal to scipy's: chi-square SRM, the two-proportion
test, exact McNemar, Yuen–Welch trimmed t, Fisher's exact test.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

from experiments import calibration_cache

CALIBRATION_PATHS = 200_000
MIN_SANDWICH_CLUSTERS = 30  # below this many effective clusters the cluster-robust variance has a floor


@dataclass(frozen=True)
class TestResult:
    """One test: its name, statistic, p-value, and the effect with its interval (b − a).

    In an analysis, ``metric`` names what was measured, ``role`` is ``primary``,
    ``guardrail`` or ``check``, ``units`` says what ``estimate`` and the interval are
    in, and ``threshold`` is the boundary or margin the interval is judged against.
    """

    test: str
    statistic: float
    p_value: float
    estimate: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    metric: str = ""
    role: str = ""
    units: str = ""
    threshold: float = float("nan")


def sample_ratio_mismatch(observed: Sequence[int], weights: Sequence[float]) -> TestResult:
    """Do the exposures per arm fit the configured split? (chi-square goodness of fit)"""
    counts = np.asarray(observed, dtype=float)
    expected = np.asarray(weights, dtype=float) / np.sum(weights) * counts.sum()
    result = stats.chisquare(counts, expected)
    return TestResult("chi-square SRM", float(result.statistic), float(result.pvalue))


SRM_PRIOR_CONCENTRATION = 100.0  # Dirichlet prior centred on the configured split, worth 100 units


def srm_log_bayes_factor(counts: np.ndarray, weights: Sequence[float], *,
                         concentration: float = SRM_PRIOR_CONCENTRATION) -> np.ndarray:
    """log BF of the Dirichlet-multinomial mixture vs the split, over the last axis of ``counts``."""
    counts = np.asarray(counts, dtype=np.int64)
    p0 = np.asarray(weights, dtype=float) / float(np.sum(weights))
    n = counts.sum(axis=-1)
    log_bf: np.ndarray = (stats.dirichlet_multinomial.logpmf(counts, concentration * p0, n)
                          - stats.multinomial.logpmf(counts, n, p0))
    return log_bf


def sequential_srm(observed: Sequence[int], weights: Sequence[float], *,
                   concentration: float = SRM_PRIOR_CONCENTRATION) -> TestResult:
    """Sample-ratio mismatch that may be checked at every analysis without inflating false alarms.

    The statistic is the log Bayes factor of a Dirichlet-multinomial mixture (prior
    centred on the configured split) against the split itself. Under the null it is a
    nonnegative martingale, so by Ville's inequality P(it ever reaches 1/alpha) <= alpha:
    the p-value min(1, 1/BF) is valid at every look, however many. ``estimate`` is the
    last arm's observed share.
    """
    counts = np.asarray(observed, dtype=np.int64)
    n = int(counts.sum())
    if n == 0:
        return TestResult("sequential SRM (Dirichlet-multinomial)", 0.0, 1.0)
    log_bf = float(srm_log_bayes_factor(counts, weights, concentration=concentration))
    return TestResult("sequential SRM (Dirichlet-multinomial)", log_bf, float(min(1.0, math.exp(-log_bf))),
                      estimate=float(counts[-1] / n))


def two_proportions(hits_a: int, n_a: int, hits_b: int, n_b: int, confidence: float = 0.95) -> TestResult:
    """Difference of two hit rates (b − a): pooled test, Wald interval for the difference."""
    table = [[hits_a, n_a - hits_a], [hits_b, n_b - hits_b]]
    if not (n_a and n_b):
        return TestResult("two-proportion chi-square", 0.0, 1.0)
    if hits_a + hits_b in (0, n_a + n_b):  # all right or all wrong: no difference to test (scipy raises)
        chi2, p_value = 0.0, 1.0
    else:
        chi2, p_value, _, _ = stats.chi2_contingency(table, correction=False)
    pa, pb = hits_a / n_a, hits_b / n_b
    se = math.sqrt(pa * (1 - pa) / n_a + pb * (1 - pb) / n_b)
    z = stats.norm.ppf(0.5 + confidence / 2)
    return TestResult("two-proportion chi-square", float(chi2), float(p_value), pb - pa,
                      pb - pa - z * se, pb - pa + z * se)


def mcnemar_exact(only_a_right: int, only_b_right: int) -> TestResult:
    """Paired hit rates in shadow mode: exact binomial test on the discordant pairs."""
    n = only_a_right + only_b_right
    result = stats.binomtest(only_b_right, n, 0.5) if n else None
    p_value = float(result.pvalue) if result else 1.0
    estimate = (only_b_right - only_a_right) / max(n, 1)
    return TestResult("exact McNemar", float(only_b_right), p_value, estimate)


def trimmed_welch(a: Sequence[float], b: Sequence[float], trim: float = 0.1,
                  confidence: float = 0.95) -> TestResult:
    """P&L per outcome: Yuen's trimmed-mean Welch test, robust to fat tails."""
    result = stats.ttest_ind(b, a, equal_var=False, trim=trim)
    ci = result.confidence_interval(confidence)
    estimate = float(stats.trim_mean(b, trim) - stats.trim_mean(a, trim))
    return TestResult(f"Welch t, {trim:.0%} trimmed", float(result.statistic), float(result.pvalue),
                      estimate, float(ci.low), float(ci.high))


def error_rates(errors_a: int, n_a: int, errors_b: int, n_b: int) -> TestResult:
    """Error counts: Fisher's exact test; the estimate is the rate ratio b / a."""
    table = [[errors_b, n_b - errors_b], [errors_a, n_a - errors_a]]
    odds, p_value = stats.fisher_exact(table)
    ratio = (errors_b / n_b) / (errors_a / n_a) if errors_a else float("inf") if errors_b else 1.0
    return TestResult("Fisher exact", float(odds), float(p_value), ratio)


# ---- sequential designs --------------------------------------------------------------------

def _look_paths(looks: int, seed: int, n_paths: int = CALIBRATION_PATHS) -> np.ndarray:
    """Z statistics at equally spaced looks under the null: (paths, looks), Z_k = S_k / sqrt(k)."""
    steps = np.random.default_rng(seed).standard_normal((n_paths, looks))
    return np.cumsum(steps, axis=1) / np.sqrt(np.arange(1, looks + 1))


@functools.lru_cache(maxsize=64)
@calibration_cache.disk_cached  # 200,000 simulated paths: seconds per process otherwise
def _obf_bounds(looks: int, alpha: float, seed: int) -> tuple[float, ...]:
    if looks == 1:
        return (float(special.ndtri(1 - alpha)),)
    z = _look_paths(looks, seed)
    shape = np.sqrt(np.arange(1, looks + 1) / looks)  # crossing c_k ⇔ Z_k·sqrt(k/K) ≥ C
    constant = np.quantile((z * shape).max(axis=1), 1 - alpha)
    return tuple((constant / shape).tolist())


def obrien_fleming_bounds(looks: int, alpha: float, seed: int = 0) -> np.ndarray:
    """One-sided z boundaries c_k = C·sqrt(K/k) whose overall false-positive rate is ``alpha``.

    Calibrated once per (looks, alpha) by simulating the correlated look statistics.
    """
    return np.array(_obf_bounds(looks, alpha, seed))


@functools.lru_cache(maxsize=64)
def _crossing_drifts(looks: int, alpha: float, seed: int) -> np.ndarray:
    """Per simulated null path, the least final-look drift at which it crosses a boundary: sorted.

    A path with look statistics Z_k crosses at drift d (mean of Z at the last look, so
    d·sqrt(k/K) at look k) iff d >= min_k (c_k − Z_k) / sqrt(k/K). The power at any drift
    is then the share of paths whose least drift is at most d: one pass, no search.
    """
    bounds = obrien_fleming_bounds(looks, alpha, seed)
    z = _look_paths(looks, seed + 1, 20_000)
    info = np.sqrt(np.arange(1, looks + 1) / looks)
    return np.sort(((bounds - z) / info).min(axis=1))


def boundary_power(looks: int, alpha: float, drift: float, seed: int = 0) -> float:
    """P(the boundary is crossed at some look) when the final-look mean of Z is ``drift``.

    For one look it is the fixed design's Φ(drift − z_{1-alpha}).
    """
    if looks == 1:
        return float(special.ndtr(drift - special.ndtri(1 - alpha)))
    drifts = _crossing_drifts(looks, alpha, seed)
    return float(np.searchsorted(drifts, drift, side="right") / len(drifts))


@functools.lru_cache(maxsize=64)
@calibration_cache.disk_cached
def sequential_drift(looks: int, alpha: float, power: float, seed: int = 0) -> float:
    """The final-look mean of Z at which the boundary is crossed with probability ``power``.

    For one look it is the fixed design's z_{1-alpha} + z_{power}.
    """
    if looks == 1:
        return float(special.ndtri(1 - alpha) + special.ndtri(power))
    return float(np.quantile(_crossing_drifts(looks, alpha, seed), power))


@dataclass(frozen=True)
class SampleSize:
    """Outcomes needed per arm (the treatment is the smaller arm at a 90/10 split)."""

    treatment: int
    control: int


def sample_size_two_proportions(p_control: float, effect: float, *, alpha: float, power: float,
                                looks: int, treatment_share: float = 0.5, seed: int = 0) -> SampleSize:
    """Outcomes per arm to detect ``effect`` (absolute) with the group-sequential boundary.

    Unequal allocation: with ratio r = control / treatment, the variance of the
    difference is p_t(1-p_t)/n_t + p_c(1-p_c)/(r n_t). For one look this is
    statsmodels' ``NormalIndPower(ratio=r)`` up to its pooled variance.
    """
    p_treat = min(max(p_control + effect, 1e-6), 1 - 1e-6)
    ratio = (1 - treatment_share) / treatment_share
    variance = p_treat * (1 - p_treat) + p_control * (1 - p_control) / ratio
    n_treatment = math.ceil(variance * (sequential_drift(looks, alpha, power, seed) / effect) ** 2)
    return SampleSize(n_treatment, math.ceil(n_treatment * ratio))


def max_information(effect: float, *, alpha: float, power: float, looks: int) -> float:
    """Information (1 / variance of the effect estimate) at which the design has ``power``."""
    return (sequential_drift(looks, alpha, power) / effect) ** 2


# ---- cluster-robust differences and always-valid intervals ---------------------------------

@dataclass(frozen=True)
class Difference:
    """Treatment mean − control mean of a per-unit ratio metric, with a cluster-robust variance."""

    estimate: float
    variance: float
    mean_control: float
    mean_treatment: float
    n_control: int
    n_treatment: int
    clusters: int  # clusters with data
    df: int  # for small-sample t corrections: the arms' smaller effective number of clusters − 1

    @property
    def information(self) -> float:
        """1 / variance (0 when nothing is known)."""
        return 1 / self.variance if self.variance > 0 else 0.0


def cluster_difference(sums: np.ndarray, counts: np.ndarray, *, floor: float = 0.0) -> Difference:
    """Difference of means from per-cluster sums and counts, shape (clusters, 2) [control, treatment].

    The delta method on per-cluster sums (Liang–Zeger sandwich): it is the OLS slope of
    y on the arm with cluster-robust errors, and equals statsmodels' ``cov_type="cluster"``
    with its small-sample factor G/(G-1)·(N-1)/(N-2). Clusters may hold one arm (the unit
    is randomised) or both (time blocks, shadow pairs). ``floor`` is a least variance
    while there are fewer than ``MIN_SANDWICH_CLUSTERS`` clusters: the analysis passes
    the independent-observations variance, because with few clusters the sandwich can
    come out near zero by chance (positive dependence only adds to it).
    """
    n = counts.sum(axis=0)
    if n[0] == 0 or n[1] == 0:
        return Difference(math.nan, math.inf, math.nan, math.nan, int(n[0]), int(n[1]), 0, 0)
    mean = sums.sum(axis=0) / n
    used = counts.sum(axis=1) > 0
    residual = sums[used] - mean * counts[used]  # per cluster and arm: sum minus its mean's share
    psi = residual[:, 1] / n[1] - residual[:, 0] / n[0]
    g, total = int(used.sum()), int(n.sum())
    factor = g / (g - 1) * (total - 1) / (total - 2) if g > 1 and total > 2 else math.inf
    sandwich = factor * float(psi @ psi)
    # Unequal clusters carry less information than their count: one symbol with 19 % of the
    # traffic is nearly a cluster of its own. The effective number 1 / Σ w² per arm (Carter,
    # Schnepel & Steigerwald, 2017) sets the t degrees of freedom and whether the floor holds.
    weights = counts / n
    effective = float((1 / (weights * weights).sum(axis=0)).min())
    # With few effective clusters the sandwich can come out near zero by chance: the floor holds
    # then. With many it is trusted as it is (a max() would bias every variance up, costing power).
    variance = float(max(sandwich, floor) if effective < MIN_SANDWICH_CLUSTERS else sandwich)
    return Difference(float(mean[1] - mean[0]), variance, float(mean[0]), float(mean[1]), int(n[0]),
                      int(n[1]), g, max(math.floor(effective) - 1, 0))


def independent_variance(sums: np.ndarray, squares: np.ndarray, counts: np.ndarray) -> float:
    """Variance of the difference of means as if every observation were independent (Welch)."""
    n = counts.sum(axis=0)
    if n.min() < 2:
        return math.inf
    mean = sums.sum(axis=0) / n
    var = (squares.sum(axis=0) - n * mean * mean) / (n - 1)
    return float(np.sum(np.maximum(var, 0) / n))


def bernoulli_floor(sums: np.ndarray, counts: np.ndarray) -> float:
    """Binomial variance of the difference with one pseudo-success and one pseudo-failure per arm."""
    n = counts.sum(axis=0)
    p = (sums.sum(axis=0) + 1) / (n + 2)
    return float(np.sum(p * (1 - p) / np.maximum(n, 1)))


def mixture_rho(information: float, alpha: float) -> float:
    """The normal mixture's precision that makes the sequence tightest near ``information``."""
    log_term = 2 * math.log(1 / alpha)
    return information / (log_term + math.log(1 + log_term))


def mixture_radius(information: float, alpha: float, rho: float) -> float:
    """One-sided always-valid radius for an effect estimated with ``information`` (= 1/variance).

    Normal mixture boundary for the score S = estimate·I with intrinsic time I
    (Howard, Ramdas, McAuliffe & Sekhon, 2021): P(ever S > sqrt((I+ρ)(log((I+ρ)/ρ) + 2 log(1/α))))
    <= α. With an estimated variance it is an asymptotic confidence sequence
    (Waudby-Smith et al., 2021). Use alpha/2 for a two-sided interval.
    """
    if information <= 0:
        return math.inf
    v = information + rho
    return math.sqrt(v * (math.log(v / rho) + 2 * math.log(1 / alpha))) / information


def t_widen(alpha: float, df: int) -> float:
    """How much wider a t_{df} interval is than a normal one at one-sided level ``alpha``."""
    if df < 1:
        return math.inf
    return float(special.stdtrit(df, 1 - alpha) / special.ndtri(1 - alpha))


def t_boundary(z_bound: float, df: int) -> float:
    """The t_{df} critical value with the same tail probability as the z boundary."""
    if df < 1:
        return math.inf
    return float(special.stdtrit(df, special.ndtr(z_bound)))


def _mixture_root(x: int, n: int, level: float, a: float, b: float, upper: bool) -> float:
    """The p beyond x/n where the beta-binomial mixture's log reaches ``level``.

    In logit space θ the log mixture is L - x·log p - (n-x)·log(1-p), convex in θ
    with slope n·p - x, so Newton's method started outside the root walks to it
    monotonically (a handful of steps instead of a bisection's dozens).
    """
    constant = (math.lgamma(a + x) + math.lgamma(b + n - x) - math.lgamma(a + b + n)
                - math.lgamma(a) - math.lgamma(b) + math.lgamma(a + b) - level)

    def f(theta: float) -> float:  # log mixture − level, with log p and log(1-p) from θ stably
        log_p, log_q = -_softplus(-theta), -_softplus(theta)
        return constant - x * log_p - (n - x) * log_q

    p_hat = min(max(x / n, 1e-12), 1 - 1e-12)
    centre = math.log(p_hat / (1 - p_hat))
    step = 1.0 if upper else -1.0
    theta = centre + step
    while f(theta) < 0:  # move outside the root
        step *= 2
        theta = centre + step
    for _ in range(60):
        slope = n / (1 + math.exp(-theta)) - x
        new = theta - f(theta) / slope
        if abs(new - theta) < 1e-10:
            break
        theta = new
    return 1 / (1 + math.exp(-theta))


def _softplus(v: float) -> float:
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def bernoulli_confidence_sequence(x: int, n: int, alpha: float, *, prior: tuple[float, float] = (0.5, 0.5)
                                  ) -> tuple[float, float]:
    """Always-valid two-sided interval for a Bernoulli rate after ``x`` events in ``n`` trials.

    The conjugate beta-binomial mixture martingale (Robbins, 1970; Howard et al., 2021):
    {p : B(a+x, b+n-x) / (B(a, b) p^x (1-p)^(n-x)) < 1/alpha}. Under p it is a
    nonnegative martingale, so by Ville's inequality the interval misses p at *any*
    look with probability <= alpha, however rare the event: 0 errors in 300 gives
    [0, 0.023] at alpha 0.025, not a plug-in ±0.
    """
    if n <= 0:
        return 0.0, 1.0
    level = math.log(1 / alpha)
    a, b = prior
    low = 0.0 if x == 0 else _mixture_root(x, n, level, a, b, upper=False)
    high = 1.0 if x == n else _mixture_root(x, n, level, a, b, upper=True)
    return low, high
