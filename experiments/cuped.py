"""CUPED: variance reduction with a pre-experiment covariate (Deng, Xu, Kohavi & Walker, 2013).

Each outcome ``Y`` is compared through ``Y_adj = Y − θ (X − X̄)`` where ``X`` is a number
known before the experiment that the arm cannot change (the symbol's hit rate in a
pre-period). ``X`` is independent of the arm, so the adjustment has the same mean in both
arms and the difference of adjusted means stays unbiased, while its variance falls by
about R², the share of ``Y``'s variance ``X`` explains. When the unit is the symbol the
between-symbol spread, which no amount of traffic averages away, is what ``X`` explains.

θ is one slope for both arms: the pooled within-arm covariance over the pooled within-arm
variance, which is the OLS coefficient of ``X`` in ``Y ~ arm + X``, so the adjusted
difference equals that regression's arm coefficient (Frisch–Waugh). θ is re-estimated at
each analysis from the data so far, both arms pooled; treated as known in the variance, as
CUPED does, it costs O(1/n).

Rows whose covariate is unknown (a symbol the pre-period never saw) take the known rows'
mean ``X̄``: they are adjusted by nothing and still count. Whether a row's covariate is known
is decided before the experiment (by its route), so it too is independent of the arm and
the estimate stays unbiased; an unknown-indicator regressor would also correct a chance
imbalance of unknown rows between the arms, which is second order while few are unknown,
and would cost a second slope per metric.

Everything is kept as per-cluster, per-arm sums (:class:`Moments`), advanced a few rows at
a time, so the cluster-robust variance of :func:`experiments.stats.cluster_difference` is
the adjusted values' own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_COVARIATE_ROWS = 100  # rows with a known covariate before θ is trusted
_RELATIVE_VARIANCE = 1e-12  # a covariate whose variance is below this share of its square is constant


@dataclass
class Moments:
    """Per cluster and arm, over the rows that count for a metric *and* have a known covariate:
    their number and the sums of X, Y, X·Y and X²; shape (clusters, 2) each."""

    n: np.ndarray
    x: np.ndarray
    y: np.ndarray
    xy: np.ndarray
    xx: np.ndarray

    @classmethod
    def zeros(cls, shape: tuple[int, int]) -> Moments:
        """Nothing seen yet."""
        return cls(*(np.zeros(shape) for _ in range(5)))

    def add(self, key: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """Rows with cell ``key`` (cluster · 2 + arm), covariate ``x`` (NaN: unknown) and value ``y``."""
        known = ~np.isnan(x)
        key, x, y = key[known], x[known], y[known]
        size, shape = self.n.size, self.n.shape
        with np.errstate(over="ignore", invalid="ignore"):  # a covariate too large to square: fit() says no
            products = ((self.n, None), (self.x, x), (self.y, y), (self.xy, x * y), (self.xx, x * x))
            for total, weights in products:
                total += np.bincount(key, weights=weights, minlength=size).reshape(shape)


@dataclass(frozen=True)
class Fit:
    """The adjustment of one metric at one analysis."""

    theta: float
    centre: float  # X̄: the known rows' mean covariate (both arms)
    covariate_share: float  # of the rows that count, those with a known covariate
    variance_reduction: float  # 1 − var(Y_adj) / var(Y), within arms: the R² of Y on X

    def to_dict(self) -> dict[str, float | None]:
        """JSON-ready (no NaN)."""
        return {"theta": finite(self.theta), "covariate_share": finite(self.covariate_share),
                "variance_reduction": finite(self.variance_reduction)}


def finite(value: float) -> float | None:
    """``value`` as a float, or None when it is NaN or infinite (JSON has neither)."""
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class _Centred:
    """Per cluster and arm, sums of Z = X − X̄ (0 where X is unknown): Z, Z·Y and Z²."""

    z: np.ndarray
    zy: np.ndarray
    zz: np.ndarray


def _centred(m: Moments, centre: float) -> _Centred:
    return _Centred(m.x - centre * m.n, m.xy - centre * m.y, m.xx - 2 * centre * m.x + centre * centre * m.n)


def fit(m: Moments | None, sums: np.ndarray, squares: np.ndarray, counts: np.ndarray) -> Fit | None:
    """θ from both arms' within-arm moments; None when too few rows have a covariate, it does not
    vary, or the moments are not finite (values too large to square)."""
    if m is None:
        return None
    known = float(m.n.sum())
    if known < MIN_COVARIATE_ROWS:
        return None
    centre = float(m.x.sum()) / known
    spread = float(m.xx.sum()) / known - centre * centre
    if not (math.isfinite(spread) and spread > _RELATIVE_VARIANCE * max(1.0, centre * centre)):
        return None
    c = _centred(m, centre)
    n, y = counts.sum(axis=0), sums.sum(axis=0)
    arms = n > 0
    z = c.z.sum(axis=0)
    sxx = float(np.sum(c.zz.sum(axis=0)[arms] - z[arms] ** 2 / n[arms]))
    sxy = float(np.sum(c.zy.sum(axis=0)[arms] - z[arms] * y[arms] / n[arms]))
    syy = float(np.sum(squares.sum(axis=0)[arms] - y[arms] ** 2 / n[arms]))
    if not (math.isfinite(sxx) and math.isfinite(sxy) and sxx > 0):
        return None
    theta = sxy / sxx
    # Within arms, var(Y − θZ) = Syy − θ Sxy: the share removed is Sxy² / (Sxx Syy), the R².
    reduction = theta * sxy / syy if syy > 0 else math.nan
    return Fit(theta, centre, known / float(n.sum()), reduction)


def adjust(m: Moments, f: Fit, sums: np.ndarray, squares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster and arm, the sums and squares of Y − θ Z: what the raw ones are of Y."""
    c = _centred(m, f.centre)
    return sums - f.theta * c.z, squares - 2 * f.theta * c.zy + f.theta * f.theta * c.zz
