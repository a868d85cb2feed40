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
3. **PROMOTE** once every part of the rule is shown: the primary effect's
   cluster-robust z has crossed the O'Brien–Fleming boundary at a planned look
   (looks are reached by *information*, 1 / variance of the primary effect, so
   clustered data needs more requests; the boundary is t-corrected for the number
   of clusters and tested once per look), the other metric (P&L, or the hit rate
   for a P&L primary) has crossed the same boundary as a non-inferiority test
   within its margin (P&L without ``--margin-pnl``: ``PNL_MARGIN_SD`` of its sd),
   and the error-rate and latency guardrails' always-valid intervals are inside
   their margins. Each part is tested at the full alpha; the looks are spread
   over the whole rule's plan (:mod:`experiments.plan`: beta shared by the parts).
4. **KEEP** the champion at the last planned look without every part shown;
   otherwise **CONTINUE**.

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

from experiments import plan, stats
from experiments.data import Observations
from experiments.plan import RulePlan
from experiments.stats import Difference, TestResult
from experiments.store import Experiment
from experiments.summary import LATENCY_QUANTILE, Summary, summarize

SRM_ALPHA = 0.001
ARRIVAL_ALPHA = 0.002  # split between the arms' intervals
ARRIVAL_TOLERANCE = 0.005  # arrival rates may differ by half a point before the data is called biased
HARM_ALPHA = 0.004  # one-sided: primary metric shown worse than control
GUARDRAIL_ALPHA = 0.002  # one-sided, per guardrail, for ROLLBACK and for PROMOTE's margins
ERROR_ALPHA = 0.025  # per arm: the error-rate intervals cover 97.5 % at every look
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
    noninferior: bool = False  # the other metric has crossed its non-inferiority boundary (now or earlier)
    cuped: dict = field(default_factory=dict)  # variance reduction per metric: theta, covariate share, R²

    def to_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)

    def memo(self) -> dict:
        """What later analyses read of this one: an entry of :func:`decide`'s ``history``."""
        return {"look": self.look, "decision": self.decision, "reason": self.reason, "now_s": self.now_s,
                "info_fraction": self.info_fraction, "boundary_tested": self.boundary_tested,
                "primary_crossed": self.primary_crossed, "noninferior": self.noninferior, "basis": self.basis}


@dataclass
class _Look:
    """Where the analysis stands: the primary effect, its information and the planned look."""

    primary: Difference
    effect: float
    info_fraction: float
    look: int
    tight_n: float
    other: Difference  # the other metric: P&L when the primary is the hit rate, else the hit rate
    plan: RulePlan
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
    """No harm, nothing decided yet: each look's boundaries are tested once (the primary's until it
    crosses, the other metric's non-inferiority until it is shown); PROMOTE once every part of the
    rule has passed, KEEP at the last planned look, else CONTINUE."""
    tested = state.look >= 1 and not any(r.get("look") == state.look and r.get("boundary_tested")
                                         for r in history)
    crossing = _crossing(history, "primary_crossed", e.primary, e.planned_looks)
    shown = _crossing(history, "noninferior", _other_name(e), e.planned_looks)
    needed = _noninferiority_needed(e, s, state) and not _legacy(history)
    if tested:
        if crossing is None:
            crossing = _crossed(e, state)
        if shown is None and needed:
            shown = _noninferior(e, s, state)
    return _verdict(e, s, state, crossing, shown, tested=tested, needed=needed)


def _legacy(history: Sequence[dict]) -> bool:
    """Did the primary cross under the rule before the non-inferiority boundary existed (its records
    have no ``noninferior``)? Such an experiment keeps that rule's always-valid check of the other
    metric: its looks were spent on the primary's own plan."""
    return any(r.get("primary_crossed") is True and "noninferior" not in r for r in history)


def _verdict(e: Experiment, s: Summary, state: _Look, crossing: tuple[int, dict] | None,
             shown: tuple[int, dict] | None, *, tested: bool, needed: bool) -> Decision:
    flags = _Flags(tested, crossing is not None, shown is not None)
    passed = [c[1] for c in (crossing, shown) if c is not None]
    this_look = [asdict(t) for t in state.tests if t.role == "boundary"] if tested else []
    if crossing is not None:
        outside = _outside(e, state, shown, needed)
        if not outside:
            why = f"{e.primary}: the boundary was crossed at look {crossing[0]}"
            why += f"; {_other_name(e)} shown non-inferior at look {shown[0]}" if shown else ""
            guardrails = [asdict(t) for t in state.tests if t.role == "guardrail"]
            return _decision("PROMOTE", f"{why}; every guardrail shown inside its margin", e, s, state,
                             basis=[*passed, *guardrails], flags=flags)
        pending = f"{e.primary}: the boundary was crossed at look {crossing[0]}; not yet shown inside the " \
                  f"margin: {', '.join(name for name, _ in outside)}"
        basis = [*passed, *this_look, *(t for _, t in outside if t)]
    else:
        pending = f"look {state.look}: {e.primary} below the boundary" if tested else \
            f"{state.info_fraction:.0%} of the planned information"
        basis = this_look
    if state.look >= e.planned_looks:
        why = f"planned information reached without every part of the rule shown ({pending}): keep the " \
              "champion"
        return _decision("KEEP", why, e, s, state, basis=_unique(basis), flags=flags)
    return _decision("CONTINUE", pending, e, s, state, basis=_unique(basis), flags=flags)


