"""``streamserve experiment create | simulate | status | analyze | watch | stop | report``.

``simulate`` needs no Redis: it replays a table through the decision rule.
``report`` and ``simulate --png`` draw the same figure from decision records
(:meth:`experiments.analysis.Decision.to_dict`, as the audit trail stores them).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import redis

from experiments.assignment import CONTROL, TREATMENT
from experiments.report import number as _num
from experiments.report import plot_decisions, print_decisions
from experiments.store import MODES, PRIMARY_METRICS, UNITS, Experiment, ExperimentStore, Margins
from protocol import connection
from protocol.settings import Settings
from registry import Registry

if TYPE_CHECKING:
    from experiments import feasibility, runner
    from experiments.data import Observations

_DEFAULT = Experiment("", "", 0, 1)  # the design defaults, shown by --help
_DEFAULTS_HELP = argparse.ArgumentDefaultsHelpFormatter


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``experiment`` command group."""
    parser = subparsers.add_parser("experiment", help="A/B and shadow tests between versions")
    sub = parser.add_subparsers(dest="experiment_command", required=True)
    p = sub.add_parser("create", help="start an experiment (one per model)", formatter_class=_DEFAULTS_HELP)
    p.add_argument("model")
    p.add_argument("--control", required=True, help="champion version: number, alias or label")
    p.add_argument("--treatment", required=True, help="challenger version: number, alias or label")
    p.add_argument("--salt", help="assignment salt (default: random)")
    _add_design(p)
    p.add_argument("--max-days", type=float, default=1.0,
                   help="horizon in trading days of 390 min: refuse a design that cannot reach its planned "
                        "information within it at the model's recent traffic")
    p.add_argument("--force", action="store_true", help="start it even when it cannot reach the plan in time")
    p.add_argument("--no-cuped", action="store_true",
                   help="no variance reduction: compare raw outcomes, not outcomes adjusted by their route's "
                        "pre-period hit rate and P&L (CUPED, from the previous experiment)")
    p.set_defaults(func=_create)
    _add_simulate(sub)
    p = sub.add_parser("list", help="every model's current or last experiment")
    p.set_defaults(func=_list)
    _add_per_model(sub)


def _add_design(p: argparse.ArgumentParser) -> None:
    """The design options ``create`` and ``simulate`` share; defaults are ``Experiment``'s."""
    d, m = _DEFAULT, _DEFAULT.margins
    g = p.add_argument_group("design")
    g.add_argument("--share", type=float, default=d.treatment_share, help="treatment's share of units")
    g.add_argument("--mode", choices=MODES, default=d.mode,
                   help="split: a unit sees one arm; shadow: both arms answer every request")
    g.add_argument("--unit", choices=UNITS, default=d.unit, help="randomisation unit")
    g.add_argument("--primary", choices=PRIMARY_METRICS, default=d.primary,
                   help="what PROMOTE must show better")
    g.add_argument("--min-effect-pp", type=float, default=d.min_effect_pp,
                   help="hit-rate effect the design is powered for, in pp")
    g.add_argument("--min-effect-pnl", type=float, default=d.min_effect_pnl,
                   help="P&L-per-trade effect the design is powered for (needed with --primary pnl)")
    g.add_argument("--horizon-s", type=float, default=d.label_horizon_s,
                   help="label horizon: an outcome is due this many seconds after its request")
    g.add_argument("--looks", type=int, default=d.planned_looks, help="planned looks (O'Brien-Fleming)")
    g.add_argument("--min-units", type=int, default=d.min_units_per_arm,
                   help="units each arm needs before any decision but HALT")
    g.add_argument("--margin-latency-ms", type=float, default=m.latency_p95_ms,
                   help="absolute floor of the latency margin: treatment p95 may be this many ms above "
                        "control's, in the same minutes, whatever the relative margin")
    g.add_argument("--margin-latency-relative", type=float, default=m.latency_p95_relative,
                   help="relative latency margin: treatment p95 may be this fraction above control's p95 "
                        "of the same minutes (0.2 = 20 %%); the larger of the two margins applies")
    g.add_argument("--margin-error-pp", type=float, default=m.error_rate_pp,
                   help="treatment error rate at most this many points above control's")
    g.add_argument("--margin-accuracy-pp", type=float, default=m.accuracy_pp,
                   help="hit rate at most this many points below control's (a guardrail when P&L is primary)")
    g.add_argument("--margin-pnl", type=float, default=m.pnl_per_trade,
                   help="P&L per trade at most this below control's (none: only not shown worse)")


