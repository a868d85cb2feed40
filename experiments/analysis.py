"""From per-arm measurements to a decision: HALT, ROLLBACK, PROMOTE, CONTINUE or KEEP.

Order of checks, at every look:
1. Sample-ratio mismatch (split mode): p < 0.001 → HALT; nothing else is read.
2. Guardrails, always valid (checked as often as one likes): each arm's hit rate
   and error rate get a confidence sequence (alpha split between the arms); if
   the treatment is shown worse than control by more than the margin → ROLLBACK.
   Latency p95 has no closed-form sequence: its bootstrap interval uses
   alpha / planned_looks at every look (Bonferroni over the looks).
3. PROMOTE only at a planned look: the primary metric's z crosses the
   O'Brien–Fleming bound for this look, and every guardrail is shown inside its
   margin (non-inferiority intervals).
4. Otherwise CONTINUE; at the last planned look, KEEP the champion.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

from experiments import stats
from experiments.store import Experiment

SRM_P = 0.001
GUARDRAIL_ALPHA = 0.05


@dataclass
class ArmData:
    """What one arm has seen so far (matured outcomes only)."""

    exposures: int
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    correct: int = 0
    outcomes: int = 0
    pnl: list[float] = field(default_factory=list)
    only_right: int = 0  # shadow mode: outcomes only this arm got right (discordant pairs)

    @property
    def hit_rate(self) -> float:
        """Share of matured outcomes that were right."""
        return self.correct / self.outcomes if self.outcomes else float("nan")


@dataclass(frozen=True)
class Decision:
    """One analysis, as stored in the audit trail."""

    decision: str
    reason: str
    look: int
    tests: list[dict]
    at: float

    def to_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)


def analyze(experiment: Experiment, control: ArmData, treatment: ArmData, look: int,
            planned_n_per_arm: int, *, earlier_at_look: str | None = None) -> Decision:
    """The decision at ``look`` (1-based) of ``experiment.planned_looks``.

    The boundary is tested once per look: ``earlier_at_look`` is what an earlier
    analysis at the same look decided ("PROMOTE", or anything else for "not
    crossed"), and is kept rather than tested again, which would spend alpha
    the design did not plan for. HALT and ROLLBACK are re-checked every time.
    """
    tests: list[stats.TestResult] = []
    if experiment.mode == "split":
        # Checked at every analysis, so it must be anytime-valid: a chi-square test checked
        # each minute raised false HALTs from 0.10 % to 1.91 % (issue 10).
        srm = stats.sequential_srm([control.exposures, treatment.exposures],
                                   [1 - experiment.treatment_share, experiment.treatment_share])
        tests.append(srm)
        if srm.p_value < SRM_P:
            return _decision("HALT", f"sample-ratio mismatch (p = {srm.p_value:.2g})", look, tests)
    breach = _guardrail_breach(experiment, control, treatment, tests)
    if breach:
        return _decision("ROLLBACK", breach, look, tests)
    if earlier_at_look == "PROMOTE":
        return _decision("PROMOTE", f"the boundary was crossed at look {look} already", look, tests)
    if earlier_at_look is None and _promotable(experiment, control, treatment, look, planned_n_per_arm,
                                               tests):
        return _decision("PROMOTE", "primary metric crossed the boundary; guardrails inside margins",
                         look, tests)
    if look >= experiment.planned_looks:
        return _decision("KEEP", "last planned look without a promotion: keep the champion", look, tests)
    return _decision("CONTINUE", "no boundary crossed yet", look, tests)


def _decision(decision: str, reason: str, look: int, tests: list[stats.TestResult]) -> Decision:
    return Decision(decision, reason, look, [asdict(t) for t in tests], time.time())


def _rate_interval(successes: int, n: int, alpha: float) -> tuple[float, float]:
    if n == 0:
        return -math.inf, math.inf
    p = successes / n
    return stats.confidence_sequence(p, max(p * (1 - p), 1e-6), n, alpha)


def _guardrail_breach(e: Experiment, c: ArmData, t: ArmData, tests: list) -> str:
    a = GUARDRAIL_ALPHA / 2  # two arms share the error budget
    c_lo, c_hi = _rate_interval(c.correct, c.outcomes, a)
    t_lo, t_hi = _rate_interval(t.correct, t.outcomes, a)
    if t_hi - c_lo < -e.margins.accuracy_pp / 100:
        return f"hit rate worse by more than {e.margins.accuracy_pp} pp (always-valid interval)"
    ce_lo, ce_hi = _rate_interval(c.errors, c.exposures, a)
    te_lo, _ = _rate_interval(t.errors, t.exposures, a)
    if te_lo > e.margins.error_rate_ratio * max(ce_hi, 0.0) and t.errors:
        return f"error rate above {e.margins.error_rate_ratio}x control (always-valid interval)"
    if len(c.latencies_ms) > 50 and len(t.latencies_ms) > 50:
        p95 = stats.quantile_difference(c.latencies_ms, t.latencies_ms, 0.95,
                                        confidence=1 - GUARDRAIL_ALPHA / e.planned_looks, n_resamples=1000)
        tests.append(p95)
        if p95.ci_low > e.margins.latency_p95_ms:
            return f"p95 latency worse by more than {e.margins.latency_p95_ms} ms"
    return ""


def _promotable(e: Experiment, c: ArmData, t: ArmData, look: int, planned_n: int, tests: list) -> bool:
    if min(c.outcomes, t.outcomes) < planned_n * look / e.planned_looks or not c.outcomes:
        return False
    primary = stats.two_proportions(c.correct, c.outcomes, t.correct, t.outcomes)
    tests.append(primary)
    z = math.copysign(math.sqrt(primary.statistic), primary.estimate)
    discordant = c.only_right + t.only_right
    if e.mode == "shadow" and discordant:  # paired: the same requests scored by both arms
        tests.append(stats.mcnemar_exact(c.only_right, t.only_right))
        z = (t.only_right - c.only_right) / math.sqrt(discordant)
    bound = stats.obrien_fleming_bounds(e.planned_looks, e.alpha)[look - 1]
    inside = primary.ci_low > -e.margins.accuracy_pp / 100
    if c.errors or t.errors:
        errors = stats.error_rates(c.errors, c.exposures, t.errors, t.exposures)
        tests.append(errors)
        inside &= errors.estimate <= e.margins.error_rate_ratio
    if c.pnl and t.pnl:
        tests.append(stats.trimmed_welch(c.pnl, t.pnl))
    if len(c.latencies_ms) > 50 and len(t.latencies_ms) > 50:
        p95 = stats.quantile_difference(c.latencies_ms, t.latencies_ms, 0.95, n_resamples=1000)
        tests.append(p95)
        inside &= p95.ci_high < e.margins.latency_p95_ms
    return bool(z >= bound and inside)


def planned_sample_size(e: Experiment, p_control: float) -> int:
    """Per-arm outcomes needed to detect ``min_effect_pp`` with the experiment's alpha and power."""
    return stats.sample_size_two_proportions(p_control, e.min_effect_pp / 100, alpha=e.alpha,
                                             power=e.power, looks=e.planned_looks)