def _unique(tests: Sequence[dict]) -> list[dict]:
    """The tests once each (a look's boundary test can be both this look's and the crossing)."""
    unique: list[dict] = []
    for t in tests:
        if t not in unique:
            unique.append(t)
    return unique


def _outside(e: Experiment, state: _Look, shown: tuple[int, dict] | None, needed: bool
             ) -> list[tuple[str, dict | None]]:
    """The parts of the rule not (yet) shown inside their margins, with their tests."""
    outside: list[tuple[str, dict | None]] = []
    for t in state.tests:
        if t.role != "guardrail":
            continue
        if t.metric == _other_name(e) and needed:
            if shown is None:
                outside.append((f"{t.metric} (non-inferiority at a look)", None))
        elif not _inside(asdict(t)):
            outside.append((t.metric, asdict(t)))
    return outside


def standing_decision(history: Sequence[dict]) -> dict | None:
    """The audit trail's decision that stands (see :func:`decide`), or None while every analysis said
    CONTINUE."""
    return _prior(history)


def _prior(history: Sequence[dict]) -> dict | None:
    """The decision that stands: the first ROLLBACK or HALT, else the first PROMOTE or KEEP, else none."""
    decided = [r for r in history if r.get("decision") in DECIDED]
    never_reversed = [r for r in decided if r.get("decision") in NEVER_REVERSED]
    first = never_reversed or decided
    return first[0] if first else None


def _crossing(history: Sequence[dict], flag: str, metric: str, looks: int) -> tuple[int, dict] | None:
    """(look, boundary test) of the first analysis where ``metric`` crossed its boundary, or None.

    Records are read back from Redis: one counts only if its ``flag`` is ``True``, it spent a
    planned look's test (``boundary_tested``, look 1..``looks``) and its basis holds that boundary
    test with a finite z at or past its finite threshold.
    """
    for record in history:
        if record.get(flag) is not True:
            continue
        look, test = record.get("look"), _boundary_test(record, metric)
        if record.get("boundary_tested") is True and isinstance(look, int) and not isinstance(look, bool) \
                and 1 <= look <= looks and test is not None:
            return look, test
    return None


def _boundary_test(record: dict, metric: str) -> dict | None:
    """The record's boundary test of ``metric`` that was crossed, if its basis holds one."""
    basis = record.get("basis")
    tests = basis.get("tests") if isinstance(basis, dict) else None
    for t in tests if isinstance(tests, list) else []:
        if isinstance(t, dict) and t.get("role") == "boundary" and t.get("metric") == metric:
            z, bound = t.get("statistic"), t.get("threshold")
            numbers = all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                          for v in (z, bound))
            return t if numbers and z >= bound else None  # type: ignore[operator]
    return None


def _standing(prior: dict, e: Experiment, s: Summary, state: _Look) -> Decision:
    """The earlier decision again, with today's tests and the numbers it was taken on."""
    decision = str(prior.get("decision"))
    basis = prior.get("basis") if isinstance(prior.get("basis"), dict) else {}
    reason = str(prior.get("reason", ""))[:MAX_REASON_CHARS]
    info = _fraction(prior.get("info_fraction"))
    why = f"{decision} stands since look {prior.get('look')} ({info:.0%} of the planned information): " \
          f"{reason}"
    flags = _Flags(crossed=bool(prior.get("primary_crossed")), noninferior=bool(prior.get("noninferior")))
    return _decision(decision, why, e, s, state, flags=flags,
                     standing=basis or {"look": prior.get("look"), "info_fraction": info,
                                        "now_s": prior.get("now_s"), "tests": []})


@dataclass(frozen=True)
class _Flags:
    """What an analysis records of the boundaries: tested at this look, primary crossed, other shown."""

    tested: bool = False
    crossed: bool = False
    noninferior: bool = False


