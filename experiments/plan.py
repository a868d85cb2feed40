"""The whole rule's plan: the information at which PROMOTE, all of it, has the design's power.

PROMOTE needs every part of the rule at once: the primary metric shown better than
control (the group-sequential boundary), the other metric (P&L when the primary is the
hit rate, the hit rate when it is P&L) shown non-inferior within its margin (a
group-sequential boundary at the same looks), and the error-rate and latency guardrails
inside their margins (always-valid intervals). Each part is tested at the design's full
alpha and all must pass, so alpha is not split between them (an intersection-union test);
the type II error is what they share. As in Spotify's risk-aware decision rule
(Schultzberg, Ankargren & Frånberg, 2024), the plan is sized so that the parts' type II
errors add up to at most the design's beta — by the union bound the rule's power is then
at least ``power`` whatever the dependence between the parts:

- the error-rate and latency guardrails get ``RATE_BETA`` each; their need is the least
  number of treatment exposures at which their interval, at the expected count, clears the
  margin with that power (they rarely bind: a 0.1 % error rate needs a few thousand);
- the primary and the other metric share the rest, split where the plan is smallest: the
  least primary information I with β_primary(I) + β_other(I) ≤ β − 2·RATE_BETA, where each β
  is 1 − the boundary's crossing probability at that drift (``stats.boundary_power``).

Every part is put on the primary's clock by a ratio measured in the data (the other
metric's information per unit of the primary's, exposures per unit of the primary's
information), so clustering, winsorising and the split count as they are. Before a ratio
is measured its part is sized from the design alone (:func:`design_plan`) or left out.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from scipy import special

from experiments import stats

RATE_BETA = 0.01  # type II error given to each always-valid rate guardrail (errors, latency)
MAX_PLAN_FACTOR = 16.0  # the plan is at most this many times the primary's own: a guardrail that cannot be
# powered within it would hold the experiment open for ever; past it the plan says so (``capped``)
ESTIMATED_VARIANCE_ALLOWANCE = 1.05  # 5 % more information than a known-variance design


@dataclass(frozen=True)
class RulePlan:
    """The planned primary information and what each part of the rule needs of it."""

    information: float  # the primary's planned information, with the estimated-variance allowance
    primary_alone: float  # what the primary alone would plan at the design's power
    betas: dict[str, float] = field(default_factory=dict)  # each part's type II error at the plan
    binding: str = "primary"  # the part that sets the plan
    capped: bool = False  # a part could not be powered within MAX_PLAN_FACTOR × primary_alone

    @property
    def factor(self) -> float:
        """How much larger than the primary's own plan the whole rule's is."""
        return self.information / self.primary_alone if self.primary_alone > 0 else 1.0

    def to_dict(self) -> dict:
        """JSON-ready, for the audit trail."""
        return {"information": self.information, "primary_alone": self.primary_alone,
                "factor": self.factor, "betas": dict(self.betas), "binding": self.binding,
                "capped": self.capped}


@dataclass(frozen=True)
class Ratios:
    """Where the other parts stand relative to the primary's information, as measured.

    ``other_margin_z``: the other metric's margin times the square root of its information
    per unit of the primary's (its margin in standard errors at primary information 1);
    0 when it has no margin, no data or no part in PROMOTE. ``*_per_info``: treatment
    exposures (or latency comparisons) per unit of primary information; 0 when unknown.
    """

    other_margin_z: float = 0.0
    error_rate: float = math.nan  # pooled error rate
    error_margin: float = 0.0  # as a rate (0.005 for 0.5 pp)
    exposures_per_info: float = 0.0
    control_per_treatment: float = 9.0
    latency_share: float = math.nan  # treatment requests above control p95 + margin
    latency_limit: float = 0.05
    latency_per_info: float = 0.0


def primary_information(effect: float, *, alpha: float, power: float, looks: int) -> float:
    """The primary's own planned information (known variance), as ``stats.max_information``."""
    return stats.max_information(effect, alpha=alpha, power=power, looks=looks)


def rule_plan(effect: float, ratios: Ratios, *, alpha: float, power: float, looks: int,
              error_alpha: float, latency_alpha: float) -> RulePlan:
    """The whole rule's planned primary information (see the module's docstring)."""
    alone = primary_information(effect, alpha=alpha, power=power, looks=looks)
    beta = 1 - power
    rates = _rate_needs(ratios, error_alpha, latency_alpha)
    shared = beta - RATE_BETA * len(rates)
    primary = _primary_beta(effect, alpha, looks)
    other = _other_beta(ratios.other_margin_z, alpha, looks)
    info, capped = _solve(lambda i: primary(i) + other(i), shared, alone)
    binding = "primary" if other(info) < 1e-3 else "primary and " + _OTHER
    for name, need in rates.items():
        if need > info:
            info, binding = need, name
    if info > MAX_PLAN_FACTOR * alone:
        info, capped = MAX_PLAN_FACTOR * alone, True
    betas = {"primary": primary(info), _OTHER: other(info)} if ratios.other_margin_z > 0 else \
        {"primary": primary(info)}
    betas |= {name: RATE_BETA if need > 0 else 0.0 for name, need in rates.items()}
    return RulePlan(info * ESTIMATED_VARIANCE_ALLOWANCE, alone * ESTIMATED_VARIANCE_ALLOWANCE, betas,
                    binding, capped)


