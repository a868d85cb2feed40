"""The experiment report: the analyses as a table, and one figure of every metric over time.

``experiment report`` and ``experiment simulate --png`` draw it from decision
records (:meth:`experiments.analysis.Decision.to_dict`, as the audit trail
stores them): a strip of the decision at each analysis, labelled where it
changes; then per metric the effect and its always-valid interval over minutes
since the start, the margin or boundary it is judged against, units on every
axis, the decisions other than CONTINUE marked, and the realised split.

It reads the same however many analyses there are: every series has a marker at
each analysis (one analysis is one point), a margin is a line across its panel, a
boundary a short bar at each look that tested it, and a metric the records do not
measure (no P&L reported, no latency minute yet) says so in its panel.
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
    from matplotlib.figure import Figure


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


def _tests(record: dict) -> list[dict]:
    """A record's tests that name a metric (records are untrusted: anything else is left out)."""
    tests = record.get("tests")
    return [t for t in tests if isinstance(t, dict) and isinstance(t.get("metric"), str)
            and isinstance(t.get("role", ""), str)] if isinstance(tests, list) else []


def _effect(record: dict) -> str:
    t = next((t for t in _tests(record) if t.get("role") == "primary"), None)
    if t is None:
        return "-"
    value, low, high = (number(t.get(k)) for k in ("estimate", "ci_low", "ci_high"))
    metric, units = t.get("metric", ""), t.get("units", "")
    if not math.isfinite(value):
        return f"{metric}: no outcomes yet"
    if not (math.isfinite(low) and math.isfinite(high)):  # too few clusters for an interval yet
        return f"{metric} {value:+.3g} (no interval yet) {units}"
    return f"{metric} {value:+.3g} [{low:+.3g}, {high:+.3g}] {units}"


# ---- the figure ---------------------------------------------------------------------------

_RULES = {"primary": "ROLLBACK if the interval is below the line (shown worse)",
          "guardrail": "ROLLBACK if the interval is past the margin; PROMOTE needs it inside",
          "arrival": "HALT if the interval is beyond ± the tolerance (outcomes missing unevenly)",
          "boundary": "PROMOTE when z crosses the boundary at a planned look (and every guardrail is inside)",
          "noninferiority": "PROMOTE needs z across the boundary at a look (within the margin)",
          "srm": "HALT when the sequential test rejects the configured split"}
_WHAT = {"latency_p95": "treatment requests above control p95 + margin",
         "error_rate": "treatment − control error rate", "arrival": "treatment − control outcome arrival"}
# What a panel says when the records never measured its metric (NaN in every analysis).
_EMPTY = {"pnl": "no P&L reported", "hit_rate": "no hit rate reported",
          "latency_p95": "no data: no minute with latency from both arms yet",
          "error_rate": "no data: no exposures yet", "arrival": "no data: no outcome due yet",
          "srm": "no data: no units assigned yet"}
_ORDER = {"primary": 0, "boundary": 1, "guardrail": 2, "check": 3}
_COLOURS = {"CONTINUE": "tab:blue", "PROMOTE": "tab:green", "ROLLBACK": "tab:red", "HALT": "tab:orange",
            "KEEP": "tab:gray"}
_MAX_LABELS = 12  # decision annotations; more would overlap
_MAX_REASON_CHARS = 300  # a record's reason is untrusted text: what the figure's heading repeats of it
_INCHES_PER_PANEL = 2.9


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
    per_look: bool = False  # the reference is tested once a look (a boundary), not at every analysis
    empty: str = "no data: not measured in these analyses"  # said in the panel when ``value`` is all NaN
    infinite_reference: bool = False  # tested, but the threshold was infinite (too few clusters)


def decision_panels(records: Sequence[dict], *, start_s: float, treatment_share: float) -> list[Panel]:
    """The metric panels of :func:`decision_figure`: the primary effect, its z against the boundary,
    each guardrail, outcome arrival and the realised split, in that order (those the records have)."""
    minutes = _all_minutes(records, start_s)
    found = {(t["metric"], t.get("role", "")) for r in records for t in _tests(r)}
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
            tested = [_test(r, metric, "boundary") for r in records]
            if role == "guardrail" and any(tested):  # the other metric's non-inferiority boundary
                panels.append(_noninferiority_panel(minutes, tested, metric))
    return panels


def _all_minutes(records: Sequence[dict], start_s: float) -> np.ndarray:
    minutes = np.array([_minutes(r, start_s) for r in records], dtype=float)
    return np.where(np.isfinite(minutes), minutes, np.nan)


