"""The experiment report: the analyses as a table, and one figure of every metric over time.

``experiment report`` and ``experiment simulate --png`` draw it from decision
records (:meth:`experiments.analysis.Decision.to_dict`, as the audit trail
stores them): per metric the effect and its always-valid interval over minutes
since the start, the margin or boundary it is judged against, units on every
axis, the decisions other than CONTINUE marked, and the realised split.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def number(value: object) -> float:
    """A record's number; NaN for null or anything else (old or hand-written records)."""
    return float(value) if isinstance(value, int | float) else math.nan


def print_decisions(records: Sequence[dict], start_s: float) -> None:
    """One line per analysis: minute, look, information, units, decision, primary effect, reason.

    ``->`` marks the first decision other than CONTINUE.
    """
    print(f"  {'minute':>8} {'look':>4} {'info':>5} {'units c/t':>11}  {'decision':<9} "
          f"{'primary effect [always-valid interval]':<42} reason")
    first = next((i for i, r in enumerate(records) if r.get("decision") != "CONTINUE"), None)
    for i, r in enumerate(records):
        units = "/".join(str(u) for u in r.get("units") or ("-", "-"))
        print(f"{'->' if i == first else '  '}{_minutes(r, start_s):8.1f} {r.get('look', 0):>4} "
              f"{number(r.get('info_fraction')):5.0%} {units:>11}  {r.get('decision', '?'):<9} "
              f"{_effect(r):<42} {r.get('reason', '')}")
    if first is None:
        print(f"no decision other than CONTINUE in {len(records)} analyses")
    else:
        print(f"-> the first decision other than CONTINUE: minute {_minutes(records[first], start_s):.1f}")


def _minutes(record: dict, start_s: float) -> float:
    """Minutes since the experiment start, on the data's clock (the wall clock for old records)."""
    now_s = number(record.get("now_s"))
    return ((now_s if math.isfinite(now_s) else number(record.get("at"))) - start_s) / 60


def _effect(record: dict) -> str:
    t = next((t for t in record.get("tests", []) if t.get("role") == "primary"), None)
    if t is None:
        return "-"
    value, low, high = (number(t.get(k)) for k in ("estimate", "ci_low", "ci_high"))
    return f"{t.get('metric', '')} {value:+.3g} [{low:+.3g}, {high:+.3g}] {t.get('units', '')}"


# ---- the figure ---------------------------------------------------------------------------

_RULES = {"primary": "ROLLBACK if the interval is below the line (shown worse)",
          "guardrail": "ROLLBACK if the interval is past the margin; PROMOTE needs it inside",
          "arrival": "HALT if the interval is beyond ± the tolerance (outcomes missing unevenly)",
          "boundary": "PROMOTE when z crosses the boundary at a planned look (and every guardrail is inside)",
          "srm": "HALT when the sequential test rejects the configured split"}
_WHAT = {"latency_p95": "treatment requests above control p95 + margin",
         "error_rate": "treatment − control error rate", "arrival": "treatment − control outcome arrival"}
_ORDER = {"primary": 0, "boundary": 1, "guardrail": 2, "check": 3}
_COLOURS = {"PROMOTE": "tab:green", "ROLLBACK": "tab:red", "HALT": "tab:orange", "KEEP": "tab:gray"}
_MAX_LABELS = 12  # decision annotations; more would overlap


@dataclass(frozen=True)
class Panel:
    """One metric over the analyses, ready to draw: a line, its interval band, and the line it must cross."""

    title: str
    ylabel: str
    minutes: np.ndarray
    value: np.ndarray
    value_label: str
    low: np.ndarray  # always-valid interval (NaN: none)
    high: np.ndarray
    reference: np.ndarray  # the threshold at each analysis (NaN: not tested then)
    reference_label: str
    mirrored: bool = False  # the reference holds at ± (a tolerance)


def decision_panels(records: Sequence[dict], *, start_s: float, treatment_share: float) -> list[Panel]:
    """The panels of :func:`plot_decisions`: the primary effect, its z against the boundary, each
    guardrail, outcome arrival and the realised split, in that order (those the records have)."""
    minutes = np.array([_minutes(r, start_s) for r in records])
    found = {(t["metric"], t.get("role", "")) for r in records for t in r.get("tests", []) if t.get("metric")}
    panels = []
    for metric, role in sorted(found, key=lambda k: (_ORDER.get(k[1], 9), k[0] == "srm", k[0])):
        rows = [_test(r, metric, role) for r in records]
        if metric == "srm":
            panels.append(_srm_panel(minutes, rows, treatment_share))
        elif role == "primary":
            boundary = [_test(r, metric, "boundary") for r in records]
            panels += [_metric_panel(minutes, rows, metric, role), _z_panel(minutes, rows, boundary, metric)]
        elif role != "boundary":
            panels.append(_metric_panel(minutes, rows, metric, role))
    return panels


def _test(record: dict, metric: str, role: str) -> dict:
    tests = record.get("tests", [])
    return next((t for t in tests if t.get("metric") == metric and t.get("role") == role), {})


def _column(rows: Sequence[dict], name: str, scale: float = 1.0) -> np.ndarray:
    """One field over the analyses; NaN where absent or not finite (a gap in the plot)."""
    values = np.array([number(row.get(name)) for row in rows]) * scale
    return np.where(np.isfinite(values), values, np.nan)


def _metric_panel(minutes: np.ndarray, rows: Sequence[dict], metric: str, role: str) -> Panel:
    units = next((row["units"] for row in rows if row.get("units")), "")
    kind = "arrival" if metric == "arrival" else role
    return Panel(f"{metric} ({role}): {_RULES.get(kind, '')}", f"{_WHAT.get(metric, 'treatment − control')} "
                 f"({units})", minutes, _column(rows, "estimate"), "estimate", _column(rows, "ci_low"),
                 _column(rows, "ci_high"), _column(rows, "threshold"),
                 {"primary": "no difference", "guardrail": "margin"}.get(kind, "tolerance"),
                 mirrored=metric == "arrival")


