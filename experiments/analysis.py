"""From an experiment's observations to a decision: HALT, ROLLBACK, PROMOTE, CONTINUE or KEEP.

At every analysis, on the data of :mod:`experiments.summary` (matured outcomes,
clusters by randomisation unit, time-aligned latency windows):

1. **HALT** (split mode) when the data cannot be read as an experiment:
   - sample-ratio mismatch of the *randomisation units* (a sequential
     Dirichlet-multinomial Bayes factor reaching 1/``SRM_ALPHA``), or
   - outcome arrival rates that differ between the arms (always-valid intervals
     that are apart by more than ``ARRIVAL_TOLERANCE``): missing outcomes would
     bias every comparison.
2. **ROLLBACK** as soon as an always-valid interval shows harm: the primary metric
   worse than control at all (``HARM_ALPHA``), the other of hit rate / P&L worse
   by more than its margin, the error rate above control's by more than its
   margin, or the treatment's latency above control's p95 + margin in the same
   minutes more often than 5 % (the margin: the larger of an absolute floor and a
   share of that minute's control p95).
3. **PROMOTE** once the primary effect's cluster-robust z has crossed the
   O'Brien–Fleming boundary at a planned look (looks are reached by
   *information*, 1 / variance of the primary effect, so clustered data needs
   more requests; the boundary is t-corrected for the number of clusters and
   tested once per look) and every guardrail's always-valid interval is inside its
   margin (P&L without ``--margin-pnl``: ``PNL_MARGIN_SD`` of its sd). Efficacy
   shown, the guardrails may be waited for: they are always valid.
4. **KEEP** the champion at the last planned look; otherwise **CONTINUE**.

No decision but HALT is taken before each arm has ``min_units_per_arm`` units.

Decisions are monotone: once an analysis has decided (anything but CONTINUE) the
decision stands at every later analysis. Only shown harm changes it: a PROMOTE
or KEEP becomes ROLLBACK when a guardrail or the primary is then shown harmful;
a ROLLBACK or HALT is never reversed. The information fraction is the running
maximum over the analyses, so a look once reached stays reached (the estimated
variance moves both ways; the group-sequential design's information time may not).
Each record's ``basis`` holds the numbers the decision rests on: the tests that
decided it (estimate, interval, threshold) with the look and information fraction
at which it was decided.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from experiments import stats
from experiments.data import Observations
from experiments.stats import Difference, TestResult
from experiments.store import Experiment
from experiments.summary import LATENCY_QUANTILE, Summary, summarize

SRM_ALPHA = 0.001
ARRIVAL_ALPHA = 0.002  # split between the arms' intervals
ARRIVAL_TOLERANCE = 0.005  # arrival rates may differ by half a point before the data is called biased
HARM_ALPHA = 0.004  # one-sided: primary metric shown worse than control
GUARDRAIL_ALPHA = 0.002  # one-sided, per guardrail, for ROLLBACK and for PROMOTE's margins
ERROR_ALPHA = 0.025  # per arm: the error-rate intervals cover 97.5 % at every look
ESTIMATED_VARIANCE_ALLOWANCE = 1.05  # 5 % more information than a known-variance design
TIGHT_FRACTION = 1 / 3  # always-valid intervals are tightest at a third of the planned sample
UNITS = {"hit_rate": "pp", "pnl": "P&L per trade"}
DECIDED = ("PROMOTE", "ROLLBACK", "HALT", "KEEP")  # every decision but CONTINUE stands once taken
NEVER_REVERSED = ("ROLLBACK", "HALT")  # a PROMOTE or KEEP still yields to shown harm; these yield to nothing
PNL_MARGIN_SD = 0.05  # without --margin-pnl, P&L may be at most this many of its sd below control's
MAX_REASON_CHARS = 300  # an earlier record's reason is repeated, bounded: the audit trail is read back


@dataclass(frozen=True)
class Decision:
    """One analysis, as stored in the audit trail."""

    decision: str
    reason: str
    look: int  # planned looks reached (0: before the first)
    tests: list[dict]
    at: float  # wall clock of the analysis (Unix s)
    now_s: float = math.nan  # the data's clock: what the analysis saw
    info_fraction: float = 0.0  # primary metric's information / planned information
    exposures: list[int] = field(default_factory=list)  # per arm [control, treatment]
    units: list[int] = field(default_factory=list)  # randomisation units per arm
    planned: dict = field(default_factory=dict)  # planned outcomes per arm (hit-rate primary)
    boundary_tested: bool = False  # this analysis spent its look's boundary test
    primary_crossed: bool = False  # the primary effect has crossed the boundary (now or earlier)
    basis: dict = field(default_factory=dict)  # what it rests on: look, info_fraction, now_s, tests

    def to_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)

    def memo(self) -> dict:
        """What later analyses read of this one: an entry of :func:`decide`'s ``history``."""
        return {"look": self.look, "decision": self.decision, "reason": self.reason, "now_s": self.now_s,
                "info_fraction": self.info_fraction, "boundary_tested": self.boundary_tested,
                "primary_crossed": self.primary_crossed, "basis": self.basis}