def _design(args: argparse.Namespace) -> dict[str, Any]:
    """``Experiment`` fields from the design options."""
    margins = Margins(args.margin_latency_ms, args.margin_error_pp, args.margin_accuracy_pp, args.margin_pnl,
                      latency_p95_relative=args.margin_latency_relative)
    return {"treatment_share": args.share, "mode": args.mode, "unit": args.unit, "primary": args.primary,
            "min_effect_pp": args.min_effect_pp, "min_effect_pnl": args.min_effect_pnl,
            "label_horizon_s": args.horizon_s, "planned_looks": args.looks,
            "min_units_per_arm": args.min_units, "margins": margins}


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", formatter_class=_DEFAULTS_HELP,
                       help="replay a table of exposures and outcomes through the decision rule (no Redis)")
    p.add_argument("table", type=Path, help="CSV or .parquet: time, unit, arm [, correct, pnl, latency_ms, "
                                            "error, outcome_time, covariate_hit, covariate_pnl]")
    _add_design(p)
    p.add_argument("--every-s", type=float, default=60.0, help="seconds of data between analyses")
    p.add_argument("--continue-after-decision", action="store_true",
                   help="replay every analysis until the last outcome is due, not only up to the first "
                        "decision other than CONTINUE")
    p.add_argument("--json", action="store_true", help="one JSON record per analysis instead of the table")
    p.add_argument("--png", type=Path, help="also plot the analyses into this file")
    p.set_defaults(func=_simulate)


def _add_per_model(sub: argparse._SubParsersAction) -> None:
    for name, func, text in (("status", _status, "the experiment and its arms (show)"),
                             ("analyze", _analyze, "run the analysis now (--apply acts on it)"),
                             ("watch", _watch, "analyze every --interval-s until a decision"),
                             ("pause", _pause, "all traffic to the champion until resumed"),
                             ("resume", _resume, "serve both arms again"),
                             ("stop", _stop, "stop; all traffic to the champion"),
                             ("report", _report, "the audit trail as a table, and a PNG plot")):
        p = sub.add_parser(name, help=text)
        p.add_argument("model")
        p.set_defaults(func=func)
        if name in ("analyze", "watch"):
            p.add_argument("--apply", action="store_true", help="promote / stop as decided")
        if name == "watch":
            p.add_argument("--interval-s", type=float, default=30.0)
        if name == "stop":
            p.add_argument("--reason", default="stopped by hand")
        if name == "report":
            p.add_argument("--png", type=Path, default=Path("experiment-report.png"))


@contextmanager
def _store(settings: Settings) -> Iterator[tuple[redis.Redis, Registry, ExperimentStore]]:
    with connection.connect(settings.redis_url) as client:
        registry = Registry(client, settings.artifact_dir, control_secret=settings.control_secret)
        yield client, registry, ExperimentStore(client, registry)


def _create(args: argparse.Namespace, settings: Settings) -> int:
    from experiments import covariates  # the pre-period of variance reduction

    if not (math.isfinite(args.max_days) and args.max_days > 0):
        print(f"streamserve experiment create: --max-days must be a positive number, not {args.max_days}",
              file=sys.stderr)
        return 2
    with _store(settings) as (client, registry, store):
        control, treatment = (registry.resolve(args.model, v).version for v in (args.control, args.treatment))
        previous = store.get(args.model)  # the pre-period of variance reduction, read once created
        check = _feasibility(client, store, args.model, _design(args), args.max_days)
        if check is not None and not check.feasible and not args.force:
            print(f"streamserve experiment create: refused: the design cannot reach its planned information "
                  f"within {args.max_days:g} trading day(s); change the unit, split or effect, raise "
                  f"--max-days, or --force to start it anyway", file=sys.stderr)
            return 2
        e = store.create(args.model, control, treatment, salt=args.salt, **_design(args))
        cuped_line = covariates.at_create(client, e, previous, enabled=not args.no_cuped)
    print(f"experiment {e.id}: {e.model} v{e.control_version} (control) vs v{e.treatment_version} "
          f"(treatment, {e.treatment_share:.0%}), {e.mode} by {e.unit}, primary {e.primary}, "
          f"label horizon {e.label_horizon_s:g} s; latency margin {e.margins.latency_text()}")
    print(cuped_line)
    return 0


