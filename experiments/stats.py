"""Statistics for experiments. Every test is scipy's own where scipy has one.

- Sample-ratio mismatch: chi-square goodness of fit (``scipy.stats.chisquare``) for a
  single check; for the check made at every analysis, an anytime-valid Bayes factor of
  a Dirichlet-multinomial mixture against the configured split (Lindon & Malek, 2022,
  with ``scipy.stats.dirichlet_multinomial`` and ``multinomial``).
- Hit rate (binary): two-proportion test (``chi2_contingency`` without continuity
  correction, which equals the pooled z-test); paired, in shadow mode: exact
  McNemar (``binomtest`` on the discordant pairs).
- P&L: Yuen–Welch trimmed t-test (``ttest_ind(equal_var=False, trim=…)``).
- Latency p95: bootstrap interval of the quantile difference (``bootstrap``).
- Error rate: Fisher's exact test on the counts (``fisher_exact``).
- Promotion at planned looks: an O'Brien–Fleming-shaped group-sequential
  boundary, calibrated by simulation of the correlated look statistics, and
  the matching sample size.
- Guardrails checked at every look: an always-valid normal-mixture confidence
  sequence (Howard et al., 2021), which scipy does not provide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CALIBRATION_PATHS = 200_000


@dataclass(frozen=True)
class TestResult:
    """One test: its name, statistic, p-value, and the effect with its interval (b − a)."""

    test: str
    statistic: float
    p_value: float
    estimate: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")


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


def quantile_difference(a: Sequence[float], b: Sequence[float], q: float = 0.95, confidence: float = 0.95,
                        n_resamples: int = 2000, seed: int = 0) -> TestResult:
    """Latency: bootstrap interval of quantile(b) − quantile(a) (no p-value)."""
    def diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.quantile(y, q, axis=axis) - np.quantile(x, q, axis=axis)

    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    result = stats.bootstrap((xa, xb), diff, confidence_level=confidence, n_resamples=n_resamples,
                             method="percentile", rng=np.random.default_rng(seed))
    return TestResult(f"bootstrap p{int(q * 100)} difference", float("nan"), float("nan"),
                      float(diff(xa, xb)), float(result.confidence_interval.low),
                      float(result.confidence_interval.high))


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


def obrien_fleming_bounds(looks: int, alpha: float, seed: int = 0) -> np.ndarray:
    """One-sided z boundaries c_k = C·sqrt(K/k) whose overall false-positive rate is ``alpha``."""
    z = _look_paths(looks, seed)
    shape = np.sqrt(np.arange(1, looks + 1) / looks)  # crossing c_k ⇔ Z_k·sqrt(k/K) ≥ C
    constant = np.quantile((z * shape).max(axis=1), 1 - alpha)
    return constant / shape


def sequential_drift(looks: int, alpha: float, power: float, seed: int = 0) -> float:
    """The final-look mean of Z at which the boundary is crossed with probability ``power``."""
    bounds = obrien_fleming_bounds(looks, alpha, seed)
    z = _look_paths(looks, seed + 1, 20_000)
    info = np.sqrt(np.arange(1, looks + 1) / looks)
    low, high = 0.0, 10.0
    for _ in range(40):
        mid = (low + high) / 2
        crossed = ((z + mid * info) >= bounds).any(axis=1).mean()
        low, high = (mid, high) if crossed < power else (low, mid)
    return high


def sample_size_two_proportions(p_control: float, effect: float, *, alpha: float, power: float,
                                looks: int, seed: int = 0) -> int:
    """Per-arm sample size to detect ``effect`` (absolute) with the group-sequential boundary."""
    p_treat = p_control + effect
    variance = p_control * (1 - p_control) + p_treat * (1 - p_treat)
    drift = sequential_drift(looks, alpha, power, seed)
    return math.ceil(variance * (drift / effect) ** 2)


def confidence_sequence(mean: float, variance: float, n: int, alpha: float,
                        tight_n: int = 1000) -> tuple[float, float]:
    """Always-valid two-sided interval for a mean after ``n`` observations (normal mixture).

    Valid simultaneously over every n, so it may be checked after every request
    without inflating the error rate; narrowest around ``tight_n`` observations.
    Boundary: |S_n| <= sqrt((V + r) log((V + r) / (r (alpha/2)^2))) with V = n·variance.
    """
    if n <= 0:
        return -math.inf, math.inf
    v, rho = n * variance, max(variance * tight_n, 1e-12)
    radius = math.sqrt((v + rho) * math.log((v + rho) / (rho * (alpha / 2) ** 2))) / n
    return mean - radius, mean + radius


def simulate_promotions(p_control: float, effect: float, n_per_arm: int, *, looks: int, alpha: float,
                        sims: int, seed: int = 0) -> dict[str, float]:
    """How often the group-sequential rule promotes, against naive testing at every look.

    Each simulated experiment accrues ``n_per_arm`` binary outcomes per arm in
    ``looks`` equal steps; at each look the pooled two-proportion z is compared
    with the O'Brien–Fleming bound (sequential) and with a fixed one-sided
    z_{1-0.05} (naive peeking, what the original design did).
    """
    rng = np.random.default_rng(seed)
    step = n_per_arm // looks
    hits_a = np.cumsum(rng.binomial(step, p_control, (sims, looks)), axis=1)
    hits_b = np.cumsum(rng.binomial(step, p_control + effect, (sims, looks)), axis=1)
    n = step * np.arange(1, looks + 1)
    pooled = (hits_a + hits_b) / (2 * n)
    se = np.sqrt(np.maximum(pooled * (1 - pooled), 1e-12) * 2 / n)
    z = (hits_b - hits_a) / n / se
    bounds = obrien_fleming_bounds(looks, alpha, seed)
    return {"sequential": float((z >= bounds).any(axis=1).mean()),
            "naive_peeking_p05": float((z >= stats.norm.ppf(0.95)).any(axis=1).mean())}
