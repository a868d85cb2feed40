"""``streamserve demo``: the whole story on one machine, with an embedded Redis."""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from protocol import keys
from protocol.settings import Settings

MODEL = "hybrid_cnn_lstm"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``demo``."""
    p = subparsers.add_parser("demo", help="embedded Redis, train + register, 2 workers, bot load, summary")
    p.add_argument("--processes", type=int, default=2, help="worker processes")
    p.add_argument("--bots", type=int, default=4, help="bot (producer) processes")
    p.add_argument("--requests", type=int, default=1500, help="predictions per bot")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--report-dir", default="var/demo", help="where the experiment plot is written")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    import redis
    from rich.console import Console

    from producer import Client
    from worker.embedded_redis import EmbeddedRedis
    from worker.fleet import Fleet

    console = Console()
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory() as tmp:
        console.rule(f"[bold]1. Redis-compatible server {server.binary.name} on {server.url}")
        s = settings.with_overrides(redis_url=server.url, artifact_dir=Path(tmp) / "artifacts")
        console.rule("[bold]2. Train HybridCNNLSTM: v1 to Production, a retrained v2 to Staging")
        _train(s, args.epochs, seed=0, stage="Production")
        _train(s, args.epochs, seed=1, stage="Staging")
        console.rule(f"[bold]3. Start {args.processes} worker processes")
        fleet = Fleet(s, MODEL, args.processes).start(log_path=str(Path(tmp) / "workers.log"))
        with Client.from_url(s.redis_url) as client:
            health = client.health(MODEL)
        for w in health.workers:
            console.print(f"worker {w.worker_id} (pid {w.pid}) serving v{w.version} on {w.backend}")
        console.rule(f"[bold]4. {args.bots} bots (1% malformed on purpose); v2 promoted mid-load")
        promotion = threading.Event()
        promoter = threading.Thread(target=_promote_when, args=(s, promotion, console))
        promoter.start()
        result = _load(s, args, console, promotion)
        promoter.join()
        with redis.Redis.from_url(server.url) as client:
            histogram = client.hgetall(keys.batch_histogram(MODEL))
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
    import redis

    from experiments import runner
    from experiments.cli import main_report
    from experiments.store import ExperimentStore
    from registry import Registry
    from worker.loadgen import LoadSpec, run_load

    with redis.Redis.from_url(settings.redis_url) as client:
        registry = Registry(client, settings.artifact_dir)
        e = ExperimentStore(client, registry).create(MODEL, 2, 1, treatment_share=0.10, unit="request_id")
        console.print(f"experiment {e.id}: v{e.control_version} (control, 90%) vs "
                      f"v{e.treatment_version} (treatment, 10%), split by request id")
        time.sleep(1.0)  # workers pick the experiment up from the control channel and load v1 beside v2
        spec = LoadSpec(settings.redis_url, MODEL, requests=args.requests, concurrency=4, batch_every=5,
                        batch_size=8, report_outcomes=True)
        result = run_load(spec, args.bots)
        console.print(f"answered by arm: {dict(result.variants)}; errors: {dict(result.errors) or 'none'}")
        decision = runner.run_analysis(client, registry, MODEL)
        console.print(f"analysis at look {decision.look}: [bold]{decision.decision}[/bold] "
                      f"— {decision.reason}")
    report_png = Path(args.report_dir) / "experiment-report.png"
    report_png.parent.mkdir(parents=True, exist_ok=True)
    main_report(settings, MODEL, report_png)
    return result


def _train(settings: Settings, epochs: int, *, seed: int, stage: str) -> None:
    from worker.cli import main

    code = main(["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir),
                 "train", "--epochs", str(epochs), "--seed", str(seed), "--stage", stage])
    if code:
        raise SystemExit(code)


def _promote_when(settings: Settings, go: threading.Event, console) -> None:
    """Promote v2 once the load is under way and show the fleet switching."""
    import redis

    from registry import Registry
    from worker.control import wait_for_fleet

    go.wait()
    with redis.Redis.from_url(settings.redis_url) as client:
        registry = Registry(client, settings.artifact_dir)
        registry.promote(MODEL, 2, reason="demo: retrained model")
        report = wait_for_fleet(client, MODEL, 2, timeout_s=60)
    state = "switched" if report.ok else "did NOT switch"
    console.print(f"promoted v2: fleet {state} in {report.elapsed_s:.2f} s "
                  f"({len(report.switched)} workers; failed: {report.failed or 'none'})")


def _load(settings: Settings, args: argparse.Namespace, console, promotion: threading.Event):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from worker.loadgen import LoadSpec, run_load

    spec = LoadSpec(settings.redis_url, MODEL, requests=args.requests, concurrency=4,
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
    from rich.table import Table

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