def _feasibility(client: redis.Redis, store: ExperimentStore, model: str, design: dict[str, Any],
                 max_days: float) -> feasibility.Feasibility | None:
    """Print how long the design needs at the model's recent traffic; None when it cannot be told."""
    from experiments import feasibility  # scipy: the `experiments` extra

    # The same validation and messages as `create` itself, before anything is estimated from the design.
    fields = Experiment("estimate", model, 1, 2, **design).to_hash()
    e = Experiment.from_hash({str(k): str(v) for k, v in fields.items()})
    previous = store.get(model)
    if previous is not None and previous.status != "stopped":
        return None  # create refuses: one experiment at a time
    traffic = feasibility.recent_traffic(client, model, previous)
    if traffic is None:
        print("feasibility: no recent traffic to estimate from (the model served nothing lately)")
        return None
    hit_rate, pnl_variance = feasibility.recent_hit_rate(client, model) or (math.nan, math.nan)
    check = feasibility.for_design(e, traffic, horizon_s=max_days * feasibility.TRADING_DAY_S,
                                   hit_rate=hit_rate, pnl_variance=pnl_variance)
    print(check.line() if check else "feasibility: no P&L outcomes yet to estimate a P&L design from")
    return check


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from experiments import analysis, runner  # scipy: the `experiments` extra

    with _store(settings) as (client, _, store):
        e = store.get(args.model)
        if e is None:
            print(f"{args.model}: no experiment")
            return 1
        data = runner.snapshot(client, e)
        standing = analysis.standing_decision(runner.decisions(client, e))
    print("\n".join(status_lines(e, data, standing)))
    return 0


# (header, width) of the arms table; a value is right-aligned under its header
_ARM_COLUMNS = (("exposures", 9), ("errors", 6), ("outcomes due", 12), ("on time", 7), ("missing", 7),
                ("received", 8), ("hit rate", 8), ("latency samples", 15))


def status_lines(e: Experiment, data: runner.Snapshot, standing: dict | None = None) -> list[str]:
    """What ``experiment status`` prints: the design, each arm's numbers, the decision that stands (from
    the audit trail), the arrival check, what was left out."""
    as_of = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(data.now_s)) if math.isfinite(data.now_s) \
        else "?"
    lines = [f"experiment {e.id} [{e.status}] {_arms_text(e)}; label horizon {e.label_horizon_s:g} s; "
             f"latency margin {e.margins.latency_text()}; as of {as_of} (Redis clock)",
             _row("arm", "version", [name for name, _ in _ARM_COLUMNS])]
    for arm, version, d in ((CONTROL, e.control_version, data.control),
                            (TREATMENT, e.treatment_version, data.treatment)):
        values = (d.exposures, d.errors, d.due, d.on_time, _share(d.missing_share), d.received,
                  "-" if math.isnan(d.hit_rate) else f"{d.hit_rate:.4f}", len(d.latencies_ms))
        lines.append(_row(arm, f"v{version}", values))
    lines.append("  " + _standing_text(standing))
    arrival = arrival_text(data.arrival, decided=standing is not None) if data.arrival else "arrival check: -"
    lines.append("  " + arrival)
    if data.variance_reduction:
        lines.append("  " + data.variance_reduction)
    left_out = _left_out(data)
    if left_out:
        lines.append(f"  left out: {left_out}")
    return lines


def _row(arm: str, version: str, values: Sequence[object]) -> str:
    cells = (f"{v:>{width}}" for v, (_, width) in zip(values, _ARM_COLUMNS, strict=True))
    return f"  {arm:<10} {version:>7}  " + "  ".join(cells)


def _arms_text(e: Experiment) -> str:
    if e.mode == "shadow":
        return f"shadow: control v{e.control_version} answers every request, " \
               f"treatment v{e.treatment_version} scores each beside it"
    return f"split by {e.unit}: control v{e.control_version} {1 - e.treatment_share:.0%}, " \
           f"treatment v{e.treatment_version} {e.treatment_share:.0%}"


def _share(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2%}"


def _standing_text(standing: dict | None) -> str:
    """The standing decision in one line (records are untrusted: text bounded, number checked)."""
    if standing is None:
        return "decision: none yet (every analysis so far said CONTINUE)"
    info = standing.get("info_fraction")
    share = f", {info:.0%} of the planned information" if isinstance(info, int | float) and \
        not isinstance(info, bool) and math.isfinite(info) else ""
    reason = "".join(c for c in str(standing.get("reason", ""))[:300] if c.isprintable())
    decision, look = str(standing.get("decision"))[:20], str(standing.get("look"))[:20]
    return f"decision: {decision} stands since look {look}{share}: {reason}"