@dataclass
class _Look:
    """Where the analysis stands: the primary effect, its information and the planned look."""

    primary: Difference
    effect: float
    info_fraction: float
    look: int
    tight_n: float
    tests: list[TestResult] = field(default_factory=list)
    harmful: list[TestResult] = field(default_factory=list)  # the tests that show harm


def evaluate(e: Experiment, obs: Observations, now_s: float, history: Sequence[dict] = ()) -> Decision:
    """The decision on ``obs`` as of ``now_s``, given the earlier analyses' records (oldest first)."""
    return decide(e, summarize(e, obs, now_s), history)


def decide(e: Experiment, s: Summary, history: Sequence[dict] = ()) -> Decision:
    """The decision on one summary, given the earlier analyses' records (oldest first).

    ``history`` says which looks' boundaries were tested already, whether the primary
    crossed, the information reached so far and which decision, if any, stands.
    """
    state = _look(e, s, history)
    halt = _halt(e, s, state.tests)
    prior = _prior(history)
    if prior is None:
        if halt:
            return _decision("HALT", halt, e, s, state, basis=state.tests[-1:])
        if min(s.units) < e.min_units_per_arm:
            why = f"{s.units[0]} control and {s.units[1]} treatment units so far; each arm needs " \
                  f"{e.min_units_per_arm} before a decision"
            return _decision("CONTINUE", why, e, s, state)
    harm = _guardrails(e, s, state)
    if prior is not None and (prior.get("decision") in NEVER_REVERSED or not harm):
        return _standing(prior, e, s, state)
    if harm:
        after = f" (after {prior.get('decision')} at look {prior.get('look')})" if prior else ""
        return _decision("ROLLBACK", harm + after, e, s, state, basis=state.harmful)
    return _efficacy(e, s, state, history)


def _efficacy(e: Experiment, s: Summary, state: _Look, history: Sequence[dict]) -> Decision:
    """No harm, nothing decided yet: PROMOTE once the boundary is crossed, KEEP at the end, else CONTINUE."""
    crossing = _crossing(history)
    if crossing is not None:  # efficacy is shown; promotion waits only for the always-valid guardrails
        why = f"the boundary was crossed at look {crossing[0]}"
        return _promote_when_inside(e, s, state, why, crossing[1])
    tested = any(r.get("look") == state.look and r.get("boundary_tested") for r in history)
    if state.look >= 1 and not tested:
        crossed = _crossed(e, state)
        boundary = asdict(state.tests[-1])
        if crossed:
            return _promote_when_inside(e, s, state, f"look {state.look}: the boundary was crossed", boundary,
                                        tested=True)
        if state.look < e.planned_looks:
            return _decision("CONTINUE", f"look {state.look}: {e.primary} below the boundary", e, s, state,
                             tested=True, basis=[boundary])
        why = "planned information reached without crossing the boundary: keep the champion"
        return _decision("KEEP", why, e, s, state, tested=True, basis=[boundary])
    if state.look >= e.planned_looks:
        why = "planned information reached without crossing the boundary: keep the champion"
        return _decision("KEEP", why, e, s, state)
    return _decision("CONTINUE", f"{state.info_fraction:.0%} of the planned information", e, s, state)


