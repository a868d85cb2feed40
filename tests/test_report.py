"""The experiment report's figure reads whatever the number of analyses and whatever the records lack.

Decision records come from the live rule (:func:`experiments.replay.replay` runs the
same :func:`experiments.analysis.decide` as ``experiment analyze``) on small synthetic
tables, and pass through JSON as the audit trail stores them (NaN and infinities
included). Each panel of the figure must show its data (a point visible on its own,
a line, a band) or say in the panel that there is none; every legend entry must be
an artist with finite data inside its panel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.collections import Collection, LineCollection, PathCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import Bbox

from experiments import report
from experiments.data import Observations
from experiments.replay import replay
from experiments.simulate import experiment_for
from experiments.store import Margins

START_S = 1_700_000_000.0
SHARE = 0.2
# 100 symbols, a fifth treated, +25 pp hit rate: decisive within minutes (as in test_simulate).
DESIGN = {"treatment_share": SHARE, "min_effect_pp": 8.0, "planned_looks": 4, "label_horizon_s": 30.0,
          "margins": Margins(latency_p95_ms=50, error_rate_pp=5, pnl_per_trade=0.5)}
NO_DATA = re.compile(r"^no .+ reported$|^no data: .+")
NAN_OR_INF = re.compile(r"\b(nan|inf|infinity)\b", re.IGNORECASE)


def observations(*, minutes: int, pnl: bool = True, seed: int = 0) -> Observations:
    """Exposures by symbol, every fifth symbol treated, outcomes within the horizon; P&L if ``pnl``."""
    rng = np.random.default_rng(seed)
    n = int(rng.poisson(4 * 60 * minutes))
    t = START_S + np.sort(rng.uniform(0, minutes * 60, n))
    unit = rng.integers(0, 100, n)
    arm = (unit % 5 == 0).astype(np.int8)
    return Observations.build(t_s=t, unit=np.char.add("SYM", unit.astype(str)), arm=arm,
                              error=rng.random(n) < 0.002, latency_ms=rng.lognormal(1.0, 0.3, n),
                              outcome_t_s=t + rng.uniform(1, 20, n),
                              correct=(rng.random(n) < 0.5 + 0.25 * arm).astype(float),
                              pnl=rng.standard_t(3, n) + arm if pnl else None, start_s=START_S)


def audit_trail(obs: Observations, *, every_s: float, analyses: int) -> list[dict]:
    """``analyses`` decision records every ``every_s``, as ``runner.run_analysis`` stores and reads them."""
    decisions = replay(experiment_for(obs, **DESIGN), obs, every_s=every_s,
                       until_s=obs.start_s + analyses * every_s, stop=False)
    assert len(decisions) == analyses
    return [json.loads(json.dumps(d.to_dict())) for d in decisions]


@dataclass(frozen=True)
class Case:
    name: str
    records: list[dict]


@cache
def trail(name: str) -> Case:
    """The audit trails the tests draw (built once per session)."""
    if name == "no P&L reported":  # bots that report whether a prediction was right, not what it earned
        return Case(name, audit_trail(observations(minutes=8, pnl=False), every_s=60, analyses=6))
    obs = observations(minutes=15)
    if name == "one analysis":
        return Case(name, audit_trail(obs, every_s=60, analyses=1))
    # the first analysis reaches look 1 and tests the boundary; the second tests none
    return Case(name, audit_trail(obs, every_s=360, analyses=2))


CASES = ("one analysis", "two analyses", "no P&L reported")


def figure_of(records: Sequence[dict]) -> Figure:
    return report.decision_figure(records, start_s=START_S, treatment_share=SHARE)


# ---- what "shown" means, on the artists --------------------------------------------------

def _display(points: np.ndarray, transform) -> np.ndarray:
    """Points in display pixels; NaN rows where the data is missing or masked."""
    filled = np.ma.filled(np.ma.asarray(points, dtype=float), np.nan).reshape(-1, 2)
    return transform.transform(filled)


def _inside(ax: Axes, pixels: np.ndarray) -> np.ndarray:
    box = ax.bbox.padded(1)
    return np.isfinite(pixels).all(axis=1) & np.array([box.contains(x, y) for x, y in np.nan_to_num(pixels)])


def _line_shown(ax: Axes, line: Line2D) -> bool:
    """A marker at a finite point in the panel, or a drawn segment between two such points."""
    inside = _inside(ax, _display(np.asarray(line.get_xydata()), line.get_transform()))
    marker = line.get_marker() not in (None, "None", "none", "", " ") and line.get_markersize() > 0
    segment = line.get_linestyle() not in ("None", "none", "", " ") and line.get_linewidth() > 0
    return bool((marker and inside.any()) or (segment and (inside[1:] & inside[:-1]).any()))


def _collection_shown(ax: Axes, c: Collection) -> bool:
    """Scatter: a point in the panel. Band or bars: a piece with extent (more than a pixel) in the panel."""
    if isinstance(c, PathCollection):
        return bool(_inside(ax, _display(c.get_offsets(), c.get_offset_transform())).any()
                    and (np.asarray(c.get_sizes()) > 0).any())
    for path in c.get_paths():
        pixels = _display(path.vertices, c.get_transform())
        pixels = pixels[np.isfinite(pixels).all(axis=1)]
        if not len(pixels):
            continue
        seen = Bbox.intersection(Bbox([pixels.min(axis=0), pixels.max(axis=0)]), ax.bbox.padded(1))
        wide = isinstance(c, LineCollection) and max(c.get_linewidths()) > 0  # a bar is a thick segment
        if seen is not None and (seen.height > 1 if wide else min(seen.width, seen.height) > 1):
            return True
    return False


def shown(ax: Axes, artist: object) -> bool:
    if isinstance(artist, Line2D):
        return _line_shown(ax, artist)
    if isinstance(artist, Collection):
        return _collection_shown(ax, artist)
    raise AssertionError(f"an artist of a kind this test does not read: {artist!r}")


def no_data_text(ax: Axes) -> list[str]:
    return [t.get_text() for t in ax.texts if NO_DATA.match(t.get_text())]


def labels_of(fig: Figure) -> list[str]:
    texts = [fig.get_suptitle()]
    for ax in fig.axes:
        texts += [ax.get_title("left"), ax.get_title(), ax.get_xlabel(), ax.get_ylabel(),
                  *(t.get_text() for t in ax.texts)]
        legend = ax.get_legend()
        texts += [t.get_text() for t in legend.get_texts()] if legend else []
    return texts


# ---- the tests ---------------------------------------------------------------------------

@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> Case:
    return trail(request.param)


def test_every_panel_shows_its_data_or_says_there_is_none(case):
    fig = figure_of(case.records)
    panels = report.decision_panels(case.records, start_s=START_S, treatment_share=SHARE)
    assert len(panels) >= 7, [p.title for p in panels]
    for ax, panel in zip(fig.axes[-len(panels):], panels, strict=True):
        where = f"{case.name}: panel {panel.title!r}"
        if np.isfinite(panel.value).any():
            series = [a for a in ax.get_lines() if a.get_label() == panel.value_label]
            assert series and shown(ax, series[0]), f"{where}: {panel.value_label} not visible"
            assert not no_data_text(ax), where
        else:
            assert no_data_text(ax), f"{where}: blank, and does not say why"


def test_every_legend_entry_is_drawn_with_finite_data_in_its_panel(case):
    fig = figure_of(case.records)
    for ax in fig.axes:
        artists, labels = ax.get_legend_handles_labels()
        for artist, label in zip(artists, labels, strict=True):
            where = f"{case.name}: {ax.get_title('left')!r}"
            assert shown(ax, artist), f"{where}: {label!r} in the legend, not drawn"
        legend = ax.get_legend()
        assert [t.get_text() for t in legend.get_texts()] == labels if legend else not labels


def test_the_boundary_is_drawn_where_a_look_tested_it():
    records = trail("two analyses").records
    assert [r["boundary_tested"] for r in records] == [True, False], "the case this test is about"
    fig = figure_of(records)
    z_ax = next(ax for ax in fig.axes if "group-sequential" in ax.get_title("left"))
    boundary = [a for a in z_ax.get_lines() if a.get_label().startswith("O'Brien-Fleming")]
    assert len(boundary) == 1 and shown(z_ax, boundary[0])


def test_a_panel_without_pnl_says_so():
    records = trail("no P&L reported").records
    fig = figure_of(records)
    pnl_ax = next(ax for ax in fig.axes if ax.get_title("left").startswith("pnl"))
    assert no_data_text(pnl_ax) == ["no P&L reported"]
    assert "estimate" not in pnl_ax.get_legend_handles_labels()[1]


def test_decisions_are_written_where_they_change(case):
    decisions = [r["decision"] for r in case.records]
    changes = [d for i, d in enumerate(decisions) if i == 0 or d != decisions[i - 1]]
    timeline = figure_of(case.records).axes[0]
    assert [t.get_text() for t in timeline.texts] == changes
    assert sum(len(c.get_offsets()) for c in timeline.collections) == len(decisions)  # a dot per analysis


def test_no_label_says_nan_or_inf(case):
    texts = labels_of(figure_of(case.records))
    assert not [t for t in texts if NAN_OR_INF.search(t)], texts


def test_records_missing_numbers_draw_notes_not_nan():
    """Untrusted or old records: thresholds infinite, estimates NaN, units absent, a test that is no dict."""
    odd = [{"look": 0, "decision": "CONTINUE", "reason": "", "at": START_S + 60 * k, "now_s": None,
            "tests": ["junk", {"metric": "srm", "role": "check", "threshold": float("inf")},
                      {"metric": "pnl", "role": "guardrail", "estimate": float("nan"),
                       "ci_low": float("-inf"), "ci_high": float("inf"), "threshold": float("nan")}]}
           for k in (1, 2)]
    records = json.loads(json.dumps(odd))
    fig = figure_of(records)
    notes = [no_data_text(ax) for ax in fig.axes[1:]]
    assert notes == [["no P&L reported"], ["no data: no units assigned yet"]]
    texts = labels_of(fig)
    assert not [t for t in texts if NAN_OR_INF.search(t) or "()" in t], texts


def test_plot_decisions_writes_the_png_and_returns_its_figure(tmp_path):
    png = tmp_path / "report.png"
    fig = report.plot_decisions(trail("one analysis").records, png, start_s=START_S, treatment_share=SHARE)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert isinstance(fig, Figure) and len(fig.axes) == 8  # the decision strip and seven metric panels


def test_the_printed_audit_trail_says_nan_or_inf_nowhere(capsys):
    """The demo's first analyses come before any outcome matured or any interval is finite."""
    early = {"metric": "hit_rate", "role": "primary", "estimate": float("nan"), "ci_low": float("-inf"),
             "ci_high": float("inf"), "units": "pp"}
    wide = {**early, "estimate": 8.96}
    records = json.loads(json.dumps([
        {"look": 0, "decision": "CONTINUE", "reason": "", "now_s": START_S + 60 * k, "info_fraction": 0.0,
         "units": [10, 1], "tests": [t]} for k, t in ((1, early), (2, wide))]))
    report.print_decisions(records, START_S)
    out = capsys.readouterr().out
    assert "hit_rate: no outcomes yet" in out and "hit_rate +8.96 (no interval yet)" in out
    assert not NAN_OR_INF.search(out), out