def arrival_text(check: runner.ArrivalCheck, *, decided: bool = False) -> str:
    """The arrival check in one line: OK or HALT now, and the treatment's on-time shares that would HALT.

    Once a decision stands the next analysis repeats it (only shown harm turns it into ROLLBACK), so
    the check says what it shows without promising a HALT.
    """
    if not check.applies:
        return "arrival check: not applied in shadow mode (both arms are judged on the same outcomes)"
    rates = f"control {_share(check.control_rate)}, treatment {_share(check.treatment_rate)} on time"
    if check.halts and decided:
        return f"arrival check: fails ({rates}; intervals {check.gap_pp:.2f} pp apart, above " \
               f"{check.tolerance_pp:g} pp), but a decision already stands: the next analysis repeats it"
    if check.halts:
        return f"arrival check: will HALT at the next analysis: {rates}; their always-valid intervals are " \
               f"{check.gap_pp:.2f} pp apart (HALT above {check.tolerance_pp:g} pp)"
    if decided:
        return f"arrival check: OK ({rates})"
    bounds = [f"below {_share(check.halt_below)}" if check.halt_below is not None else "",
              f"above {_share(check.halt_above)}" if check.halt_above is not None else ""]
    if not any(bounds):
        return f"arrival check: OK ({rates}); too few outcomes due for it to HALT yet"
    return f"arrival check: OK ({rates}); will HALT at the next analysis if the treatment's share stays " \
           f"{' or '.join(b for b in bounds if b)} (the arms' always-valid intervals more than " \
           f"{check.tolerance_pp:g} pp apart)"


def _left_out(data: runner.Snapshot) -> str:
    read = data.read
    parts = [(data.outcomes_malformed, "malformed outcomes"),
             (data.outcomes_duplicate, "repeated outcomes (the first per request counts)"),
             (read.outcomes_unmatched, "outcomes of requests not in the journal (unknown ids, or trimmed "
                                       "from the capped journal)"),
             (read.journal_duplicate, "requests journaled twice (the first counts)"),
             (data.records_malformed, "malformed records")]
    return ", ".join(f"{n} {what}" for n, what in parts if n)


def _analyze(args: argparse.Namespace, settings: Settings) -> int:
    from experiments import runner  # scipy: the `experiments` extra

    with _store(settings) as (client, registry, _):
        d = runner.run_analysis(client, registry, args.model, apply=args.apply)
    print(f"look {d.look}: {d.decision} — {d.reason}")
    for t in d.tests:
        print("  " + _test_line(t))
    return 0


# What a test line says instead of a number when its metric has no data (never "+nan [-inf, +inf]").
_NOT_MEASURED = {"pnl": "no P&L reported", "hit_rate": "no outcome judged right or wrong yet",
                 "latency_p95": "no latency minute yet"}


def _test_line(t: dict) -> str:
    """``role metric estimate [interval] units  threshold …  (test)``; a boundary test shows its z, a
    metric without data says so."""
    metric = t.get("metric") or "-"
    value, low, high = (_num(t.get(k)) for k in ("estimate", "ci_low", "ci_high"))
    if math.isnan(value) and t.get("role") == "boundary":
        value = _num(t.get("statistic"))
    if math.isfinite(value):
        finite = [b for b in (low, high) if math.isfinite(b)]
        interval = f" [{low:+.4g}, {high:+.4g}]" if finite else ""
        p_value = _num(t.get("p_value"))
        p_text = f"  p {p_value:.3g}" if math.isfinite(p_value) else ""
        measured = f"{value:+.4g}{interval} {t.get('units', '')}{p_text}"
    else:
        measured = _NOT_MEASURED.get(metric, "not measured yet")
    threshold = _num(t.get("threshold")) + 0.0  # a margin of 0 reads +0, not -0
    return f"{t.get('role') or '-':<9} {metric:<11} {measured}  threshold {threshold:+.4g}  " \
           f"({t.get('test', '')})"


def _list(args: argparse.Namespace, settings: Settings) -> int:
    with _store(settings) as (_, _, store):
        for e in store.list():
            print(f"{e.model:<24} {e.id} [{e.status}] {e.mode} v{e.control_version} vs "
                  f"v{e.treatment_version} ({e.treatment_share:.0%}) {e.stopped_reason}")
    return 0


