"""``streamserve experiment create | status | analyze | stop | report``."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from experiments.store import ExperimentStore, Margins
from protocol.settings import Settings
from registry import Registry


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``experiment`` command group."""
    parser = subparsers.add_parser("experiment", help="A/B and shadow tests between versions")
    sub = parser.add_subparsers(dest="experiment_command", required=True)
    p = sub.add_parser("create", help="start an experiment (one per model)")
    p.add_argument("model")
    p.add_argument("--control", type=int, required=True, help="champion version")
    p.add_argument("--treatment", type=int, required=True, help="challenger version")
    p.add_argument("--share", type=float, default=0.10, help="treatment's share of units")
    p.add_argument("--mode", choices=["split", "shadow"], default="split")
    p.add_argument("--unit", choices=["route", "request_id"], default="route")
    p.add_argument("--salt")
    p.add_argument("--looks", type=int, default=40)
    p.add_argument("--min-effect-pp", type=float, default=2.0)
    p.add_argument("--margin-latency-ms", type=float, default=2.0)
    p.add_argument("--margin-error-ratio", type=float, default=1.5)
    p.add_argument("--margin-accuracy-pp", type=float, default=5.0)
    p.set_defaults(func=_create)
    p = sub.add_parser("list", help="every model's current or last experiment")
    p.set_defaults(func=_list)
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
    with redis.Redis.from_url(settings.redis_url) as client:
        registry = Registry(client, settings.artifact_dir, control_secret=settings.control_secret)
        yield client, registry, ExperimentStore(client, registry)


def _create(args: argparse.Namespace, settings: Settings) -> int:
    margins = Margins(args.margin_latency_ms, args.margin_error_ratio, args.margin_accuracy_pp)
    with _store(settings) as (_, _, store):
        e = store.create(args.model, args.control, args.treatment, treatment_share=args.share,
                         mode=args.mode, unit=args.unit, salt=args.salt, planned_looks=args.looks,
                         min_effect_pp=args.min_effect_pp, margins=margins)
    print(f"experiment {e.id}: {e.model} v{e.control_version} (control) vs v{e.treatment_version} "
          f"(treatment, {e.treatment_share:.0%}), {e.mode} by {e.unit}")
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from experiments import runner  # scipy: the `experiments` extra

    with _store(settings) as (client, _, store):
        e = store.get(args.model)
        if e is None:
            print(f"{args.model}: no experiment")
            return 1
        data = runner.snapshot(client, e)
    print(f"experiment {e.id} [{e.status}] {e.mode}, v{e.control_version} vs v{e.treatment_version}")
    for arm, d in (("control", data.control), ("treatment", data.treatment)):
        print(f"  {arm:<10} exposures {d.exposures:>7}  errors {d.errors:>5}  outcomes {d.outcomes:>6}  "
              f"hit rate {d.hit_rate:.4f}  latency samples {len(d.latencies_ms)}")
    if data.outcomes_malformed or data.outcomes_duplicate or data.records_malformed:
        print(f"  left out: {data.outcomes_malformed} malformed outcomes, {data.outcomes_duplicate} repeated "
              f"outcomes (the first per request counts), {data.records_malformed} malformed records")
    return 0


def _analyze(args: argparse.Namespace, settings: Settings) -> int:
    from experiments import runner  # scipy: the `experiments` extra

    with _store(settings) as (client, registry, _):
        d = runner.run_analysis(client, registry, args.model, apply=args.apply)
    print(f"look {d.look}: {d.decision} — {d.reason}")
    for t in d.tests:
        print(f"  {t['test']:<28} stat {t['statistic']:.4g}  p {t['p_value']:.3g}  "
              f"estimate {t['estimate']:.4g}  [{t['ci_low']:.4g}, {t['ci_high']:.4g}]")
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    with _store(settings) as (_, _, store):
        for e in store.list():
            print(f"{e.model:<24} {e.id} [{e.status}] {e.mode} v{e.control_version} vs "
                  f"v{e.treatment_version} ({e.treatment_share:.0%}) {e.stopped_reason}")
    return 0


def _watch(args: argparse.Namespace, settings: Settings) -> int:
    """Guardrails are always valid, so analyzing this often costs no error rate."""
    from experiments import runner  # scipy: the `experiments` extra

    with _store(settings) as (client, registry, store):
        while True:
            e = store.get(args.model)
            if e is None or e.status != "running":
                print(f"{args.model}: no running experiment")
                return 0
            d = runner.run_analysis(client, registry, args.model, apply=args.apply)
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


def _report(args: argparse.Namespace, settings: Settings) -> int:
    return main_report(settings, args.model, args.png)


def main_report(settings: Settings, model: str, png: Path) -> int:
    """Print every analysis of the model's experiment and plot each metric's effect over the looks."""
    from experiments import runner  # scipy: the `experiments` extra

    with _store(settings) as (client, _, store):
        e = store.get(model)
        records = runner.decisions(client, e) if e else []
    if e is None or not records:
        print(f"{model}: no analyses yet")
        return 1
    for r in records:
        primary = next((t for t in r["tests"] if t["test"].startswith("two-proportion")), None)
        effect = f"{primary['estimate'] * 100:+.2f} pp [{primary['ci_low'] * 100:+.2f}, " \
                 f"{primary['ci_high'] * 100:+.2f}]" if primary else "-"
        print(f"look {r['look']:>2}  {r['decision']:<9} hit-rate effect {effect:<28} {r['reason']}")
    _plot(records, png)
    print(f"wrote {png}")
    print(json.dumps({"experiment": e.id, "analyses": len(records)}))
    return 0


def _plot(records: list[dict], path: Path) -> None:
    """Each metric's effect and interval at each analysis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({t["test"] for r in records for t in r["tests"] if t["estimate"] == t["estimate"]})
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.4 * max(len(names), 1)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        points = [(i + 1, t) for i, r in enumerate(records) for t in r["tests"] if t["test"] == name]
        xs = [x for x, _ in points]
        mid = [t["estimate"] for _, t in points]
        low = [t["estimate"] - t["ci_low"] if t["ci_low"] == t["ci_low"] else 0 for _, t in points]
        high = [t["ci_high"] - t["estimate"] if t["ci_high"] == t["ci_high"] else 0 for _, t in points]
        ax.errorbar(xs, mid, yerr=[low, high], marker="o", capsize=4)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_title(f"{name}: effect (treatment − control) and interval")
        ax.set_xticks(xs, [f"#{x} (look {records[x - 1]['look']})" for x in xs])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