def _test(record: dict, metric: str, role: str) -> dict:
    return next((t for t in _tests(record) if t["metric"] == metric and t.get("role", "") == role), {})


def _column(rows: Sequence[dict], name: str, scale: float = 1.0) -> np.ndarray:
    """One field over the analyses; NaN where absent or not finite (a gap in the plot)."""
    values = np.array([number(row.get(name)) for row in rows], dtype=float) * scale
    return np.where(np.isfinite(values), values, np.nan)


def _units(rows: Sequence[dict], default: str = "") -> str:
    """The units the rows name ('' if none), as text: records are untrusted."""
    return next((str(row["units"])[:60] for row in rows if row.get("units")), default)


def _in_units(text: str, units: str) -> str:
    return f"{text} ({units})" if units else text


def _metric_panel(minutes: np.ndarray, rows: Sequence[dict], metric: str, role: str) -> Panel:
    kind = "arrival" if metric == "arrival" else role
    return Panel(f"{metric} ({role}): {_RULES.get(kind, '')}",
                 _in_units(_WHAT.get(metric, "treatment − control"), _units(rows)), minutes,
                 _column(rows, "estimate"), "estimate", _column(rows, "ci_low"), _column(rows, "ci_high"),
                 _column(rows, "threshold"),
                 {"primary": "no difference", "guardrail": "margin"}.get(kind, "± tolerance"),
                 mirrored=metric == "arrival", empty=_EMPTY.get(metric, Panel.empty))


def _z_panel(minutes: np.ndarray, rows: Sequence[dict], boundary: Sequence[dict], metric: str) -> Panel:
    return _boundary_panel(minutes, rows, boundary, f"{metric} group-sequential test: {_RULES['boundary']}",
                           "z (standard errors, cluster-robust)", f"no data: no z without a {metric} effect")


def _noninferiority_panel(minutes: np.ndarray, tested: Sequence[dict], metric: str) -> Panel:
    """z = (estimate + margin) / se at each look it was tested, against the same boundary as the primary's."""
    return _boundary_panel(minutes, tested, tested, f"{metric} non-inferiority: {_RULES['noninferiority']}",
                           "z of effect + margin (standard errors)",
                           f"no data: {metric} not tested at a look yet")


def _boundary_panel(minutes: np.ndarray, z_rows: Sequence[dict], boundary: Sequence[dict], title: str,
                    ylabel: str, empty: str) -> Panel:
    """A z (the ``statistic`` of ``z_rows``) against the boundary tested once a look."""
    nothing = np.full(len(minutes), np.nan)
    return Panel(title, ylabel, minutes, _column(z_rows, "statistic"), "z", nothing, nothing,
                 _column(boundary, "threshold"), "O'Brien-Fleming boundary (tested once a look)",
                 per_look=True, empty=empty,
                 infinite_reference=any(math.isinf(number(b.get("threshold"))) for b in boundary if b))


def _srm_panel(minutes: np.ndarray, rows: Sequence[dict], treatment_share: float) -> Panel:
    nothing = np.full(len(minutes), np.nan)
    alpha = next((number(row.get("threshold")) for row in rows if row), math.nan)
    # The p-value threshold, as the Bayes factor that HALTs (none said when the records lack it).
    factor = f" (Bayes factor >= {1 / alpha:.3g})" if 0 < alpha < math.inf else ""
    configured = treatment_share * 100 if math.isfinite(treatment_share) else math.nan
    return Panel(f"sample ratio (check): {_RULES['srm']}{factor}",
                 _in_units(_units(rows, "treatment share"), "%"), minutes, _column(rows, "estimate", 100),
                 "realised", nothing, nothing, np.full(len(minutes), configured), "configured",
                 empty=_EMPTY["srm"])