def _watch(args: argparse.Namespace, settings: Settings) -> int:
    """Guardrails are always valid, so analyzing this often costs no error rate."""
    from experiments import runner  # scipy: the `experiments` extra

    readers: dict[str, runner.Reader] = {}  # each analysis reads only what was written since the last
    with _store(settings) as (client, registry, store):
        while True:
            e = store.get(args.model)
            if e is None or e.status != "running":
                print(f"{args.model}: no running experiment")
                return 0
            d = runner.run_analysis(client, registry, args.model, apply=args.apply, readers=readers)
            print(f"{time.strftime('%H:%M:%S')} look {d.look}: {d.decision} — {d.reason}", flush=True)
            if d.decision != "CONTINUE":
                return 0
            time.sleep(args.interval_s)


def _pause(args: argparse.Namespace, settings: Settings) -> int:
    with _store(settings) as (_, _, store):
        e = store.set_status(args.model, "paused")
    print(f"experiment {e.id} paused")
    return 0


def _resume(args: argparse.Namespace, settings: Settings) -> int:
    with _store(settings) as (_, _, store):
        e = store.set_status(args.model, "running")
    print(f"experiment {e.id} running")
    return 0


def _stop(args: argparse.Namespace, settings: Settings) -> int:
    with _store(settings) as (_, _, store):
        e = store.set_status(args.model, "stopped", reason=args.reason)
    print(f"experiment {e.id} stopped: {e.stopped_reason}")
    return 0


def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    """Offline, no Redis: the decision at every analysis of a table."""
    from experiments import simulate  # scipy, pyarrow: the `experiments` extra

    try:
        obs = simulate.read_table(args.table)
        e = simulate.experiment_for(obs, **_design(args))
        decisions = simulate.simulate(e, obs, args.every_s,
                                      continue_after_decision=args.continue_after_decision)
        records = [d.to_dict() for d in decisions]
    except (OSError, ValueError) as err:
        print(f"streamserve experiment simulate: {err}", file=sys.stderr)
        return 2
    if args.json:
        for record in records:
            print(json.dumps(_finite(record), allow_nan=False))
    else:
        print(_describe(e, obs, args.every_s))
        print_decisions(records, e.created_at)
    if args.png:
        plot_decisions(records, args.png, start_s=e.created_at, treatment_share=e.treatment_share)
        print(f"wrote {args.png}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _describe(e: Experiment, obs: Observations, every_s: float) -> str:
    effect = f"{e.min_effect_pnl:g} P&L per trade" if e.primary == "pnl" else f"{e.min_effect_pp:g} pp"
    return (f"{len(obs):,} exposures, {len(np.unique(obs.unit)):,} units over "
            f"{(obs.t_s[-1] - obs.start_s) / 60:,.1f} min; {e.mode} {1 - e.treatment_share:.0%}/"
            f"{e.treatment_share:.0%} by {e.unit}, primary {e.primary} (powered for {effect}), "
            f"{e.planned_looks} looks, label horizon {e.label_horizon_s:g} s; "
            f"an analysis every {every_s:g} s\n{_table_feasibility(e, obs)}")


def _table_feasibility(e: Experiment, obs: Observations) -> str:
    """How long the design needs at the table's traffic, in one line."""
    from experiments import feasibility  # scipy: the `experiments` extra

    if e.primary == "hit_rate" and bool(np.isnan(obs.correct).all()):
        return "warning: no row says whether its prediction was right (no `correct` values): a hit-rate " \
               "design can never decide on this table (add the column, or use --primary pnl)"
    check = feasibility.for_table(e, obs)
    return check.line() if check else "feasibility: no P&L in the table to estimate a P&L design from"


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as null, so every line is strict JSON (``jq`` reads it)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _report(args: argparse.Namespace, settings: Settings) -> int:
    return main_report(settings, args.model, args.png)


def main_report(settings: Settings, model: str, png: Path) -> int:
    """Print every analysis of the model's experiment and plot each metric over time."""
    from experiments import runner  # scipy: the `experiments` extra

    with _store(settings) as (client, registry, store):
        e = store.get(model)
        records = runner.decisions(client, e) if e else []
        # The versions with their labels: "v3 (1.1.0) vs v4 (1.2.0)".
        arms = [registry.title(model, v) for v in (e.control_version, e.treatment_version)] if e else []
    if e is None or not records:
        print(f"{model}: no analyses yet")
        return 1
    print(f"experiment {e.id}: {e.model} {arms[0]} vs {arms[1]}, primary {e.primary}, "
          f"{len(records)} analyses")
    print_decisions(records, e.created_at)
    plot_decisions(records, png, start_s=e.created_at, treatment_share=e.treatment_share)
    print(f"wrote {png}")
    print(json.dumps({"experiment": e.id, "analyses": len(records)}))
    return 0


# ---- the table ---------------------------------------------------------------------------
