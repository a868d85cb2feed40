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
day's analyses costs one pass over the table; the live analysis (``experiment
watch``) keeps one over a growing table, so an analysis costs the rows and outcomes
read since the previous one and the rows maturing, not the experiment's age.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

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
_CELLS = ("matured", "arrived", "hit_sum", "hit_n", "pnl_sum", "pnl_sq", "pnl_n")  # (clusters, 2) each
_MOMENTS = ("n", "x", "y", "xy", "xx")


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

    def renumbered(self, rank: np.ndarray) -> Summary:
        """This summary with cluster ``i`` as cluster ``rank[i]`` (a permutation): what a table with each
        unit code ``u`` written as ``rank[u]`` gives, where the unit is the cluster."""
        def move(values: np.ndarray) -> np.ndarray:
            out = np.empty_like(values)
            out[rank] = values
            return out

        hit, pnl = (None if m is None else Moments(*(move(getattr(m, f)) for f in _MOMENTS))
                    for m in (self.hit_covariate, self.pnl_covariate))
        return replace(self, matured=move(self.matured), arrived=move(self.arrived),
                       hit_sum=move(self.hit_sum), hit_n=move(self.hit_n), pnl_sum=move(self.pnl_sum),
                       pnl_sq=move(self.pnl_sq), pnl_n=move(self.pnl_n), hit_covariate=hit, pnl_covariate=pnl)

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
    """Running per-cluster totals of one experiment's observations, advanced in time.

    Each call adds only what is new since the previous one: the rows exposed and matured since,
    and the latency windows completed since. Over a fixed table (a replay) a day's analyses cost
    one pass over it. The table may also grow between calls (the live analysis of
    :class:`experiments.runner.Reader`): :meth:`extend` takes rows added or reordered after the
    rows counted so far, and :meth:`late_outcomes` the outcomes that arrived, after the horizon,
    for rows already counted as matured. A row's outcome is read only when it matures (its time
    plus the horizon is past), so the outcome columns may be filled in place until then.
    """

    def __init__(self, e: Experiment, obs: Observations) -> None:
        self.obs = obs
        self.horizon_s = e.label_horizon_s
        self.margins = e.margins
        self.clusters_by = "unit" if e.unit == "route" else "rows" if e.mode == "split" else "time"
        self.block_s = max(BLOCK_HORIZONS * e.label_horizon_s, MIN_BLOCK_S)
        self.rows_processed = 0  # row reads so far (a row read again counts again): the work done
        def none() -> np.ndarray:
            return np.zeros((0, 2))

        def zero() -> np.ndarray:
            return np.zeros(2, np.int64)

        self.summary = Summary(-math.inf, zero(), zero(), zero(), none(), none(), zero(), none(), none(),
                               none(), none(), none(), pnl_bounds=None, latency_n=0, latency_above=0,
                               latency_windows=0)
        self._cells = {name: np.zeros((0, 2)) for name in _CELLS}  # grown by doubling; published as views
        # A covariate column nobody gave costs nothing here either.
        self._moments = {name: Moments.zeros((0, 2)) for name, column in
                         (("hit", obs.covariate_hit), ("pnl", obs.covariate_pnl)) if not data.absent(column)}
        self._seen = np.zeros(0, dtype=bool)  # by unit code: exposed already
        self._units = 1  # highest unit code + 1
        self._clusters = 1
        self._pnl_first = np.empty(0)  # the first matured P&L outcomes, until they fix the winsorising bounds
        self._exposed = self._matured = self._windows = 0
        self._grow(0)
        self._publish()

    def advance(self, now_s: float) -> Summary:
        """The summary as of ``now_s`` (never earlier than the last call). Arrays are live views."""
        s, obs = self.summary, self.obs
        s.now_s = max(now_s, s.now_s)
        exposed = int(np.searchsorted(obs.t_s, s.now_s, side="right"))
        self._add_exposures(self._exposed, exposed)
        matured = int(np.searchsorted(obs.t_s, s.now_s - self.horizon_s, side="right"))
        self._add_matured(self._matured, matured)
        self._add_windows(int((s.now_s - obs.start_s) // WINDOW_S))
        self._exposed, self._matured = exposed, matured
        self._publish()
        return s

    def extend(self, obs: Observations, changed_from: int) -> bool:
        """Go on over ``obs``: this table grown, the same rows before ``changed_from`` (outcomes joined
        since included), added or reordered rows from there on, in time order.

        False, changing nothing, when a changed row is one already counted (exposed, or in a latency
        window done) or a covariate column came or went: then only a fresh accumulator is right.
        """
        windows_end_s = self.obs.start_s + self._windows * WINDOW_S
        changed = changed_from < len(obs)
        if changed and (changed_from < self._exposed or obs.t_s[changed_from] < windows_end_s):
            return False
        covariates = {name for name, column in (("hit", obs.covariate_hit), ("pnl", obs.covariate_pnl))
                      if not data.absent(column)}
        if covariates != set(self._moments):
            return False
        self.obs = obs
        self._grow(changed_from)
        self._publish()
        return True

    def late_outcomes(self, rows: np.ndarray) -> bool:
        """Outcomes written since the last call into rows at positions ``rows``: those of rows already
        counted as matured arrived after the horizon and count as late, as a full read counts them.

        False, changing nothing, when one of them arrived within the horizon (possible only when an
        outcome is written with an earlier time than the clock's): then only a fresh accumulator is right.
        """
        obs = self.obs
        rows = rows[rows < self._matured]
        self.rows_processed += len(rows)
        arrived_s = obs.outcome_t_s[rows]
        if np.any(((arrived_s - obs.t_s[rows]) <= self.horizon_s) & ~obs.error[rows]):
            return False
        self.summary.late += np.bincount(obs.arm[rows][~np.isnan(arrived_s)], minlength=2)
        return True

    def _grow(self, lo: int) -> None:
        """Room for the clusters and units of rows ``lo:`` (new or reordered)."""
        obs = self.obs
        if len(obs) > lo:
            self._units = max(self._units, int(obs.unit[lo:].max()) + 1)
        if self._units > len(self._seen):
            self._seen = _grown(self._seen, self._units)
        self._clusters = self._cluster_count()
        if self._clusters > len(self._cells["matured"]):
            self._cells = {name: _grown(cells, self._clusters) for name, cells in self._cells.items()}
            self._moments = {name: Moments(*(_grown(getattr(m, f), self._clusters) for f in _MOMENTS))
                             for name, m in self._moments.items()}

    def _cluster_count(self) -> int:
        """Clusters of the whole table (a cluster whose rows are not exposed yet is a row of zeros)."""
        n = len(self.obs)
        if not n:
            return 1
        if self.clusters_by == "unit":
            return self._units
        if self.clusters_by == "rows":
            return (n - 1) // BLOCK_REQUESTS + 1
        return int(self._time_block(self.obs.t_s[-1:])[0]) + 1

    def _cluster(self, lo: int, hi: int) -> np.ndarray:
        if self.clusters_by == "unit":
            return self.obs.unit[lo:hi]
        if self.clusters_by == "rows":
            # Each request's arm is drawn on its own, so the arm is independent of every outcome, however
            # correlated the outcomes of nearby requests are: the per-block scores of the difference are
            # uncorrelated for any blocking. Blocks of a fixed number of requests keep the number of
            # clusters (and the t correction's degrees of freedom) growing with the information, where
            # time blocks left a busy desk two or three clusters when the planned information was reached.
            return np.arange(lo, hi, dtype=np.int64) // BLOCK_REQUESTS
        return self._time_block(self.obs.t_s[lo:hi])

    def _time_block(self, t_s: np.ndarray) -> np.ndarray:
        return np.maximum((t_s - self.obs.start_s) // self.block_s, 0).astype(np.int64)

    def _publish(self) -> None:
        """The summary's per-cluster arrays: views of the totals, as many clusters as the table has."""
        s, n = self.summary, self._clusters
        for name, cells in self._cells.items():
            setattr(s, name, cells[:n])
        s.hit_covariate, s.pnl_covariate = (
            Moments(*(getattr(m, f)[:n] for f in _MOMENTS)) if m is not None else None
            for m in (self._moments.get("hit"), self._moments.get("pnl")))

    def _keys(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``lo:hi``: each one's cell (cluster · 2 + arm), and whether its outcome arrived in time."""
        obs = self.obs
        # NaN (no outcome) compares False; a failed request's outcome is not the model's to score.
        on_time = ((obs.outcome_t_s[lo:hi] - obs.t_s[lo:hi]) <= self.horizon_s) & ~obs.error[lo:hi]
        return self._cluster(lo, hi) * 2 + obs.arm[lo:hi], on_time

    def _add_exposures(self, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        s, obs = self.summary, self.obs
        self.rows_processed += hi - lo
        arm = obs.arm[lo:hi]
        s.exposures += np.bincount(arm, minlength=2)
        s.errors += np.bincount(arm, weights=obs.error[lo:hi], minlength=2).astype(np.int64)
        units, first = np.unique(obs.unit[lo:hi], return_index=True)
        new = ~self._seen[units]
        self._seen[units] = True
        s.units += np.bincount(arm[first[new]], minlength=2)

    def _add_matured(self, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        s, obs, cells = self.summary, self.obs, self._cells
        self.rows_processed += hi - lo
        key, on_time = self._keys(lo, hi)
        # A failed request made no prediction, so no outcome is due for it: counting it would
        # read an arm's errors as missing outcomes (and HALT) instead of as its error rate.
        answered = ~obs.error[lo:hi]
        done = key[answered]
        _scatter(cells["matured"], done)
        _scatter(cells["arrived"], done, on_time[answered])
        late = ~on_time & ~np.isnan(obs.outcome_t_s[lo:hi])
        s.late += np.bincount(obs.arm[lo:hi], weights=late, minlength=2).astype(np.int64)
        correct = obs.correct[lo:hi]
        scored = on_time & ~np.isnan(correct)
        _scatter(cells["hit_n"], key[scored])
        _scatter(cells["hit_sum"], key[scored], correct[scored])
        if "hit" in self._moments:
            _add_moments(self._moments["hit"], key[scored], obs.covariate_hit[lo:hi][scored], correct[scored])
        self._add_pnl(lo, hi, key, on_time)

    def _add_pnl(self, lo: int, hi: int, key: np.ndarray, on_time: np.ndarray) -> None:
        """Rows ``lo:hi`` just matured: their P&L, winsorised once the first ``PNL_CALIBRATION`` fixed the
        bounds (then every row matured so far, once)."""
        s, obs, cells = self.summary, self.obs, self._cells
        ok = on_time & ~np.isnan(obs.pnl[lo:hi])
        if s.pnl_bounds is None:
            self._pnl_first = np.concatenate([self._pnl_first, obs.pnl[lo:hi][ok][:PNL_CALIBRATION]])
            if len(self._pnl_first) < PNL_CALIBRATION:
                return
            first = self._pnl_first[:PNL_CALIBRATION]
            low, high = np.quantile(first, [PNL_CLIP, 1 - PNL_CLIP])
            s.pnl_bounds = (float(low), float(high))
            s.pnl_sd = float(np.std(np.clip(first, low, high), ddof=1))
            self._pnl_first = np.empty(0)
            self.rows_processed += hi
            lo, (key, on_time) = 0, self._keys(0, hi)
            ok = on_time & ~np.isnan(obs.pnl[:hi])
        key = key[ok]
        values = np.clip(obs.pnl[lo:hi][ok], *s.pnl_bounds)
        _scatter(cells["pnl_n"], key)
        _scatter(cells["pnl_sum"], key, values)
        _scatter(cells["pnl_sq"], key, values * values)
        if "pnl" in self._moments:
            _add_moments(self._moments["pnl"], key, obs.covariate_pnl[lo:hi][ok], values)

    def _add_windows(self, complete: int) -> None:
        s, obs = self.summary, self.obs
        for w in range(self._windows, complete):
            lo, hi = np.searchsorted(obs.t_s, obs.start_s + np.array([w, w + 1]) * WINDOW_S, side="left")
            self.rows_processed += int(hi - lo)
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


def _grown(values: np.ndarray, rows: int) -> np.ndarray:
    """``values`` with at least ``rows`` rows, the new ones zero (capacity doubling: amortised O(1) a row)."""
    out = np.zeros((max(rows, 2 * len(values)), *values.shape[1:]), dtype=values.dtype)
    out[:len(values)] = values
    return out


def _scatter(total: np.ndarray, key: np.ndarray, weights: np.ndarray | None = None) -> None:
    """``total.flat[key] += weights`` (1 each without), counting over the keys' span only: a slice of new
    rows costs its own size, not the number of clusters."""
    if not len(key):
        return
    low = int(key.min())
    sums = np.bincount(key - low, weights=weights)
    flat = total.reshape(-1)  # a view: the totals are C-contiguous
    flat[low:low + len(sums)] += sums


def _add_moments(m: Moments, key: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """:meth:`Moments.add` on the clusters the keys span only (a view of them)."""
    if not len(key):
        return
    low, high = int(key.min()) // 2, int(key.max()) // 2 + 1
    Moments(*(getattr(m, f)[low:high] for f in _MOMENTS)).add(key - 2 * low, x, y)


def summarize(e: Experiment, obs: Observations, now_s: float) -> Summary:
    """The summary of all of ``obs`` as of ``now_s`` (one-off; replays use :class:`Accumulator`)."""
    return Accumulator(e, obs).advance(now_s)
