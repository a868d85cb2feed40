"""An experiment's observations as of one analysis time, aggregated per cluster and arm.

What counts at time ``now``:

- **Exposures, errors, units** (for the error-rate guardrail and the SRM check):
  every request answered by ``now``. Units are the distinct randomisation units.
- **Outcomes: matured cohort only.** A request counts once it is older than the
  label horizon; its outcome counts if it arrived within the horizon, otherwise it
  is *late* and the request is a missing outcome. So a request's data is final once
  it counts, and an arm whose bad outcomes arrive slowly shows up as a lower
  arrival rate (checked between arms) instead of a better hit rate.
- **Clusters** for the cluster-robust tests: the unit when the experiment assigns by
  route (a symbol's outcomes are correlated); blocks of ``BLOCK_REQUESTS`` requests in
  arrival order when a split experiment assigns by request (the arm of each request
  is drawn independently of every outcome, so blocks need not span the overlapping
  label windows, and their number grows with the traffic); time blocks of
  ``BLOCK_HORIZONS`` label horizons in shadow mode, where nothing is randomised and
  the paired differences of nearby requests may be dependent.
- **P&L** winsorised at the 0.5 % and 99.5 % quantiles of the first
  ``PNL_CALIBRATION`` matured outcomes (both arms), then fixed for the experiment:
  one fat-tailed trade cannot decide it, and the statistic does not change under
  the analysis's feet.
- **Latency** in time-aligned windows: each complete window's control p95 plus the
  margin is a threshold, and the treatment's requests in that same window are
  counted above or below it. The margin is the larger of the absolute floor and the
  relative share of that window's control p95 (:meth:`Margins.latency_margin_ms`),
  so it scales with the latency the desk has. A load change moves both arms alike.

- **Covariates** (CUPED, :mod:`experiments.cuped`): over the same rows as the hit rate
  and the (winsorised) P&L, per cluster and arm, the sums of the row's pre-experiment
  covariate X, of X·Y and X²; :meth:`Summary.hit_values` and :meth:`Summary.pnl_values`
  give the adjusted sums once enough rows have one.

The accumulator only adds what is new since the previous call, so replaying a
day's analyses costs one pass over the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from experiments import cuped, data, stats
from experiments.cuped import Moments
from experiments.data import Observations
from experiments.store import Experiment

WINDOW_S = 60.0  # latency windows
MIN_WINDOW_CONTROL = 20  # control latencies a window needs for its p95
LATENCY_QUANTILE = 0.95
BLOCK_REQUESTS = 100  # split by request: a cluster is a block of this many exposures in arrival order
BLOCK_HORIZONS = 1  # shadow by request: a cluster is a block of one label horizon
MIN_BLOCK_S = 1.0
PNL_CALIBRATION = 1000  # matured P&L outcomes that fix the winsorising bounds
PNL_CLIP = 0.005


@dataclass
class Summary:
    """The data one analysis sees; arrays of shape (clusters, 2) are [control, treatment]."""

    now_s: float
    exposures: np.ndarray
    errors: np.ndarray
    units: np.ndarray
    matured: np.ndarray
    arrived: np.ndarray
    late: np.ndarray
    hit_sum: np.ndarray
    hit_n: np.ndarray
    pnl_sum: np.ndarray
    pnl_sq: np.ndarray
    pnl_n: np.ndarray
    pnl_bounds: tuple[float, float] | None
    latency_n: int
    latency_above: int
    latency_windows: int
    pnl_sd: float = math.nan  # sd of the winsorised calibration outcomes (both arms): the P&L scale
    latency_margin_ms_sum: float = 0.0  # the windows' latency margins added up (their mean is reported)

    hit_covariate: Moments | None = None  # CUPED moments over the scored rows (None: no covariate column)
    pnl_covariate: Moments | None = None  # over the P&L rows, of the winsorised P&L

    def hit_values(self) -> tuple[np.ndarray, np.ndarray]:
        """Hit-rate (sums, counts) per cluster and arm for :func:`experiments.stats.cluster_difference`:
        CUPED-adjusted when a covariate is known for enough rows (:mod:`experiments.cuped`), else
        exactly ``(hit_sum, hit_n)``."""
        f = cuped.fit(self.hit_covariate, self.hit_sum, self.hit_sum, self.hit_n)  # 0/1: Y² = Y
        if f is None or self.hit_covariate is None:
            return self.hit_sum, self.hit_n
        return cuped.adjust(self.hit_covariate, f, self.hit_sum, self.hit_sum)[0], self.hit_n

    def pnl_values(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """P&L (sums, squares, counts) per cluster and arm, CUPED-adjusted like :meth:`hit_values`
        (squares of the adjusted values, for :func:`experiments.stats.independent_variance`), else
        exactly ``(pnl_sum, pnl_sq, pnl_n)``."""
        f = cuped.fit(self.pnl_covariate, self.pnl_sum, self.pnl_sq, self.pnl_n)
        if f is None or self.pnl_covariate is None:
            return self.pnl_sum, self.pnl_sq, self.pnl_n
        sums, squares = cuped.adjust(self.pnl_covariate, f, self.pnl_sum, self.pnl_sq)
        return sums, squares, self.pnl_n

    @property
    def cuped(self) -> dict[str, dict[str, float | None]]:
        """Per adjusted metric (``hit_rate``, ``pnl``): ``theta``, ``covariate_share``,
        ``variance_reduction`` (1 − var(Y_adj) / var(Y) within arms, ≈ R²) and
        ``effect_variance_reduction`` (of the effect's cluster-robust variance: where the unit is the
        symbol, the between-symbol spread the covariate explains); empty when no metric is adjusted.
        JSON-ready: floats or None."""
        out = {}
        for name, moments, raw in (("hit_rate", self.hit_covariate, (self.hit_sum, self.hit_sum, self.hit_n)),
                                   ("pnl", self.pnl_covariate, (self.pnl_sum, self.pnl_sq, self.pnl_n))):
            f = cuped.fit(moments, *raw)
            if f is None or moments is None:
                continue
            adjusted = cuped.adjust(moments, f, raw[0], raw[1])[0]
            before, after = (stats.cluster_difference(sums, raw[2]).variance for sums in (raw[0], adjusted))
            effect = 1 - after / before if 0 < before < math.inf and math.isfinite(after) else math.nan
            out[name] = f.to_dict() | {"effect_variance_reduction": cuped.finite(effect)}
        return out


class Accumulator:
    """Running per-cluster totals of one experiment's observations, advanced in time."""

    def __init__(self, e: Experiment, obs: Observations) -> None:
        self.obs = obs
        self.horizon_s = e.label_horizon_s
        self.margins = e.margins
        self.cluster = _clusters(e, obs)
        # NaN (no outcome) compares False; a failed request's outcome is not the model's to score.
        self.on_time = ((obs.outcome_t_s - obs.t_s) <= self.horizon_s) & ~obs.error
        self.pnl_ok = self.on_time & ~np.isnan(obs.pnl)
        clusters = int(self.cluster.max()) + 1 if len(obs) else 1
        self.key = self.cluster * 2 + obs.arm
        shape = (clusters, 2)
        names = ("matured", "arrived", "hit_sum", "hit_n", "pnl_sum", "pnl_sq", "pnl_n")
        zeros: dict[str, Any] = {name: np.zeros(shape) for name in names}
        units = int(obs.unit.max()) + 1 if len(obs) else 1
        self.seen = np.zeros(units, dtype=bool)
        self.summary = Summary(-math.inf, np.zeros(2, np.int64), np.zeros(2, np.int64), np.zeros(2, np.int64),
                               late=np.zeros(2, np.int64), pnl_bounds=None, latency_n=0, latency_above=0,
                               latency_windows=0, **zeros)
        # A covariate column nobody gave costs nothing here either.
        if not data.absent(obs.covariate_hit):
            self.summary.hit_covariate = Moments.zeros(shape)
        if not data.absent(obs.covariate_pnl):
            self.summary.pnl_covariate = Moments.zeros(shape)
        self._exposed = self._matured = self._pnl_done = self._windows = 0

    def advance(self, now_s: float) -> Summary:
        """The summary as of ``now_s`` (never earlier than the last call). Arrays are live views."""
        s, obs = self.summary, self.obs
        s.now_s = max(now_s, s.now_s)
        exposed = int(np.searchsorted(obs.t_s, s.now_s, side="right"))
        self._add_exposures(self._exposed, exposed)
        matured = int(np.searchsorted(obs.t_s, s.now_s - self.horizon_s, side="right"))
        self._add_matured(self._matured, matured)
        self._add_pnl(matured)
        self._add_windows(int((s.now_s - obs.start_s) // WINDOW_S))
        self._exposed, self._matured = exposed, matured
        return s

    def _add_exposures(self, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        s, obs = self.summary, self.obs
        arm = obs.arm[lo:hi]
        s.exposures += np.bincount(arm, minlength=2)
        s.errors += np.bincount(arm, weights=obs.error[lo:hi], minlength=2).astype(np.int64)
        units, first = np.unique(obs.unit[lo:hi], return_index=True)
        new = ~self.seen[units]
        self.seen[units] = True
        s.units += np.bincount(arm[first[new]], minlength=2)

    def _add_matured(self, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        s, obs = self.summary, self.obs
        size = s.matured.size
        # A failed request made no prediction, so no outcome is due for it: counting it would
        # read an arm's errors as missing outcomes (and HALT) instead of as its error rate.
        answered = ~obs.error[lo:hi]
        key, on_time = self.key[lo:hi], self.on_time[lo:hi]
        done = key[answered]
        s.matured += np.bincount(done, minlength=size).reshape(s.matured.shape)
        s.arrived += np.bincount(done, weights=on_time[answered], minlength=size).reshape(s.matured.shape)

        late = ~on_time & ~np.isnan(obs.outcome_t_s[lo:hi])
        s.late += np.bincount(obs.arm[lo:hi], weights=late, minlength=2).astype(np.int64)
        correct = obs.correct[lo:hi]
        scored = on_time & ~np.isnan(correct)
        shape = s.matured.shape
        s.hit_n += np.bincount(key[scored], minlength=size).reshape(shape)
        s.hit_sum += np.bincount(key[scored], weights=correct[scored], minlength=size).reshape(shape)
        if s.hit_covariate is not None:
            s.hit_covariate.add(key[scored], obs.covariate_hit[lo:hi][scored], correct[scored])

    def _add_pnl(self, matured: int) -> None:
        s, obs = self.summary, self.obs
        if s.pnl_bounds is None:
            ready = np.flatnonzero(self.pnl_ok[:matured])
            if len(ready) < PNL_CALIBRATION:
                return
            first = obs.pnl[ready[:PNL_CALIBRATION]]
            low, high = np.quantile(first, [PNL_CLIP, 1 - PNL_CLIP])
            s.pnl_bounds = (float(low), float(high))
            s.pnl_sd = float(np.std(np.clip(first, low, high), ddof=1))
        lo, hi = self._pnl_done, matured
        if hi <= lo:
            return
        ok = self.pnl_ok[lo:hi]
        key = self.key[lo:hi][ok]
        values = np.clip(obs.pnl[lo:hi][ok], *s.pnl_bounds)
        s.pnl_n += np.bincount(key, minlength=s.pnl_n.size).reshape(s.pnl_n.shape)
        s.pnl_sum += np.bincount(key, weights=values, minlength=s.pnl_n.size).reshape(s.pnl_n.shape)
        s.pnl_sq += np.bincount(key, weights=values * values, minlength=s.pnl_n.size).reshape(s.pnl_n.shape)
        if s.pnl_covariate is not None:
            s.pnl_covariate.add(key, obs.covariate_pnl[lo:hi][ok], values)
        self._pnl_done = hi

    def _add_windows(self, complete: int) -> None:
        s, obs = self.summary, self.obs
        for w in range(self._windows, complete):
            lo, hi = np.searchsorted(obs.t_s, obs.start_s + np.array([w, w + 1]) * WINDOW_S, side="left")
            latency, arm = obs.latency_ms[lo:hi], obs.arm[lo:hi]
            known = ~np.isnan(latency)
            control, treatment = latency[known & (arm == 0)], latency[known & (arm == 1)]
            if len(control) < MIN_WINDOW_CONTROL or not len(treatment):
                continue
            control_p95 = float(np.quantile(control, LATENCY_QUANTILE))
            margin = self.margins.latency_margin_ms(control_p95)
            threshold = control_p95 + margin
            s.latency_margin_ms_sum += margin
            s.latency_n += len(treatment)
            s.latency_above += int((treatment > threshold).sum())
            s.latency_windows += 1
        self._windows = max(self._windows, complete)


def _clusters(e: Experiment, obs: Observations) -> np.ndarray:
    if e.unit == "route":
        return obs.unit
    if e.mode == "split":
        # Each request's arm is drawn on its own, so the arm is independent of every outcome, however
        # correlated the outcomes of nearby requests are: the per-block scores of the difference are
        # uncorrelated for any blocking. Blocks of a fixed number of requests keep the number of
        # clusters (and the t correction's degrees of freedom) growing with the information, where
        # time blocks left a busy desk two or three clusters when the planned information was reached.
        return np.arange(len(obs), dtype=np.int64) // BLOCK_REQUESTS
    block_s = max(BLOCK_HORIZONS * e.label_horizon_s, MIN_BLOCK_S)
    return np.maximum((obs.t_s - obs.start_s) // block_s, 0).astype(np.int64)


def summarize(e: Experiment, obs: Observations, now_s: float) -> Summary:
    """The summary of all of ``obs`` as of ``now_s`` (one-off; replays use :class:`Accumulator`)."""
    return Accumulator(e, obs).advance(now_s)
