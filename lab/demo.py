"""``streamserve demo``: the whole story on one machine, with an embedded Redis.

Sized to finish in a few minutes on two busy cores (``--full``: the full-size training and load).
Every phase prints its duration and the demo ends with the total; progress bars are drawn only
on a terminal, so ``make demo > log`` gets one plain line per phase instead.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import redis
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from lab.embedded_redis import EmbeddedRedis
from lab.fleet import Fleet
from lab.loadgen import LoadResult, LoadSpec, run_load
from modeltools.synthetic import synthetic_dataset
from producer import Client, ReplyError
from protocol import keys
from protocol.errors import StreamserveError
from protocol.settings import Settings
from registry import Registry
from registry.rollout import wait_for_fleet

LABEL_HORIZON_S = 1.0  # the bots report each outcome at once; a short horizon keeps the demo short
# The fleet's second model: a small MLP on (30, 16) windows (lab.mm_models), loaded on its first request.
SECOND_MODEL = "fx_eurusd"
TWO_MODEL_REQUESTS = 150  # per model in the two-model phase: a second or two, interleaved
LOOKS_DURING_LOAD = (1 / 3, 2 / 3)  # analyses while the experiment's load runs; one more after it


@dataclass(frozen=True)
class Size:
    """How much the demo trains and sends."""

    n_train: int
    n_test: int
    epochs: int
    threads: int  # torch's threads while training
    bots: int  # bot processes
    requests: int  # predictions per bot, in each of the two load phases


# One torch thread: on two cores that other work keeps busy, a second thread mostly waits at
# every parallel region's barrier for the core it did not get (measured: 1024 samples, 2 epochs,
# one thread 3.6 s each time, two threads 2.4 s to 13.5 s), and eight took ten times as long.
QUICK = Size(n_train=1024, n_test=1000, epochs=2, threads=1, bots=2, requests=1500)
FULL = Size(n_train=6000, n_test=2000, epochs=4, threads=2, bots=4, requests=1500)


def size_of(args: argparse.Namespace) -> Size:
    """``--full`` or the quick size, with any size flag given on the command line on top."""
    base = FULL if args.full else QUICK
    given = {name: getattr(args, name) for name in Size.__dataclass_fields__ if getattr(args, name, None)}
    return replace(base, **given)


class Timeline:
    """Numbered phases, each closed by a line with its duration; bars and spinners only on a terminal."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.started_s = time.perf_counter()
        self.durations_s: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str, title: str) -> Iterator[None]:
        """Announce phase ``title``; when it ends, print how long ``name`` took."""
        number = len(self.durations_s) + 1
        self.console.rule(f"[bold]{number}. {title}")
        started_s = time.perf_counter()
        yield
        self.durations_s[name] = time.perf_counter() - started_s
        self.console.print(f"[dim]phase {number} ({name}) done in {self.durations_s[name]:.1f} s")

    def bar(self) -> Progress:
        """A progress bar that draws only on a terminal."""
        return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=self.console, disable=not self.console.is_terminal)

    def spinner(self, what: str) -> contextlib.AbstractContextManager[Any]:
        """A spinner with elapsed time while something without steps runs (nothing when piped)."""
        if not self.console.is_terminal:
            return contextlib.nullcontext()
        bar = Progress(SpinnerColumn(), TextColumn(what), TimeElapsedColumn(), console=self.console,
                       transient=True)
        bar.add_task(what, total=None)
        return bar

    def finish(self) -> float:
        """Print the total and each phase's share of it; return the total in seconds."""
        total_s = time.perf_counter() - self.started_s
        phases = ", ".join(f"{name} {s:.1f} s" for name, s in self.durations_s.items())
        self.console.rule()
        self.console.print(f"[bold]demo total: {total_s:.1f} s[/bold] ({phases})", soft_wrap=True)
        return total_s


