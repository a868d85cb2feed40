"""Can the design reach its planned information within a horizon? Estimated before it starts.

The primary effect's information (1 / variance of the estimated difference) grows
with the outcomes, but when the unit is the route (a symbol) it is capped by the
units themselves: symbols differ, and an arm's mean is a traffic-weighted mean over
its symbols, whose variance never falls below ``unit_sd² · Σ w_u²`` however long
the experiment runs. With shares ``s`` and ``1 − s`` and ``c = 1 / (s (1 − s))``::

    variance(T) = c · (unit_sd² · D + σ² / (λ T))        D = Σ_u p_u²  (p_u: unit u's traffic share)

where ``λ`` is the rate of outcomes and ``σ²`` the per-outcome variance (``p (1 − p)``
for a hit rate). The plan needs ``variance ≤ 1 / I_max``: never if
``c · unit_sd² · D ≥ 1 / I_max``, else after ``T = σ² / (λ (1 / (c I_max) − unit_sd² D))``.
By request (or with units alike) ``D`` is 0. It is an estimate: the assignment of a
few symbols is a lottery, and the cluster-robust variance the analysis uses is
estimated from the clusters seen.

Traffic comes from what the model served recently: the previous experiment's journal
(routes and times), else the request streams' newest entries; at most
``MAX_ENTRIES`` entries a stream are read. ``experiment simulate`` uses its table.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np

from experiments import plan
from experiments.analysis import ERROR_ALPHA, GUARDRAIL_ALPHA, PNL_MARGIN_SD
from protocol import keys, sharding
from protocol.errors import InvalidInput
from protocol.values import text

if TYPE_CHECKING:
    import redis

    from experiments.data import Observations
    from experiments.store import Experiment
    from protocol.values import StreamRows

MAX_ENTRIES = 10_000  # newest entries read per stream: bounded work at creation
_SLICE_ROWS = 1 << 20  # a table is summed a slice at a time
TRADING_DAY_S = 390 * 60.0
UNIT_SD_PP = 5.0  # assumed spread of units' hit rates (sd, pp) when the data cannot say


@dataclass(frozen=True)
class Traffic:
    """Recent requests: how many over what span, and each route's share (requests with no route are
    their own units)."""

    requests: int
    span_s: float
    route_counts: dict[str, int]
    source: str

    @property
    def rate_per_s(self) -> float:
        """Requests a second (0 when the span is empty)."""
        return self.requests / self.span_s if self.span_s > 0 else 0.0

    @property
    def concentration(self) -> float:
        """Σ p_u² over routes: 1 / the effective number of units (0: no routes)."""
        if not self.requests:
            return 0.0
        return float(sum((n / self.requests) ** 2 for n in self.route_counts.values()))


@dataclass(frozen=True)
class Feasibility:
    """How long the design needs at this traffic, and how much of the plan a horizon reaches."""

    needed_s: float  # inf: never, whatever the horizon
    horizon_s: float
    fraction_at_horizon: float  # of the planned information
    ceiling_fraction: float  # of the planned information the units allow at all (inf: no ceiling)
    rate_per_s: float
    effective_units: float  # 1 / Σ p_u² (inf: by request)
    source: str

    @property
    def feasible(self) -> bool:
        """The plan is reached within the horizon."""
        return self.needed_s <= self.horizon_s

    def line(self) -> str:
        """One line for the user."""
        where = f"at {self.rate_per_s:.3g} requests/s ({self.source})"
        units = "" if math.isinf(self.effective_units) else f", {self.effective_units:.3g} effective units"
        if math.isinf(self.needed_s):
            return (f"feasibility: the planned information can never be reached {where}{units}: the units "
                    f"allow at most {self.ceiling_fraction:.0%} of it; {self.fraction_at_horizon:.0%} within "
                    f"{_duration(self.horizon_s)}")
        verdict = "within" if self.feasible else "beyond"
        return (f"feasibility: the planned information needs about {_duration(self.needed_s)} "
                f"{where}{units}, {verdict} the horizon of {_duration(self.horizon_s)} "
                f"({min(self.fraction_at_horizon, 1):.0%} of the plan by then)")


def _duration(seconds: float) -> str:
    if seconds >= TRADING_DAY_S:
        days = seconds / TRADING_DAY_S
        return f"{days:.3g} trading day{'' if f'{days:.3g}' == '1' else 's'}"
    if seconds >= 3600:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 60:.3g} min"


def planned_information(e: Experiment, *, hit_rate: float = math.nan, pnl_variance: float = math.nan,
                         pnl_reported: bool = True) -> float:
    """The primary's planned information for the whole rule (:mod:`experiments.plan`), sized from the
    design before any data: the other metric's part by its margin in standard errors per unit of the
    primary's information, for outcomes that say both (by request; clustering moves both alike)."""
    effect = e.min_effect_pnl if e.primary == "pnl" else e.min_effect_pp / 100
    ratios = plan.Ratios(other_margin_z=_other_margin_z(e, hit_rate, pnl_variance) if pnl_reported else 0.0)
    return plan.rule_plan(effect, ratios, alpha=e.alpha, power=e.power, looks=e.planned_looks,
                          error_alpha=ERROR_ALPHA, latency_alpha=2 * GUARDRAIL_ALPHA).information