def test_an_infinite_boundary_is_named_not_called_unreached():
    """With fewer than two clusters (a demo-length run split by request) the look is tested against an
    infinite t boundary: the z panel says so instead of claiming no look was reached."""
    primary = {"metric": "hit_rate", "role": "primary", "estimate": 8.0, "ci_low": -200.0, "ci_high": 210.0,
               "statistic": 3.4, "units": "pp"}
    bound = {"metric": "hit_rate", "role": "boundary", "statistic": 3.4, "threshold": float("inf")}
    records = json.loads(json.dumps([{"look": 1, "decision": "CONTINUE", "reason": "",
                                      "now_s": START_S + 5 * k, "tests": [primary, bound]} for k in (1, 2)]))
    z_panel = figure_of(records).axes[2]
    assert [t.get_text() for t in z_panel.texts] == [
        "boundary infinite at the looks so far: too few clusters (time blocks or units) for a t boundary"]


def test_the_other_metrics_non_inferiority_boundary_has_its_panel():
    records = trail("two analyses").records
    assert any(t.get("metric") == "pnl" and t.get("role") == "boundary" for t in records[0]["tests"])
    panels = report.decision_panels(records, start_s=START_S, treatment_share=SHARE)
    shown = [p for p in panels if p.title.startswith("pnl non-inferiority")]
    assert len(shown) == 1 and np.isfinite(shown[0].value).any() and np.isfinite(shown[0].reference).any()