def main(args: argparse.Namespace, settings: Settings) -> int:
    """The whole story (``streamserve demo``)."""
    console = Console()
    size = size_of(args)
    timeline = Timeline(console)
    with contextlib.ExitStack() as stack:
        with timeline.phase("redis", "Start an embedded Redis-compatible server"):
            server = stack.enter_context(EmbeddedRedis())
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            console.print(f"{server.binary.name} on {server.url}")
        s = settings.with_overrides(redis_url=server.url, artifact_dir=tmp / "artifacts")
        _train(timeline, s, size, seed=0, stage="Production")
        _train(timeline, s, size, seed=1, stage="Staging")
        n = args.processes
        models = [s.model, SECOND_MODEL]
        title = f"Start {n} worker processes serving two models (1 ONNX Runtime thread each)"
        with timeline.phase("workers", title):
            _register_second_model(console, s, tmp / "mlp")
            with timeline.spinner(f"starting {n} workers: load v1 (pinned), check its golden outputs"):
                fleet = Fleet(s, s.model, n, "--intra-op-threads", "1", "--pin", s.model, models=models)
                fleet.start(log_path=str(tmp / "workers.log"))
                stack.callback(fleet.stop)  # whatever fails later, no worker outlives the demo
                _wait_loaded(s, s.model, n)
            _show_workers(console, s, models)
        result = _promotion_under_load(timeline, s, size)
        tallies = _two_models(timeline, s, models)
        exp_result = _experiment(timeline, s, size, Path(args.report_dir))
        with timeline.phase("shutdown", "Stop the workers (SIGTERM: finish the batch, ack, exit)"):
            code = fleet.stop()
            console.print(f"worker fleet exited with {code}")
    timeline.finish()
    failures = set(result.errors) | set(exp_result.errors) | {c for t in tallies.values() for c in t.errors}
    return 0 if code == 0 and not failures - {"INVALID_INPUT"} else 1


def _train(timeline: Timeline, settings: Settings, size: Size, *, seed: int, stage: str) -> None:
    """Train one version and register it in ``stage`` (v1: Production, v2: Staging)."""
    version = seed + 1
    title = (f"Train HybridCNNLSTM v{version} → {stage} ({size.n_train} samples, {size.epochs} epochs, "
             f"{size.threads} thread{'s' if size.threads > 1 else ''})")
    with timeline.phase(f"train v{version}", title):
        with timeline.spinner("importing torch"):
            from modeltools.cli import TrainingBars
            from modeltools.train import train_and_register
        with TrainingBars(timeline.console, f"v{version}") as bars:
            train_and_register(settings, settings.model, epochs=size.epochs, n_train=size.n_train,
                               n_test=size.n_test, seed=seed, stage=stage, threads=size.threads,
                               progress=bars.step, status=bars.status)


def _register_second_model(console: Console, settings: Settings, directory: Path) -> None:
    """Fit, register and promote the fleet's second model (milliseconds: no torch, no download)."""
    from lab.mm_models import register_models

    with redis.Redis.from_url(settings.redis_url) as client:
        registry = Registry(client, settings.artifact_dir, control_secret=settings.control_secret)
        accuracy = register_models(registry, [SECOND_MODEL], directory)[SECOND_MODEL]
    console.print(f"registered {SECOND_MODEL} v1 → Production: a small MLP on (30, 16) windows "
                  f"(training accuracy {accuracy:.2f})")


def _wait_loaded(settings: Settings, model: str, processes: int, timeout_s: float = 60.0) -> None:
    """Wait until ``processes`` workers have ``model`` in memory (the pinned model loads at start)."""
    deadline = time.monotonic() + timeout_s
    with Client.from_url(settings.redis_url) as client:
        while len(client.health(model).loaded_workers) < processes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{model} not loaded by {processes} workers within {timeout_s:g} s")
            time.sleep(0.05)


def _show_workers(console: Console, settings: Settings, models: list[str]) -> None:
    with Client.from_url(settings.redis_url) as client:
        health = {model: client.health(model) for model in models}
    for model, h in health.items():
        for w in sorted(h.workers, key=lambda w: w.worker_id):
            state = f"v{w.version} on {w.backend}" if w.version is not None else "loads on its first request"
            pinned = ", pinned" if w.pinned else ""
            console.print(f"worker {w.worker_id} (pid {w.pid}) {model}: {w.cache}{pinned}, {state}",
                          soft_wrap=True)


def _promotion_under_load(timeline: Timeline, settings: Settings, size: Size) -> LoadResult:
    """Bots send (1 % malformed on purpose); v2 is promoted at 40 % and the fleet switches."""
    title = f"{size.bots} bots x {size.requests} predictions (1% malformed on purpose); v2 promoted mid-load"
    with timeline.phase("load + promotion", title):
        promotion = threading.Event()
        promoter = threading.Thread(target=_promote_when, args=(settings, promotion, timeline.console))
        promoter.start()
        try:
            spec = LoadSpec(settings.redis_url, settings.model, requests=size.requests, concurrency=4,
                            batch_every=5, batch_size=8, bad_every=100)
            result = _load(timeline, spec, size.bots, "predictions", {0.4: promotion.set})
        finally:
            promotion.set()  # never leave the promoter waiting
            promoter.join()
        with redis.Redis.from_url(settings.redis_url) as client:
            histogram = client.hgetall(keys.batch_histogram(settings.model))
        _summary(timeline.console, result, {int(k): int(v) for k, v in histogram.items()})
    return result