def _other_margin_z(e: Experiment, hit_rate: float, pnl_variance: float) -> float:
    """The other metric's margin over the square root of its per-outcome variance, the primary's as 1."""
    p = min(max(hit_rate, 0.05), 0.95) if math.isfinite(hit_rate) else 0.5
    if e.primary == "pnl":
        ratio = pnl_variance / (p * (1 - p)) if math.isfinite(pnl_variance) else math.nan
        return e.margins.accuracy_pp / 100 * math.sqrt(ratio) if math.isfinite(ratio) else 0.0
    margin = e.margins.pnl_per_trade
    if margin is None:  # the default: a share of the P&L's own sd, whatever its scale
        return PNL_MARGIN_SD * math.sqrt(p * (1 - p))
    if margin <= 0 or not (math.isfinite(pnl_variance) and pnl_variance > 0):
        return 0.0
    return margin * math.sqrt(p * (1 - p) / pnl_variance)


def estimate(e: Experiment, traffic: Traffic, *, horizon_s: float, outcome_variance: float,
             unit_sd: float, outcome_share: float = 1.0, planned: float | None = None) -> Feasibility:
    """The time to the planned information at ``traffic`` (see the module's formula).

    ``outcome_variance``: σ² per outcome (p (1 − p) for a hit rate); ``unit_sd``: the spread of the
    units' means in the primary metric's units; ``outcome_share``: the share of requests whose
    outcome arrives.
    """
    s = e.treatment_share
    c = 1 / (s * (1 - s))
    concentration = traffic.concentration if e.unit == "route" else 0.0
    floor = c * unit_sd ** 2 * concentration  # the variance no amount of traffic removes
    target = 1 / (planned if planned is not None else planned_information(e))
    rate = traffic.rate_per_s * outcome_share
    ceiling = target / floor if floor > 0 else math.inf
    if rate <= 0:
        needed = math.inf
    else:
        needed = math.inf if floor >= target else outcome_variance * c / (rate * (target - floor))
    at_horizon = floor + (c * outcome_variance / (rate * horizon_s) if rate > 0 else math.inf)
    effective_units = 1 / concentration if concentration > 0 else math.inf
    return Feasibility(needed, horizon_s, target / at_horizon if at_horizon > 0 else math.inf, ceiling,
                       traffic.rate_per_s, effective_units, traffic.source)


# ---- traffic ------------------------------------------------------------------------------

def traffic_from_table(obs: Observations) -> Traffic:
    """A table's exposures (one row per exposure; shadow rows of one request count once per arm)."""
    counts = np.bincount(obs.unit) if len(obs) else np.zeros(0, np.int64)
    names = obs.unit_names or tuple(str(i) for i in range(len(counts)))
    span_s = float(obs.t_s[-1] - obs.t_s[0]) if len(obs) > 1 else 0.0
    return Traffic(len(obs), span_s, {names[i]: int(n) for i, n in enumerate(counts) if n}, "the table")


def recent_traffic(client: redis.Redis, model: str, previous: Experiment | None) -> Traffic | None:
    """The model's recent requests, from the previous experiment's journal (None without one).

    Not from the request streams: workers delete what they answer, so a healthy fleet's streams
    are empty (a backlog is not the traffic), and their entries carry the inputs (up to
    ``max_message_bytes`` each), too much to read ten thousand of.
    """
    if previous is None:
        return None
    return _traffic(client, [keys.experiment_journal(model, previous.id, k) for k in _shards(client, model)],
                    "the last experiment's journal")


def _shards(client: redis.Redis, model: str) -> range:
    try:
        return range(sharding.read_layout(client, model).highest)
    except InvalidInput:
        return range(1)


def _traffic(client: redis.Redis, streams: list[str], source: str) -> Traffic | None:
    routes: Counter[str] = Counter()
    first_ms, last_ms, n = math.inf, -math.inf, 0
    for stream in streams:
        entries = cast("StreamRows", client.xrevrange(stream, count=MAX_ENTRIES))
        if len(entries) < 2:
            continue
        times = [int(text(entry_id).split("-", 1)[0]) for entry_id, _ in entries]
        first_ms, last_ms = min(first_ms, min(times)), max(last_ms, max(times))
        n += len(entries)
        routes.update(text(fields.get(b"route", b"")) for _, fields in entries)
    if n < 2 or last_ms <= first_ms:
        return None
    routes.pop("", None)  # no route: the request is its own unit
    return Traffic(n, (last_ms - first_ms) / 1000, dict(routes), source)