_OTHER = "other metric"


def _primary_beta(effect: float, alpha: float, looks: int) -> Callable[[float], float]:
    return lambda info: 1 - stats.boundary_power(looks, alpha, effect * math.sqrt(info))


def _other_beta(margin_z: float, alpha: float, looks: int) -> Callable[[float], float]:
    if margin_z <= 0:
        return lambda info: 0.0
    return lambda info: 1 - stats.boundary_power(looks, alpha, margin_z * math.sqrt(info))


def _solve(beta_at: Callable[[float], float], beta: float, alone: float) -> tuple[float, bool]:
    """The least information in [alone, MAX_PLAN_FACTOR · alone] with beta_at(info) <= beta."""
    high = MAX_PLAN_FACTOR * alone
    if beta_at(high) > beta:
        return high, True
    low = alone
    for _ in range(40):  # bisection on a log scale: 2^-40 of a factor of 16
        mid = math.sqrt(low * high)
        low, high = (mid, high) if beta_at(mid) > beta else (low, mid)
    return high, False


def _rate_needs(ratios: Ratios, error_alpha: float, latency_alpha: float) -> dict[str, float]:
    """Primary information at which each measured rate guardrail clears its margin (power 1 − RATE_BETA)."""
    needs = {}
    if ratios.exposures_per_info > 0 and math.isfinite(ratios.error_rate) and ratios.error_margin > 0:
        n = error_rate_exposures(ratios.error_rate, ratios.error_margin, ratios.control_per_treatment,
                                 error_alpha)
        if n < MAX_RATE_EXPOSURES:  # a rate the data put at its margin is not sized for: its interval decides
            needs["error rate"] = n / ratios.exposures_per_info
    if ratios.latency_per_info > 0 and math.isfinite(ratios.latency_share):
        n = share_exposures(ratios.latency_share, ratios.latency_limit, latency_alpha)
        if n < MAX_RATE_EXPOSURES:
            needs["latency"] = n / ratios.latency_per_info
    return needs


MAX_RATE_EXPOSURES = 1e9  # a rate at or beyond its margin is never shown inside: not searched for ever


@functools.lru_cache(maxsize=4096)
def _error_exposures(rate_e4: int, margin_e4: int, ratio_e1: int, alpha: float) -> float:
    rate, margin, ratio = rate_e4 / 1e4, margin_e4 / 1e4, ratio_e1 / 10
    z = float(special.ndtri(1 - RATE_BETA))

    def clears(n: float) -> bool:  # the difference's upper bound, at the expected counts, inside by z sd
        c = stats.bernoulli_confidence_sequence(round(rate * n * ratio), max(round(n * ratio), 1), alpha)
        t = stats.bernoulli_confidence_sequence(round(rate * n), max(round(n), 1), alpha)
        sd = math.sqrt(max(rate * (1 - rate), 1e-12) * (1 / n + 1 / (n * ratio)))
        return (t[1] - rate) + (rate - c[0]) + z * sd <= margin

    return _least(clears)


def error_rate_exposures(rate: float, margin: float, control_per_treatment: float, alpha: float) -> float:
    """Treatment exposures at which the error-rate interval clears ``margin`` with power 1 − RATE_BETA,
    for equal rates ``rate`` (rounded up to 0.01 pp, so the search is cached)."""
    return _error_exposures(math.ceil(max(rate, 1e-4) * 1e4), round(margin * 1e4),
                            max(round(control_per_treatment * 10), 1), alpha)


@functools.lru_cache(maxsize=4096)
def _share_exposures(share_e4: int, limit_e4: int, alpha: float) -> float:
    share, limit = share_e4 / 1e4, limit_e4 / 1e4
    z = float(special.ndtri(1 - RATE_BETA))

    def clears(n: float) -> bool:
        high = stats.bernoulli_confidence_sequence(round(share * n), max(round(n), 1), alpha)[1]
        return high + z * math.sqrt(share * (1 - share) / n) < limit

    return _least(clears)


def share_exposures(share: float, limit: float, alpha: float) -> float:
    """Comparisons at which a share's always-valid upper bound falls below ``limit`` with power
    1 − RATE_BETA (``share`` rounded up to 0.01 pp)."""
    return _share_exposures(math.ceil(max(share, 1e-4) * 1e4), round(limit * 1e4), alpha)


def _least(clears: Callable[[float], bool]) -> float:
    """The least n (to 2 %) with clears(n), by doubling then bisection; MAX_RATE_EXPOSURES if none."""
    high = 16.0
    while not clears(high):
        high *= 2
        if high > MAX_RATE_EXPOSURES:
            return MAX_RATE_EXPOSURES
    low = high / 2
    while high / low > 1.02:
        mid = math.sqrt(low * high)
        low, high = (mid, high) if not clears(mid) else (low, mid)
    return high