def _promote_when(settings: Settings, go: threading.Event, console: Console) -> None:
    """Promote v2 once the load is under way and show the fleet switching."""
    go.wait()
    with redis.Redis.from_url(settings.redis_url) as client:
        registry = Registry(client, settings.artifact_dir, control_secret=settings.control_secret)
        registry.promote(settings.model, 2, reason="demo: retrained model")
        report = wait_for_fleet(client, settings.model, 2, timeout_s=60)
    state = "switched" if report.ok else "did NOT switch"
    console.print(f"promoted v2: fleet {state} in {report.elapsed_s:.2f} s "
                  f"({len(report.switched)} workers; failed: {report.failed or 'none'})")


def _load(timeline: Timeline, spec: LoadSpec, bots: int, what: str, at: dict[float, Any]) -> LoadResult:
    """Run the bots with a bar; call ``at[f]()`` once when the share ``f`` of the predictions is answered."""
    total = spec.requests * bots
    pending = sorted(at.items())
    done = [0]

    def advance(n: int) -> None:
        bar.advance(task, n)
        done[0] += n
        while pending and done[0] >= total * pending[0][0]:
            pending.pop(0)[1]()

    with timeline.bar() as bar:
        task = bar.add_task(what, total=total)
        return run_load(spec, bots, on_progress=advance)


@dataclass
class Tally:
    """One model's requests in the two-model phase."""

    latencies_ms: list[float]
    errors: dict[str, int]
    versions: set[int]
    workers: set[str]

    def percentile(self, q: float) -> float:
        """Latency percentile of the answered requests, in ms (NaN when none was answered)."""
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def _two_models(timeline: Timeline, settings: Settings, models: list[str]) -> dict[str, Tally]:
    """Requests to both models at once, from one bot each; per-model counts and latency, and what
    the workers hold afterwards (the second model loaded on its first request)."""
    title = f"One fleet, two models: {TWO_MODEL_REQUESTS} requests each to {' and '.join(models)}, at once"
    with timeline.phase("two models", title):
        tallies = {model: Tally([], {}, set(), set()) for model in models}
        bots = [threading.Thread(target=_send, args=(settings, model, tallies[model])) for model in models]
        for bot in bots:
            bot.start()
        for bot in bots:
            bot.join()
        for model, t in tallies.items():
            versions = ", ".join(f"v{v}" for v in sorted(t.versions))
            timeline.console.print(
                f"served {model}: {len(t.latencies_ms)}/{TWO_MODEL_REQUESTS} ok, "
                f"p50 {t.percentile(50):.2f} ms, p99 {t.percentile(99):.2f} ms, {versions}, "
                f"by {len(t.workers)} workers; errors: {t.errors or 'none'}", soft_wrap=True)
        first_ms = tallies[SECOND_MODEL].latencies_ms[:1]
        if first_ms:
            timeline.console.print(f"{SECOND_MODEL}'s first request took {first_ms[0]:.1f} ms: it waited for "
                                   "the model to load in the worker that read it (each worker process reads "
                                   "every model's stream, so each loads it on the first request it reads)",
                                   soft_wrap=True)
        _show_workers(timeline.console, settings, models)
    return tallies


def _send(settings: Settings, model: str, tally: Tally) -> None:
    """One bot: ``TWO_MODEL_REQUESTS`` predictions to ``model``, one at a time, outside any experiment."""
    if model == SECOND_MODEL:
        from lab.mm_models import synthetic_data

        windows = synthetic_data(seed=7, n=64)[0]
    else:
        windows = synthetic_dataset(64, seed=7)[0]
    with Client.from_url(settings.redis_url, timeout_s=5.0) as client:
        for i in range(TWO_MODEL_REQUESTS):
            started = time.perf_counter()
            try:
                p = client.predict(model, windows[i % len(windows)], route=f"r{i % 3}", experiment=False)
            except StreamserveError as e:  # a reply's code, or Unavailable: counted, never fatal here
                code = e.code if isinstance(e, ReplyError) else type(e).__name__
                tally.errors[code] = tally.errors.get(code, 0) + 1
                continue
            tally.latencies_ms.append((time.perf_counter() - started) * 1000)
            tally.versions.add(p.model_version)
            tally.workers.add(p.worker)