def _prior(history: Sequence[dict]) -> dict | None:
    """The decision that stands: the first ROLLBACK or HALT, else the first PROMOTE or KEEP, else none."""
    decided = [r for r in history if r.get("decision") in DECIDED]
    never_reversed = [r for r in decided if r.get("decision") in NEVER_REVERSED]
    first = never_reversed or decided
    return first[0] if first else None


def _crossing(history: Sequence[dict]) -> tuple[object, dict | None] | None:
    """(look, boundary test) of the analysis where the primary first crossed, or None."""
    record = next((r for r in history if r.get("primary_crossed")), None)
    if record is None:
        return None
    tests = record.get("basis", {}).get("tests", []) if isinstance(record.get("basis"), dict) else []
    boundary = next((t for t in tests if isinstance(t, dict) and t.get("role") == "boundary"), None) \
        if isinstance(tests, list) else None
    return record.get("look"), boundary


def _standing(prior: dict, e: Experiment, s: Summary, state: _Look) -> Decision:
    """The earlier decision again, with today's tests and the numbers it was taken on."""
    decision = str(prior.get("decision"))
    basis = prior.get("basis") if isinstance(prior.get("basis"), dict) else {}
    reason = str(prior.get("reason", ""))[:MAX_REASON_CHARS]
    info = _fraction(prior.get("info_fraction"))
    why = f"{decision} stands since look {prior.get('look')} ({info:.0%} of the planned information): " \
          f"{reason}"
    return _decision(decision, why, e, s, state, crossed=bool(prior.get("primary_crossed")),
                     standing=basis or {"look": prior.get("look"), "info_fraction": info,
                                        "now_s": prior.get("now_s"), "tests": []})


def _promote_when_inside(e: Experiment, s: Summary, state: _Look, why: str, boundary: dict | None, *,
                         tested: bool = False) -> Decision:
    guardrails = [t for t in state.tests if t.role == "guardrail"]
    outside = [t for t in guardrails if not _inside(asdict(t))]
    crossing: list[TestResult | dict] = [boundary] if boundary else []
    if outside:
        names = ", ".join(t.metric for t in outside)
        return _decision("CONTINUE", f"{why}; not yet shown inside the margin: {names}", e, s,
                         state, tested=tested, crossed=True, basis=[*crossing, *outside])
    return _decision("PROMOTE", f"{why}; every guardrail shown inside its margin", e, s, state, tested=tested,
                     crossed=True, basis=[*crossing, *guardrails])


def _decision(decision: str, reason: str, e: Experiment, s: Summary, state: _Look, *,
              tested: bool = False, crossed: bool = False, basis: Sequence[TestResult | dict] = (),
              standing: dict | None = None) -> Decision:
    planned = planned_sample_size(e, state.primary.mean_control) if e.primary == "hit_rate" else None
    if standing is None:
        tests = [t if isinstance(t, dict) else asdict(t) for t in basis]
        standing = {"look": state.look, "info_fraction": state.info_fraction, "now_s": s.now_s,
                    "tests": tests}
    return Decision(decision, reason, state.look, [asdict(t) for t in state.tests], time.time(), s.now_s,
                    state.info_fraction, s.exposures.tolist(), s.units.tolist(),
                    asdict(planned) if planned else {}, tested, crossed, standing)


