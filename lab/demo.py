"""``streamserve demo``: the whole story on one machine, with an embedded Redis."""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from experiments import runner
from experiments.cli import main_report
from experiments.store import Experiment, ExperimentStore
from lab.embedded_redis import EmbeddedRedis
from lab.fleet import Fleet
from lab.loadgen import LoadSpec, run_load
from modeltools.train import train_and_register
from producer import Client
from protocol import keys
from protocol.settings import Settings
from registry import Registry
from registry.rollout import wait_for_fleet

LABEL_HORIZON_S = 1.0  # the bots report each outcome at once; a short horizon keeps the demo short


def main(args: argparse.Namespace, settings: Settings) -> int:
    """The whole story (``streamserve demo``)."""
    console = Console()
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory() as tmp:
        console.rule(f"[bold]1. Redis-compatible server {server.binary.name} on {server.url}")
        s = settings.with_overrides(redis_url=server.url, artifact_dir=Path(tmp) / "artifacts")
        console.rule("[bold]2. Train HybridCNNLSTM: v1 to Production, a retrained v2 to Staging")
        _train(s, args.epochs, seed=0, stage="Production")
        _train(s, args.epochs, seed=1, stage="Staging")
        console.rule(f"[bold]3. Start {args.processes} worker processes")
        fleet = Fleet(s, settings.model, args.processes).start(log_path=str(Path(tmp) / "workers.log"))
        with Client.from_url(s.redis_url) as client:
            health = client.health(settings.model)
        for w in health.workers:
            console.print(f"worker {w.worker_id} (pid {w.pid}) serving v{w.version} on {w.backend}")
        console.rule(f"[bold]4. {args.bots} bots (1% malformed on purpose); v2 promoted mid-load")
        promotion = threading.Event()
        promoter = threading.Thread(target=_promote_when, args=(s, promotion, console))
        promoter.start()
        result = _load(s, args, console, promotion)
        promoter.join()
        with redis.Redis.from_url(server.url) as client:
            histogram = client.hgetall(keys.batch_histogram(settings.model))
        _summary(console, result, {int(k): int(v) for k, v in histogram.items()})
        console.rule("[bold]5. A 90/10 experiment: champion v2 vs challenger v1, bots report outcomes")
        exp_result = _experiment(s, args, console)
        console.rule("[bold]6. Stop the workers (SIGTERM: finish the batch, ack, exit)")
        code = fleet.stop()
        console.print(f"worker fleet exited with {code}")
    failures = set(result.errors) | set(exp_result.errors)
    return 0 if code == 0 and not failures - {"INVALID_INPUT"} else 1


def _experiment(settings: Settings, args: argparse.Namespace, console):
    """Run an experiment under bot load with outcomes, analyze it, write the report and plot."""
    with redis.Redis.from_url(settings.redis_url) as client:
        registry = Registry(client, settings.artifact_dir, control_secret=settings.control_secret)
        e = ExperimentStore(client, registry).create(settings.model, 2, 1, treatment_share=0.10,
                                                     unit="request_id", label_horizon_s=LABEL_HORIZON_S)
        console.print(f"experiment {e.id}: v{e.control_version} (control, 90%) vs "
                      f"v{e.treatment_version} (treatment, 10%), split by request id; an outcome is due "
                      f"{e.label_horizon_s:g} s after its request")
        time.sleep(1.0)  # workers pick the experiment up from the control channel and load v1 beside v2
        spec = LoadSpec(settings.redis_url, settings.model, requests=args.requests, concurrency=4,
                        batch_every=5, batch_size=8, report_outcomes=True)
        result = run_load(spec, args.bots)
        console.print(f"answered by arm: {dict(result.variants)}; errors: {dict(result.errors) or 'none'}")
        _wait_until_matured(client, e)
        decision = runner.run_analysis(client, registry, settings.model)
        control_n, treatment_n = decision.exposures
        planned = decision.planned
        console.print(f"analysis: {control_n} control and {treatment_n} treatment exposures; for a "
                      f"{e.min_effect_pp:g} pp effect the design plans {planned.get('control', '?')} control "
                      f"and {planned.get('treatment', '?')} treatment outcomes, so a demo-sized run is "
                      "expected to CONTINUE (`experiment watch` keeps analysing)")
        console.print(f"decision: [bold]{decision.decision}[/bold] — {decision.reason}")
    report_png = Path(args.report_dir) / "experiment-report.png"
    report_png.parent.mkdir(parents=True, exist_ok=True)
    main_report(settings, settings.model, report_png)
    return result


def _wait_until_matured(client: redis.Redis, e: Experiment) -> None:
    """Poll until every journaled request's outcome is due, so the analysis counts them all."""
    due_s = runner.outcomes_due_s(client, e)
    while runner.redis_now_s(client) < due_s:
        time.sleep(0.05)


def _train(settings: Settings, epochs: int, *, seed: int, stage: str) -> None:
    with Progress(transient=True) as bar:
        task = bar.add_task(f"training HybridCNNLSTM (seed {seed})", total=epochs)
        train_and_register(settings, settings.model, epochs=epochs, seed=seed, stage=stage,
                           progress=lambda done, total: bar.update(task, completed=done))


def _promote_when(settings: Settings, go: threading.Event, console) -> None:
    """Promote v2 once the load is under way and show the fleet switching."""
    go.wait()
    with redis.Redis.from_url(settings.redis_url) as client:
        registry = Registry(client, settings.artifact_dir, control_secret=settings.control_secret)
        registry.promote(settings.model, 2, reason="demo: retrained model")
        report = wait_for_fleet(client, settings.model, 2, timeout_s=60)
    state = "switched" if report.ok else "did NOT switch"
    console.print(f"promoted v2: fleet {state} in {report.elapsed_s:.2f} s "
                  f"({len(report.switched)} workers; failed: {report.failed or 'none'})")


def _load(settings: Settings, args: argparse.Namespace, console, promotion: threading.Event):
    spec = LoadSpec(settings.redis_url, settings.model, requests=args.requests, concurrency=4,
                    batch_every=5, batch_size=8, bad_every=100)
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        total = spec.requests * args.bots

        def advance(n: int) -> None:
            bar.advance(task, n)
            if bar.tasks[0].completed >= total * 0.4:
                promotion.set()

        task = bar.add_task("predictions", total=total)
        result = run_load(spec, args.bots, on_progress=advance)
    promotion.set()  # never leave the promoter waiting
    return result


def _summary(console, result, histogram: dict[int, int]) -> None:
    table = Table(title="demo summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("predictions", f"{result.requests}")
    table.add_row("answered ok", f"{len(result.latencies_ms)}")
    for code, n in sorted(result.errors.items()):
        table.add_row(f"errors {code}", f"{n}")
    table.add_row("latency p50 / p99 (ms, per call)",
                  f"{result.percentile(50):.2f} / {result.percentile(99):.2f}")
    table.add_row("throughput (predictions/s)", f"{result.requests / result.elapsed_s:.0f}")
    table.add_row("versions that answered", ", ".join(f"v{v}: {n}" for v, n in result.versions.items()))
    console.print(table)
    hist = Table(title="batch sizes (rows per model call)")
    hist.add_column("rows", justify="right")
    hist.add_column("batches", justify="right")
    for low, high in ((1, 1), (2, 4), (5, 8), (9, 16), (17, 32), (33, 10**9)):
        n = sum(c for size, c in histogram.items() if low <= size <= high)
        hist.add_row(f"{low}" if low == high else f"{low}-{high if high < 10**9 else ''}", f"{n}")
    console.print(hist)