def _decision(decision: str, reason: str, e: Experiment, s: Summary, state: _Look, *,
              flags: _Flags = _Flags(), basis: Sequence[TestResult | dict] = (),
              standing: dict | None = None) -> Decision:
    planned: dict = {}
    if e.primary == "hit_rate":
        alone = planned_sample_size(e, state.primary.mean_control)
        factor = state.plan.factor
        planned = {"treatment": math.ceil(alone.treatment * factor),
                   "control": math.ceil(alone.control * factor)}
    planned["rule"] = state.plan.to_dict()
    if standing is None:
        tests = [t if isinstance(t, dict) else asdict(t) for t in basis]
        standing = {"look": state.look, "info_fraction": state.info_fraction, "now_s": s.now_s,
                    "tests": tests}
    return Decision(decision, reason, state.look, [asdict(t) for t in state.tests], time.time(), s.now_s,
                    state.info_fraction, s.exposures.tolist(), s.units.tolist(), planned, flags.tested,
                    flags.crossed, standing, flags.noninferior, s.cuped)


def _fraction(value: object) -> float:
    """An earlier record's information fraction: a finite number >= 0, else 0 (records are read back)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return max(float(value), 0.0)


def _primary(e: Experiment, s: Summary) -> Difference:
    return _pnl(s) if e.primary == "pnl" else _hit_rate(s)


def _hit_rate(s: Summary) -> Difference:
    sums, counts = s.hit_values()  # CUPED-adjusted where a pre-experiment covariate is known
    return stats.cluster_difference(sums, counts, floor=stats.bernoulli_floor(sums, counts))


def _pnl(s: Summary) -> Difference:
    sums, squares, counts = s.pnl_values()
    floor = stats.independent_variance(sums, squares, counts)
    return stats.cluster_difference(sums, counts, floor=floor)


def _look(e: Experiment, s: Summary, history: Sequence[dict]) -> _Look:
    effect = e.min_effect_pnl if e.primary == "pnl" else e.min_effect_pp / 100
    primary = _primary(e, s)
    other = _hit_rate(s) if e.primary == "pnl" else _pnl(s)
    # The whole rule's plan: the primary's own, grown until the other parts of PROMOTE are powered
    # too (experiments.plan). It includes the allowance for the cluster-robust variance being
    # estimated from the clusters seen so far, which costs a little power (measured by validate-stats).
    rule = plan.rule_plan(effect, _ratios(e, s, primary, other), alpha=e.alpha, power=e.power,
                          looks=e.planned_looks, error_alpha=ERROR_ALPHA, latency_alpha=2 * GUARDRAIL_ALPHA)
    # The running maximum: the estimated variance (and the plan's ratios) move both ways, but a
    # look once reached stays reached, or a boundary could be tested twice and a KEEP taken back.
    earlier = max((_fraction(r.get("info_fraction")) for r in history), default=0.0)
    fraction = max(primary.information / rule.information, earlier)
    look = min(e.planned_looks, math.floor(fraction * e.planned_looks + 1e-9))
    # Fixed per experiment (not from the data), so the always-valid intervals stay valid:
    # tightest at a third of the treatment sample a hit-rate design at p = 0.5 would plan.
    delta = e.min_effect_pp / 100
    tight = stats.sample_size_two_proportions(0.5 - delta / 2, delta, alpha=e.alpha, power=e.power,
                                              looks=e.planned_looks,
                                              treatment_share=e.treatment_share).treatment * TIGHT_FRACTION
    return _Look(primary, effect, fraction, look, tight, other, rule)


MIN_RATE_COUNT = 100  # requests (or latency comparisons) before a rate guardrail is sized by its rate


def _ratios(e: Experiment, s: Summary, primary: Difference, other: Difference) -> plan.Ratios:
    """Where the other parts of the rule stand per unit of the primary's information, as measured."""
    info = primary.information
    if not (info > 0 and math.isfinite(info)):
        return plan.Ratios()
    margin = _other_margin(e, s)
    usable = margin > 0 and 0 < other.information < math.inf
    total = int(s.exposures.sum())
    return plan.Ratios(
        other_margin_z=margin * math.sqrt(other.information / info) if usable else 0.0,
        error_rate=float(s.errors.sum()) / total if total >= MIN_RATE_COUNT else math.nan,
        error_margin=e.margins.error_rate_pp / 100, exposures_per_info=float(s.exposures[1]) / info,
        control_per_treatment=float(s.exposures[0]) / max(float(s.exposures[1]), 1.0),
        latency_share=s.latency_above / s.latency_n if s.latency_n >= MIN_RATE_COUNT else math.nan,
        latency_limit=1 - LATENCY_QUANTILE, latency_per_info=s.latency_n / info)


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
    """ROLLBACK on the other metric: any loss shown (the default P&L rule), or more than the user's margin."""
    name, d = _other_name(e), state.other
    margin = _other_margin(e, s)
    # Without a margin of the user's, PROMOTE needs P&L shown within the default margin, but any
    # loss shown is harm: a desk rolls back a model shown to lose money, however little.
    harm = 0.0 if e.primary == "hit_rate" and e.margins.pnl_per_trade is None else margin
    bounds = _interval(d, GUARDRAIL_ALPHA, state.tight_n)
    state.tests.append(_metric_test(name, "guardrail", d, bounds, -margin))
    if bounds[1] < -harm:
        state.harmful.append(state.tests[-1])
        if harm == 0:
            return f"{name} shown worse than control (always-valid)"
        return f"{name} worse than control by more than {_margin_text(name, harm)} (always-valid)"
    return ""