def _fraction(value: object) -> float:
    """An earlier record's information fraction: a finite number >= 0, else 0 (records are read back)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return max(float(value), 0.0)


def _primary(e: Experiment, s: Summary) -> Difference:
    return _pnl(s) if e.primary == "pnl" else _hit_rate(s)


def _hit_rate(s: Summary) -> Difference:
    return stats.cluster_difference(s.hit_sum, s.hit_n, floor=stats.bernoulli_floor(s.hit_sum, s.hit_n))


def _pnl(s: Summary) -> Difference:
    floor = stats.independent_variance(s.pnl_sum, s.pnl_sq, s.pnl_n)
    return stats.cluster_difference(s.pnl_sum, s.pnl_n, floor=floor)


def _look(e: Experiment, s: Summary, history: Sequence[dict]) -> _Look:
    effect = e.min_effect_pnl if e.primary == "pnl" else e.min_effect_pp / 100
    primary = _primary(e, s)
    # The design's information assumes a known variance; the cluster-robust one is estimated
    # from the clusters seen so far, which costs a little power (measured by validate-stats).
    planned = stats.max_information(effect, alpha=e.alpha, power=e.power, looks=e.planned_looks) \
        * ESTIMATED_VARIANCE_ALLOWANCE
    # The running maximum: the estimated variance moves both ways, but a look once reached stays
    # reached, or a boundary could be tested twice and a KEEP taken back.
    earlier = max((_fraction(r.get("info_fraction")) for r in history), default=0.0)
    fraction = max(primary.information / planned, earlier)
    look = min(e.planned_looks, math.floor(fraction * e.planned_looks + 1e-9))
    # Fixed per experiment (not from the data), so the always-valid intervals stay valid:
    # tightest at a third of the treatment sample a hit-rate design at p = 0.5 would plan.
    delta = e.min_effect_pp / 100
    tight = stats.sample_size_two_proportions(0.5 - delta / 2, delta, alpha=e.alpha, power=e.power,
                                              looks=e.planned_looks,
                                              treatment_share=e.treatment_share).treatment * TIGHT_FRACTION
    return _Look(primary, effect, fraction, look, tight)


# ---- HALT -------------------------------------------------------------------------------

def _halt(e: Experiment, s: Summary, tests: list[TestResult]) -> str:
    if e.mode != "split":
        return ""
    srm = stats.sequential_srm(s.units.tolist(), [1 - e.treatment_share, e.treatment_share])
    tests.append(_with(srm, metric="srm", role="check", units="treatment share of units",
                       threshold=SRM_ALPHA))
    if srm.p_value < SRM_ALPHA:
        return f"sample-ratio mismatch of units: treatment has {srm.estimate:.2%}, configured " \
               f"{e.treatment_share:.0%} (Bayes factor {math.exp(srm.statistic):.3g})"
    arrived, matured = s.arrived.sum(axis=0), s.matured.sum(axis=0)
    c = stats.bernoulli_confidence_sequence(int(arrived[0]), int(matured[0]), ARRIVAL_ALPHA / 2)
    t = stats.bernoulli_confidence_sequence(int(arrived[1]), int(matured[1]), ARRIVAL_ALPHA / 2)
    gap = max(c[0] - t[1], t[0] - c[1])
    rates = arrived / np.maximum(matured, 1)
    tests.append(TestResult("outcome arrival, always-valid", gap * 100, math.nan, (rates[1] - rates[0]) * 100,
                            (t[0] - c[1]) * 100, (t[1] - c[0]) * 100, "arrival", "check", "pp",
                            ARRIVAL_TOLERANCE * 100))
    if gap > ARRIVAL_TOLERANCE:
        return f"outcomes arrive within the {e.label_horizon_s:g} s horizon for {rates[0]:.1%} of control " \
               f"and {rates[1]:.1%} of treatment requests: the comparison would be biased"
    return ""


def _with(t: TestResult, **fields: object) -> TestResult:
    return TestResult(**{**asdict(t), **fields})


# ---- ROLLBACK: always-valid guardrails ---------------------------------------------------

def _interval(d: Difference, alpha: float, tight_n: float) -> tuple[float, float]:
    """One-sided-``alpha`` always-valid bounds of a cluster-robust difference, t-widened."""
    if not math.isfinite(d.estimate) or d.information <= 0:
        return -math.inf, math.inf
    rho = stats.mixture_rho(tight_n, alpha) * d.information / max(d.n_treatment, 1)
    radius = stats.mixture_radius(d.information, alpha, rho) * stats.t_widen(alpha, d.df)
    return d.estimate - radius, d.estimate + radius


def _metric_test(name: str, role: str, d: Difference, bounds: tuple[float, float],
                 threshold: float) -> TestResult:
    scale = 100 if name == "hit_rate" else 1
    z = d.estimate / math.sqrt(d.variance) if d.information > 0 and math.isfinite(d.estimate) else math.nan
    return TestResult(f"{name} cluster-robust, always-valid", z, math.nan, d.estimate * scale,
                      bounds[0] * scale, bounds[1] * scale, name, role, UNITS[name], threshold * scale)


def _guardrails(e: Experiment, s: Summary, state: _Look) -> str:
    """The reason to roll back, or "" — every guardrail's interval is added to ``state.tests``."""
    low, high = _interval(state.primary, HARM_ALPHA, state.tight_n)
    state.tests.append(_metric_test(e.primary, "primary", state.primary, (low, high), 0.0))
    scale = 100 if e.primary == "hit_rate" else 1
    reasons = [f"{e.primary} shown worse than control (always-valid upper bound "
               f"{high * scale:+.3g} {UNITS[e.primary]})"] if high < 0 else []
    state.harmful += state.tests[-1:] if high < 0 else []
    reasons += [r for r in (_other_metric(e, s, state), _errors(e, s, state), _latency(e, s, state)) if r]
    return "; ".join(reasons)