def decision_figure(records: Sequence[dict], *, start_s: float, treatment_share: float) -> Figure:
    """The report's figure, not saved: a decision strip, then one panel per metric over minutes since
    ``start_s``. Built without pyplot, so nothing global holds it once the caller lets it go."""
    from matplotlib.figure import Figure

    panels = decision_panels(records, start_s=start_s, treatment_share=treatment_share)
    minutes = _all_minutes(records, start_s)
    decisions = [str(r.get("decision", "?"))[:20] for r in records]
    fig = Figure(figsize=(13, 1.9 + _INCHES_PER_PANEL * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels) + 1, 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": [1.5 / _INCHES_PER_PANEL] + [1] * len(panels)})[:, 0]
    _draw_timeline(axes[0], minutes, decisions)
    for ax, panel in zip(axes[1:], panels, strict=True):
        _draw(ax, panel)
    _mark_decisions(list(axes[1:]), minutes, decisions)
    for ax in axes:
        ax.set_xlabel("minutes since the experiment start (min)", fontsize="small")
        ax.tick_params(labelbottom=True, labelsize="small")  # each panel is read alone: each has a time axis
        ax.grid(alpha=0.25)
    _x_range(axes[0], minutes)
    fig.suptitle(_heading(records, minutes, decisions), x=0.01, ha="left", fontsize="medium",
                 fontweight="bold")
    return fig


def plot_decisions(records: Sequence[dict], path: Path, *, start_s: float, treatment_share: float) -> Figure:
    """Write :func:`decision_figure` to ``path`` as a PNG; the figure is returned for a caller to inspect."""
    fig = decision_figure(records, start_s=start_s, treatment_share=treatment_share)
    fig.savefig(path, dpi=100)
    return fig


def _heading(records: Sequence[dict], minutes: np.ndarray, decisions: list[str]) -> str:
    """How many analyses, and the last one's decision and reason (wrapped, bounded)."""
    if not records:
        return "no analyses"
    at = f" at minute {minutes[-1]:.3g}" if math.isfinite(minutes[-1]) else ""
    reason = str(records[-1].get("reason", ""))[:_MAX_REASON_CHARS]
    text = f"{len(records)} {'analysis' if len(records) == 1 else 'analyses'}; the last{at}: " \
           f"{decisions[-1]}" + (f" — {reason}" if reason else "")
    return textwrap.fill(text, 150)


def _x_range(ax: Axes, minutes: np.ndarray) -> None:
    """From the experiment start to the last analysis, padded so a point at either end shows whole."""
    finite = minutes[np.isfinite(minutes)]
    if not len(finite):
        return
    low, high = min(0.0, float(finite.min())), float(finite.max())
    pad = 0.04 * (high - low) or 0.5
    ax.set_xlim(low - pad, high + pad)


def _draw(ax: Axes, p: Panel) -> None:
    if np.isfinite(p.value).any():
        ax.plot(p.minutes, p.value, color="tab:blue", linewidth=1.4, marker="o",
                markersize=_marker_size(len(p.minutes)), label=p.value_label, zorder=3)
        _band(ax, p)
    else:  # nothing measured: say so, rather than leave the reader to guess at a blank panel
        _say(ax, p.empty)
    _reference(ax, p)
    ax.set_title(p.title, fontsize="medium", loc="left")
    ax.set_ylabel(textwrap.fill(p.ylabel, 30, break_on_hyphens=False), fontsize="small")
    ax.set_ylim(*_limits(p))
    if ax.get_legend_handles_labels()[1]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")  # outside: hides no data


def _say(ax: Axes, text: str, y: float = 0.5) -> None:
    """A note in the middle of a panel, boxed so that no line drawn there strikes it through."""
    ax.text(0.5, y, text, transform=ax.transAxes, ha="center", va="center", color="0.25", fontsize="large",
            bbox={"boxstyle": "round,pad=0.4", "facecolor": "white", "edgecolor": "0.7"}, zorder=5)


def _marker_size(n: int) -> float:
    """Big enough to see one point; smaller when hundreds of analyses would merge into a bar."""
    return 5.0 if n <= 60 else 2.5


def _band(ax: Axes, p: Panel) -> None:
    """The always-valid interval: a band where analyses in a row have one, a bar where one stands alone."""
    known = np.isfinite(p.low) & np.isfinite(p.high) & np.isfinite(p.minutes)
    alone = known & ~(np.r_[False, known[:-1]] | np.r_[known[1:], False])
    label = "always-valid interval"
    if (known & ~alone).any():
        ax.fill_between(p.minutes, p.low, p.high, where=known & ~alone, color="tab:blue", alpha=0.2,
                        linewidth=0, label=label)
        label = "_nolegend_"
    if alone.any():  # a band one analysis wide has no width
        ax.vlines(p.minutes[alone], p.low[alone], p.high[alone], color="tab:blue", alpha=0.3, linewidth=7,
                  label=label)


def _reference(ax: Axes, p: Panel) -> None:
    """A margin, tolerance or configured share holds at every analysis: a dashed line across the panel.

    A boundary belongs to the look that tested it, so it is a short bar at each such
    analysis: a line through them would show a test at analyses that made none. A
    reference that changes between analyses (hand-written records) is drawn the same way.
    """
    finite = np.isfinite(p.reference) & np.isfinite(p.minutes)
    if not finite.any():
        if p.infinite_reference:  # tested, but with fewer than 2 clusters (df < 1): nothing to draw
            _say(ax, "boundary infinite at the looks so far: too few clusters (time blocks or units) "
                     "for a t boundary", 0.85)
        elif p.per_look and np.isfinite(p.value).any():
            _say(ax, "no planned look reached yet: the boundary is tested from the first look", 0.85)
        return
    levels = np.unique(p.reference[finite])
    for sign, label in ((1, p.reference_label), (-1, "_nolegend_"))[:2 if p.mirrored else 1]:
        if p.per_look or len(levels) > 1:
            ax.plot(p.minutes[finite], sign * p.reference[finite], color="black", linestyle="none",
                    marker="_", markersize=18, markeredgewidth=2, label=label, zorder=4)
        else:
            ax.axhline(sign * levels[0], color="black", linewidth=1, linestyle="--", label=label)


def _limits(p: Panel) -> tuple[float, float]:
    """The y range: lines after the first tenth of the analyses; bands and the boundary after half.

    What the first analyses show on a handful of exposures (very wide intervals, a
    boundary far out) would otherwise flatten the rest; it runs off the panel instead.
    The last value of each series stays in view, so whatever the legend names shows.
    """
    n = len(p.minutes)
    tenth, half = n // 10, (n // 2 if n >= 10 else 0)  # a few analyses: every one in view
    reference = _tail(p.reference, half if p.per_look else tenth)
    parts = [_tail(p.value, tenth), reference, -reference if p.mirrored else reference[:0]]
    if np.isfinite(p.value).any():  # the band is drawn only beside a value
        parts += [_tail(p.low, half), _tail(p.high, half)]
    values = np.concatenate(parts)
    if not len(values):
        return -1.0, 1.0
    low, high = float(values.min()), float(values.max())
    pad = 0.1 * (high - low) or max(abs(high), 1.0) * 0.1
    return low - pad, high + pad


def _tail(values: np.ndarray, start: int) -> np.ndarray:
    """The finite values from analysis ``start`` on; the last finite one if there are none."""
    finite = np.isfinite(values)
    tail = values[start:][finite[start:]]
    return tail if len(tail) else values[finite][-1:]


def _draw_timeline(ax: Axes, minutes: np.ndarray, decisions: list[str]) -> None:
    """A dot per analysis coloured by its decision, the decision written where it changes."""
    ax.set_title("decision at each analysis (written where it changes)", fontsize="medium", loc="left")
    ax.set_yticks([])
    ax.set_ylim(-1, 2.2)
    if not decisions:
        ax.text(0.5, 0.5, "no data: no analyses", transform=ax.transAxes, ha="center", va="center")
        return
    for d in dict.fromkeys(decisions):
        at = np.array([x == d for x in decisions])
        ax.scatter(minutes[at], np.zeros(int(at.sum())), s=40, color=_COLOURS.get(d, "black"), label=d,
                   zorder=3)
    changes = [i for i, d in enumerate(decisions) if (i == 0 or d != decisions[i - 1])
               and math.isfinite(minutes[i])]
    middle = (minutes[changes].min() + minutes[changes].max()) / 2 if changes else 0.0
    for k, i in enumerate(changes[:_MAX_LABELS]):  # two heights, so neighbouring labels do not overlap
        # Written towards the middle, so that a label at either end stays inside the panel.
        side = int(np.sign(minutes[i] - middle)) if len(changes) > 1 else 0
        ax.annotate(decisions[i], (minutes[i], 0), xytext=(4 * side, 7 + 12 * (k % 2)),
                    textcoords="offset points", ha={-1: "left", 0: "center", 1: "right"}[side],
                    fontsize="small", color=_COLOURS.get(decisions[i], "black"))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")


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
    for d, start, end in _runs(decisions):
        colour = _COLOURS.get(d, "black")
        if not math.isfinite(minutes[start]):
            continue
        for ax in axes:
            ax.axvline(minutes[start], color=colour, linewidth=1.2, linestyle=":")
            if end > start and math.isfinite(minutes[end]):
                ax.axvspan(minutes[start], minutes[end], color=colour, alpha=0.08, linewidth=0)