def _experiment(timeline: Timeline, settings: Settings, size: Size, report_dir: Path) -> LoadResult:
    """An experiment under bot load with outcomes, analysed during and after it, its report and plot."""
    title = "A 90/10 experiment: champion v2 vs challenger v1, bots report outcomes"
    with timeline.phase("experiment", title):
        with timeline.spinner("importing the analysis (scipy)"):
            from experiments import runner  # noqa: F401  (imported here, under a spinner: it takes a while)
            from experiments.store import ExperimentStore
        with redis.Redis.from_url(settings.redis_url) as client:
            registry = Registry(client, settings.artifact_dir, control_secret=settings.control_secret)
            e = ExperimentStore(client, registry).create(settings.model, 2, 1, treatment_share=0.10,
                                                         unit="request_id", label_horizon_s=LABEL_HORIZON_S)
        timeline.console.print(
            f"experiment {e.id}: v{e.control_version} (control, 90%) vs v{e.treatment_version} (treatment, "
            f"10%), split by request id; an outcome is due {e.label_horizon_s:g} s after its request; "
            f"analysed at {', '.join(f'{f:.0%}' for f in LOOKS_DURING_LOAD)} of the load and after it")
        time.sleep(1.0)  # workers pick the experiment up from the control channel and load v1 beside v2
        result = _experiment_load(timeline, settings, size)
        _final_analysis(timeline, settings)
        report_png = report_dir / "experiment-report.png"
        report_png.parent.mkdir(parents=True, exist_ok=True)
        with timeline.spinner("plotting the report"):
            from experiments.cli import main_report

            main_report(settings, settings.model, report_png)
    return result


def _experiment_load(timeline: Timeline, settings: Settings, size: Size) -> LoadResult:
    spec = LoadSpec(settings.redis_url, settings.model, requests=size.requests, concurrency=4,
                    batch_every=5, batch_size=8, report_outcomes=True)
    analyst = Analyst(settings, timeline.console)
    analyst.start()
    try:
        result = _load(timeline, spec, size.bots, "predictions with outcomes",
                       {f: analyst.request for f in LOOKS_DURING_LOAD})
    finally:
        analyst.finish()
    errors = dict(result.errors) or "none"
    timeline.console.print(f"answered by arm: {dict(result.variants)}; errors: {errors}")
    return result


class Analyst(threading.Thread):
    """Analyses the experiment when asked, beside the load, so the bots' progress never waits on it."""

    def __init__(self, settings: Settings, console: Console) -> None:
        super().__init__(name="demo-analyst", daemon=True)
        self.settings, self.console = settings, console
        self.asked: queue.Queue[bool] = queue.Queue()

    def request(self) -> None:
        """Ask for one more analysis (returns at once)."""
        self.asked.put(True)

    def finish(self) -> None:
        """Wait for the analyses asked for so far."""
        self.asked.put(False)
        self.join()

    def run(self) -> None:
        while self.asked.get():
            _analyse(self.settings, self.console, "during the load")


def _final_analysis(timeline: Timeline, settings: Settings) -> None:
    """Once every request's outcome is due, analyse them all."""
    from experiments import runner
    from experiments.store import ExperimentStore

    with timeline.spinner("waiting for the last outcomes to mature"), \
            redis.Redis.from_url(settings.redis_url) as client:
        registry = Registry(client, settings.artifact_dir, control_secret=settings.control_secret)
        e = ExperimentStore(client, registry).get(settings.model)
        due_s = runner.outcomes_due_s(client, e) if e is not None else 0.0
        while runner.redis_now_s(client) < due_s:
            time.sleep(0.05)
    _analyse(settings, timeline.console, "after the load", explain=True)


def _analyse(settings: Settings, console: Console, when: str, *, explain: bool = False) -> None:
    """Run one analysis (a decision record in the experiment's audit trail) and print it."""
    from experiments import runner

    with redis.Redis.from_url(settings.redis_url) as client:
        registry = Registry(client, settings.artifact_dir, control_secret=settings.control_secret)
        decision = runner.run_analysis(client, registry, settings.model)
    control_n, treatment_n = decision.exposures
    console.print(f"analysis {when}: {control_n} control and {treatment_n} treatment exposures; "
                  f"decision [bold]{decision.decision}[/bold] — {decision.reason}")
    if explain:
        planned = decision.planned
        console.print(f"the design plans {planned.get('control', '?')} control and "
                      f"{planned.get('treatment', '?')} treatment outcomes, so a demo-sized run is expected "
                      "to CONTINUE (`experiment watch` keeps analysing)")


def _summary(console: Console, result: LoadResult, histogram: dict[int, int]) -> None:
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