def _other_metric(e: Experiment, s: Summary, state: _Look) -> str:
    if e.primary == "pnl":
        name, margin, d = "hit_rate", e.margins.accuracy_pp / 100, _hit_rate(s)
        harm = margin
    else:
        name, margin, d = "pnl", pnl_margin(e, s), _pnl(s)
        # Without a margin of the user's, PROMOTE needs P&L shown within the default margin, but any
        # loss shown is harm: a desk rolls back a model shown to lose money, however little.
        harm = margin if e.margins.pnl_per_trade is not None else 0.0
    bounds = _interval(d, GUARDRAIL_ALPHA, state.tight_n)
    state.tests.append(_metric_test(name, "guardrail", d, bounds, -margin))
    if bounds[1] < -harm:
        state.harmful.append(state.tests[-1])
        if harm == 0:
            return f"{name} shown worse than control (always-valid)"
        return f"{name} worse than control by more than {_margin_text(name, harm)} (always-valid)"
    return ""


def pnl_margin(e: Experiment, s: Summary) -> float:
    """The P&L guardrail's margin: ``--margin-pnl``, else ``PNL_MARGIN_SD`` of the P&L's sd.

    The sd is the winsorised calibration sample's (fixed once ``PNL_CALIBRATION``
    outcomes have matured), so the margin does not move under the analysis's feet;
    before that, and for a P&L without spread, it is 0: P&L must not be shown worse.
    """
    if e.margins.pnl_per_trade is not None:
        return e.margins.pnl_per_trade
    return PNL_MARGIN_SD * s.pnl_sd if math.isfinite(s.pnl_sd) else 0.0


def _margin_text(name: str, margin: float) -> str:
    return f"{margin * 100:g} pp" if name == "hit_rate" else f"{margin:g} {UNITS[name]}"