def recent_hit_rate(client: redis.Redis, model: str) -> tuple[float, float] | None:
    """(hit rate, P&L variance) of the newest outcomes that say them (NaN where none do)."""
    entries = cast("StreamRows", client.xrevrange(keys.outcomes_stream(model), count=MAX_ENTRIES))
    correct, pnl = [], []
    for _, fields in entries:
        c, p = fields.get(b"correct"), fields.get(b"pnl")
        if c in (b"0", b"1"):
            correct.append(c == b"1")
        try:
            value = float(p) if p is not None else math.nan
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            pnl.append(value)
    if not correct and len(pnl) < 2:
        return None
    return (float(np.mean(correct)) if correct else math.nan,
            float(np.var(pnl, ddof=1)) if len(pnl) > 1 else math.nan)


def for_design(e: Experiment, traffic: Traffic, *, horizon_s: float, hit_rate: float = math.nan,
               pnl_variance: float = math.nan, unit_sd_pp: float = UNIT_SD_PP,
               outcome_share: float = 1.0) -> Feasibility | None:
    """The estimate for ``e``'s primary metric; None when its variance is unknown (P&L never seen).

    A hit rate's variance is p (1 − p) (p = 0.5 when unknown: the longest); units are assumed to
    spread by ``unit_sd_pp`` in hit rate, and alike in P&L.
    """
    # Outcomes seen that never say a P&L: the bots do not report it, and it has no part to size.
    silent = math.isfinite(hit_rate) and not math.isfinite(pnl_variance)
    planned = planned_information(e, hit_rate=hit_rate, pnl_variance=pnl_variance, pnl_reported=not silent)
    if e.primary == "pnl":
        if not math.isfinite(pnl_variance):
            return None
        return estimate(e, traffic, horizon_s=horizon_s, outcome_variance=pnl_variance, unit_sd=0.0,
                        outcome_share=outcome_share, planned=planned)
    p = min(max(hit_rate, 0.05), 0.95) if math.isfinite(hit_rate) else 0.5
    return estimate(e, traffic, horizon_s=horizon_s, outcome_variance=p * (1 - p), unit_sd=unit_sd_pp / 100,
                    outcome_share=outcome_share, planned=planned)


def for_table(e: Experiment, obs: Observations, *, horizon_s: float = TRADING_DAY_S) -> Feasibility | None:
    """The estimate from a table: its traffic, hit rate, P&L variance, outcome share and (by route)
    the spread of its units' hit rates. One pass in slices: no copy of a whole column."""
    units = int(obs.unit.max()) + 1 if len(obs) else 1
    n, hits, said = np.zeros(units), np.zeros(units), 0
    pnl_n, pnl_sum, pnl_sq = 0, 0.0, 0.0
    for lo in range(0, len(obs), _SLICE_ROWS):
        part = slice(lo, lo + _SLICE_ROWS)
        correct, pnl, unit = obs.correct[part], obs.pnl[part], obs.unit[part]
        judged, priced = ~np.isnan(correct), ~np.isnan(pnl)
        n += np.bincount(unit, weights=judged, minlength=units)
        hits += np.bincount(unit, weights=np.where(judged, correct, 0.0), minlength=units)
        said += int((judged if e.primary == "hit_rate" else priced).sum())
        pnl_n, pnl_sum = pnl_n + int(priced.sum()), pnl_sum + float(pnl[priced].sum())
        pnl_sq += float(np.square(pnl[priced]).sum())
    variance = (pnl_sq - pnl_sum ** 2 / pnl_n) / (pnl_n - 1) if pnl_n > 1 else math.nan
    return for_design(e, traffic_from_table(obs), horizon_s=horizon_s,
                      hit_rate=hits.sum() / n.sum() if n.sum() else math.nan, pnl_variance=variance,
                      unit_sd_pp=_unit_sd_pp(n, hits) if e.unit == "route" else 0.0,
                      outcome_share=said / len(obs) if len(obs) else 1.0)


def _unit_sd_pp(n: np.ndarray, hits: np.ndarray) -> float:
    """Between-unit sd of hit rates (pp) by moments: the spread of unit means less its binomial part."""
    seen = n >= 2
    if seen.sum() < 2:
        return UNIT_SD_PP
    means, counts = hits[seen] / n[seen], n[seen]
    p = means.mean()
    between = means.var(ddof=1) - float(np.mean(p * (1 - p) / counts))
    return math.sqrt(max(between, 0.0)) * 100