def _other_name(e: Experiment) -> str:
    return "hit_rate" if e.primary == "pnl" else "pnl"


def _other_margin(e: Experiment, s: Summary) -> float:
    """How far below control the other metric may be for PROMOTE (0: not known yet, or not asked for)."""
    return e.margins.accuracy_pp / 100 if e.primary == "pnl" else pnl_margin(e, s)


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

def _crossed(e: Experiment, state: _Look) -> tuple[int, dict] | None:
    """Test the primary effect against this look's boundary (once per look): (look, test) if crossed."""
    d = state.primary
    z_bound = float(stats.obrien_fleming_bounds(e.planned_looks, e.alpha)[state.look - 1])
    bound = stats.t_boundary(z_bound, d.df)
    z = d.estimate / math.sqrt(d.variance)
    state.tests.append(TestResult(f"{e.primary} group-sequential, look {state.look}/{e.planned_looks}", z,
                                  float(stats.special.stdtr(max(d.df, 1), -z)), math.nan, math.nan, math.nan,
                                  e.primary, "boundary", "z", bound))
    return (state.look, asdict(state.tests[-1])) if z >= bound else None


def _noninferiority_needed(e: Experiment, s: Summary, state: _Look) -> bool:
    """Does PROMOTE wait for the other metric's non-inferiority boundary?

    Yes when its margin is not 0 (the P&L default is a share of its sd, known once the
    calibration sample has matured) and the bots report it at all; a metric nobody reports
    cannot be tested. ``--margin-pnl 0`` (``--margin-accuracy-pp 0`` for a P&L primary), or a
    P&L without spread under the default margin, asks only that no loss be shown.
    """
    if e.primary == "hit_rate":
        user = e.margins.pnl_per_trade
        if user == 0 or (user is None and s.pnl_bounds is not None and not s.pnl_sd > 0):
            return False
    elif e.margins.accuracy_pp == 0:
        return False
    return state.other.n_treatment > 0 and state.other.n_control > 0


def _noninferior(e: Experiment, s: Summary, state: _Look) -> tuple[int, dict] | None:
    """Test the other metric against this look's non-inferiority boundary: (look, test) if shown.

    The same O'Brien–Fleming boundary as the primary's, at the design's full alpha, for
    z = (estimate + margin) / se: the other metric is at most ``margin`` worse than control.
    """
    margin, d, name = _other_margin(e, s), state.other, _other_name(e)
    if not (margin > 0 and d.information > 0 and math.isfinite(d.estimate)):
        return None  # the margin is not known yet (P&L calibration): this look is not tested
    z_bound = float(stats.obrien_fleming_bounds(e.planned_looks, e.alpha)[state.look - 1])
    bound = stats.t_boundary(z_bound, d.df)
    z = (d.estimate + margin) / math.sqrt(d.variance)
    test = f"{name} non-inferiority within {_margin_text(name, margin)}, group-sequential, look " \
           f"{state.look}/{e.planned_looks}"
    state.tests.append(TestResult(test, z, float(stats.special.stdtr(max(d.df, 1), -z)), math.nan, math.nan,
                                  math.nan, name, "boundary", "z", bound))
    return (state.look, asdict(state.tests[-1])) if z >= bound else None


def _inside(t: dict) -> bool:
    """Is a guardrail's always-valid interval inside its margin (or not measured at all)?"""
    if t["metric"] == "latency_p95":
        return t["statistic"] == 0 or t["ci_high"] < t["threshold"]
    if t["metric"] == "error_rate":
        return t["ci_high"] <= t["threshold"]
    if math.isnan(t["estimate"]):  # hit rate or P&L not reported by the bots
        return True
    if t["threshold"] == 0:  # a margin of 0 for the other metric: only shown harm blocks
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
