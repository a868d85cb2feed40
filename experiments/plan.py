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

- the error-rate and latency guardrails get :func:`rate_share` each (1 %); once their rates
  are measured, their need is the least number of treatment exposures at which their
  interval, at the expected count, clears the margin with that power (a 0.1 % error rate
  against a 0.5 pp margin needs a few thousand: it binds only when the primary's plan is
  small, for a large effect). A rate guardrail extends the plan at most ``RATE_PLAN_FACTOR``
  times (2): near its margin its need has no bound, and at or past it the data say it will
  not be shown inside; capped alike on both sides, the looks do not jump when a noisy
  estimate crosses the margin;
- the primary and the other metric share the rest, split where the plan is smallest: the
  least primary information I with β_primary(I) + β_other(I) ≤ β − 2 × the rate share, where
  each β is 1 − the boundary's crossing probability at that drift (``stats.boundary_power``).

Every part is put on the primary's clock by a ratio measured in the data (the other
metric's information per unit of the primary's, exposures per unit of the primary's
information), so clustering, winsorising and the split count as they are. Before a ratio
is measured its part is left out (``experiments.feasibility`` sizes the other metric's from
the design before any data).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from scipy import special

from experiments import stats

MAX_RATE_BETA = 0.01  # type II error given to each always-valid rate guardrail (errors, latency)
RATE_PLAN_FACTOR = 2.0  # a rate guardrail extends the primary's and the other metric's plan at most this much
MAX_PLAN_FACTOR = 16.0  # the plan is at most this many times the primary's own: a guardrail that cannot be
# powered within it would hold the experiment open for ever; past it the plan says so (``capped``)
ESTIMATED_VARIANCE_ALLOWANCE = 1.05  # 5 % more information than a known-variance design


@dataclass(frozen=True)
class RulePlan:
    """The planned primary information and what each part of the rule needs of it."""

    information: float  # the primary's planned information, with the estimated-variance allowance
    primary_alone: float  # what the primary alone would plan at the design's power
    betas: dict[str, float | None] = field(default_factory=dict)  # each part's type II error at the plan
    # (None: a capped part, short of its power by an amount not computed)
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
    rate_beta = rate_share(power)
    rates = _rate_needs(ratios, error_alpha, latency_alpha, rate_beta)
    # The rate guardrails' share is kept whether or not their rates are measured yet, so the plan
    # a design starts with (and ``experiment create`` estimates) is the one its analyses use.
    primary = _primary_beta(effect, alpha, looks)
    other = _other_beta(ratios.other_margin_z, alpha, looks)
    info, capped = _solve(lambda i: primary(i) + other(i), beta - 2 * rate_beta, alone)
    binding = "primary" if other(info) < 1e-3 else "primary and " + _OTHER
    betas: dict[str, float | None] = {"primary": primary(info)}
    if ratios.other_margin_z > 0:
        betas[_OTHER] = other(info)
    # A rate guardrail may extend the plan by at most RATE_PLAN_FACTOR: near its margin its need grows
    # without bound, and past it the data say it will not be shown inside. Capped the same on both
    # sides of the margin, so an estimate hovering there cannot move the looks back and forth.
    base = info
    for name, need in rates.items():
        betas[name] = rate_beta
        if need > RATE_PLAN_FACTOR * base:
            betas[name], need, capped = None, RATE_PLAN_FACTOR * base, True  # short of its power
        if need > info:
            info, binding = need, name
    return RulePlan(info * ESTIMATED_VARIANCE_ALLOWANCE, alone * ESTIMATED_VARIANCE_ALLOWANCE, betas,
                    binding, capped)


def rate_share(power: float) -> float:
    """The type II error each rate guardrail gets: 1 %, or a quarter of beta at a power above 96 %."""
    return min(MAX_RATE_BETA, (1 - power) / 4)


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


def _rate_needs(ratios: Ratios, error_alpha: float, latency_alpha: float, rate_beta: float
                ) -> dict[str, float]:
    """Primary information at which each measured rate guardrail clears its margin (power 1 − rate_beta)."""
    needs = {}
    usable = ratios.exposures_per_info > 0 and ratios.control_per_treatment > 0
    if usable and 0 <= ratios.error_rate < 1 and ratios.error_margin > 0:  # NaN compares False
        n = error_rate_exposures(ratios.error_rate, ratios.error_margin, ratios.control_per_treatment,
                                 error_alpha, rate_beta)
        needs["error rate"] = n / ratios.exposures_per_info  # at or past its margin: MAX_RATE_EXPOSURES
    if ratios.latency_per_info > 0 and 0 <= ratios.latency_share < 1:
        n = share_exposures(ratios.latency_share, ratios.latency_limit, latency_alpha, rate_beta)
        needs["latency"] = n / ratios.latency_per_info
    return needs


MAX_RATE_EXPOSURES = 1e12  # a rate at or beyond its margin is never shown inside: not searched for ever


@functools.lru_cache(maxsize=4096)
def _error_exposures(rate_e4: int, margin_e4: int, ratio_e1: int, alpha: float, beta: float) -> float:
    rate, margin, ratio = rate_e4 / 1e4, margin_e4 / 1e4, ratio_e1 / 10
    z = float(special.ndtri(1 - beta))

    def clears(n: float) -> bool:  # the difference's upper bound, at the expected counts, inside by z sd
        c = stats.bernoulli_confidence_sequence(round(rate * n * ratio), max(round(n * ratio), 1), alpha)
        t = stats.bernoulli_confidence_sequence(round(rate * n), max(round(n), 1), alpha)
        sd = math.sqrt(max(rate * (1 - rate), 1e-12) * (1 / n + 1 / (n * ratio)))
        return (t[1] - rate) + (rate - c[0]) + z * sd <= margin

    return _least(clears)


def error_rate_exposures(rate: float, margin: float, control_per_treatment: float, alpha: float,
                         beta: float = MAX_RATE_BETA) -> float:
    """Treatment exposures at which the error-rate interval clears ``margin`` with power 1 − ``beta``,
    for equal rates ``rate`` (rounded up to 0.01 pp, so the search is cached)."""
    return _error_exposures(math.ceil(min(max(rate, 1e-4), 1.0) * 1e4), round(margin * 1e4),
                            max(round(control_per_treatment * 10), 1), alpha, beta)


@functools.lru_cache(maxsize=4096)
def _share_exposures(share_e4: int, limit_e4: int, alpha: float, beta: float) -> float:
    share, limit = share_e4 / 1e4, limit_e4 / 1e4
    z = float(special.ndtri(1 - beta))

    def clears(n: float) -> bool:
        high = stats.bernoulli_confidence_sequence(round(share * n), max(round(n), 1), alpha)[1]
        return high + z * math.sqrt(share * (1 - share) / n) < limit

    return _least(clears)


def share_exposures(share: float, limit: float, alpha: float, beta: float = MAX_RATE_BETA) -> float:
    """Comparisons at which a share's always-valid upper bound falls below ``limit`` with power
    1 − ``beta`` (``share`` rounded up to 0.01 pp)."""
    return _share_exposures(math.ceil(min(max(share, 1e-4), 1.0) * 1e4), round(limit * 1e4), alpha, beta)


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