def _z_panel(minutes: np.ndarray, rows: Sequence[dict], boundary: Sequence[dict], metric: str) -> Panel:
    nothing = np.full(len(minutes), np.nan)
    return Panel(f"{metric} group-sequential test: {_RULES['boundary']}",
                 "z (standard errors, cluster-robust)", minutes, _column(rows, "statistic"), "z",
                 nothing, nothing, _column(boundary, "threshold"),
                 "O'Brien-Fleming boundary (tested once a look)")


def _srm_panel(minutes: np.ndarray, rows: Sequence[dict], treatment_share: float) -> Panel:
    nothing = np.full(len(minutes), np.nan)
    alpha = next((number(row.get("threshold")) for row in rows if row), math.nan)
    factor = 1 / alpha if alpha > 0 else math.inf  # the p-value threshold, as the Bayes factor that HALTs
    units = next((row["units"] for row in rows if row.get("units")), "treatment share")
    return Panel(f"sample ratio (check): {_RULES['srm']} (Bayes factor >= {factor:.3g})",
                 f"{units} (%)", minutes, _column(rows, "estimate", 100), "realised", nothing, nothing,
                 np.full(len(minutes), treatment_share * 100), "configured")


def plot_decisions(records: Sequence[dict], path: Path, *, start_s: float, treatment_share: float) -> None:
    """A PNG of the analyses: one panel per metric over minutes since ``start_s``, decisions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = decision_panels(records, start_s=start_s, treatment_share=treatment_share)
    fig, axes = plt.subplots(max(len(panels), 1), 1, figsize=(13, 2.9 * max(len(panels), 1)), sharex=True,
                             squeeze=False)
    for ax, panel in zip(axes[:, 0], panels, strict=False):
        _draw(ax, panel)
    minutes = np.array([_minutes(r, start_s) for r in records])
    _mark_decisions(list(axes[:, 0]), minutes, [str(r.get("decision", "")) for r in records])
    for ax in axes[:, 0]:
        ax.set_xlabel("minutes since the experiment start (min)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _draw(ax: Axes, p: Panel) -> None:
    ax.plot(p.minutes, p.value, color="tab:blue", linewidth=1.4, label=p.value_label)
    if np.isfinite(p.low).any() and np.isfinite(p.high).any():
        ax.fill_between(p.minutes, p.low, p.high, color="tab:blue", alpha=0.2, linewidth=0,
                        label="always-valid interval")
    points = {"linestyle": "none", "marker": "_", "markersize": 14}  # a boundary: one mark per tested look
    style = points if _sparse(p.reference) else {"linestyle": "--"}
    ax.plot(p.minutes, p.reference, color="black", linewidth=1, label=p.reference_label, **style)
    if p.mirrored:
        ax.plot(p.minutes, -p.reference, color="black", linewidth=1, **style)
    ax.set_title(p.title, fontsize="medium", loc="left")
    ax.set_ylabel(textwrap.fill(p.ylabel, 30), fontsize="small")
    ax.tick_params(labelbottom=True)  # every panel is read on its own: each keeps its time axis
    ax.set_ylim(*_limits(p))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")  # outside: hides no data


def _sparse(reference: np.ndarray) -> bool:
    """Is the threshold known at a few analyses only (a boundary tested once a look)?"""
    return bool(np.isfinite(reference).sum() < len(reference) / 2)


def _limits(p: Panel) -> tuple[float, float]:
    """The y range: lines after the first tenth of the analyses; bands and the boundary after half.

    What the first analyses show on a handful of exposures (very wide intervals, a
    boundary far out) would otherwise flatten the rest; it runs off the panel instead.
    """
    tenth, half = len(p.minutes) // 10, len(p.minutes) // 2
    reference = p.reference[half if _sparse(p.reference) else tenth:]
    values = np.concatenate([p.value[tenth:], reference, -reference if p.mirrored else [], p.low[half:],
                             p.high[half:]])
    values = values[np.isfinite(values)]
    if not len(values):
        return -1.0, 1.0
    low, high = float(values.min()), float(values.max())
    pad = 0.1 * (high - low) or max(abs(high), 1.0) * 0.1
    return low - pad, high + pad


def _runs(decisions: Sequence[str]) -> list[tuple[str, int, int]]:
    """(decision, first, last analysis) of each run of one decision other than CONTINUE."""
    runs: list[tuple[str, int, int]] = []
    for i, d in enumerate(decisions):
        if d != "CONTINUE" and runs and runs[-1][0] == d and runs[-1][2] == i - 1:
            runs[-1] = (d, runs[-1][1], i)
        elif d != "CONTINUE":
            runs.append((d, i, i))
    return runs


def _mark_decisions(axes: list[Axes], minutes: np.ndarray, decisions: list[str]) -> None:
    """A vertical line where each run of a decision other than CONTINUE starts, shaded while it lasts."""
    runs = _runs(decisions)
    for d, start, end in runs:
        colour = _COLOURS.get(d, "black")
        for ax in axes:
            ax.axvline(minutes[start], color=colour, linewidth=1.2, linestyle=":")
            if end > start:
                ax.axvspan(minutes[start], minutes[end], color=colour, alpha=0.08, linewidth=0)
    for d, start, _ in runs[:_MAX_LABELS]:
        axes[0].annotate(d, xy=(minutes[start], 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                         textcoords="offset points", rotation=90, va="top", fontsize="small",
                         color=_COLOURS.get(d, "black"))