def _errors(e: Experiment, s: Summary, state: _Look) -> str:
    c = stats.bernoulli_confidence_sequence(int(s.errors[0]), int(s.exposures[0]), ERROR_ALPHA)
    t = stats.bernoulli_confidence_sequence(int(s.errors[1]), int(s.exposures[1]), ERROR_ALPHA)
    rates = s.errors / np.maximum(s.exposures, 1)
    margin = e.margins.error_rate_pp
    state.tests.append(TestResult("error rate, beta-binomial mixture", math.nan, math.nan,
                                  (rates[1] - rates[0]) * 100, (t[0] - c[1]) * 100, (t[1] - c[0]) * 100,
                                  "error_rate", "guardrail", "pp", margin))
    if (t[0] - c[1]) * 100 > margin:
        state.harmful.append(state.tests[-1])
        return f"error rate above control's by more than {margin:g} pp (always-valid)"
    return ""


def _latency(e: Experiment, s: Summary, state: _Look) -> str:
    share = 1 - LATENCY_QUANTILE
    low, high = stats.bernoulli_confidence_sequence(s.latency_above, s.latency_n, 2 * GUARDRAIL_ALPHA)
    rate = s.latency_above / s.latency_n if s.latency_n else math.nan
    margin = _latency_margin_text(e, s)
    name = f"latency above control p95 + {margin}, {s.latency_windows} aligned minutes"
    state.tests.append(TestResult(name, float(s.latency_n), math.nan, rate * 100, low * 100, high * 100,
                                  "latency_p95", "guardrail", "% of treatment requests", share * 100))
    if low > share:
        state.harmful.append(state.tests[-1])
        return f"treatment latency above control's p95 + {margin} in " \
               f"{rate:.1%} of requests (> {share:.0%}, always-valid)"
    return ""


def _latency_margin_text(e: Experiment, s: Summary) -> str:
    """The latency margin rule and, once a minute has been compared, the mean margin it gave in ms."""
    rule = e.margins.latency_text()
    if not s.latency_windows:
        return rule
    return f"{rule} = {s.latency_margin_ms_sum / s.latency_windows:.3g} ms on average"


# ---- PROMOTE --------------------------------------------------------------------------

def _crossed(e: Experiment, state: _Look) -> bool:
    """Test the primary effect against this look's boundary (once per look)."""
    d = state.primary
    z_bound = float(stats.obrien_fleming_bounds(e.planned_looks, e.alpha)[state.look - 1])
    bound = stats.t_boundary(z_bound, d.df)
    z = d.estimate / math.sqrt(d.variance)
    state.tests.append(TestResult(f"{e.primary} group-sequential, look {state.look}/{e.planned_looks}", z,
                                  float(stats.special.stdtr(max(d.df, 1), -z)), math.nan, math.nan, math.nan,
                                  e.primary, "boundary", "z", bound))
    return z >= bound


def _inside(t: dict) -> bool:
    """Is a guardrail's always-valid interval inside its margin (or not measured at all)?"""
    if t["metric"] == "latency_p95":
        return t["statistic"] == 0 or t["ci_high"] < t["threshold"]
    if t["metric"] == "error_rate":
        return t["ci_high"] <= t["threshold"]
    if math.isnan(t["estimate"]):  # hit rate or P&L not reported by the bots
        return True
    if t["metric"] == "pnl" and t["threshold"] == 0:  # no P&L margin set: only shown harm blocks
        return t["ci_high"] >= 0
    return t["ci_low"] > t["threshold"]


def planned_sample_size(e: Experiment, p_control: float) -> stats.SampleSize:
    """Outcomes per arm to detect ``min_effect_pp`` at the experiment's split, alpha and power.

    Assumes independent outcomes; clustered data needs more, which the information-based
    looks account for.
    """
    p = p_control if math.isfinite(p_control) else 0.5
    p = min(max(p, 0.05), 0.95 - e.min_effect_pp / 100)
    return stats.sample_size_two_proportions(p, e.min_effect_pp / 100, alpha=e.alpha, power=e.power,
                                             looks=e.planned_looks, treatment_share=e.treatment_share)
