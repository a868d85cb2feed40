"""Simulated bots: producer processes that send requests and report latencies and errors.

Used by ``streamserve demo`` and ``streamserve bench``. Each bot process runs
``concurrency`` threads sharing one client; a share of the calls are batched
(``predict_many``). Counts stream back to the parent over a queue so it
can draw a progress bar.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lab import children
from modeltools.synthetic import LABELS, synthetic_dataset
from producer import Client, Prediction, ReplyError

WINDOWS = 256


@dataclass
class LoadSpec:
    """What each bot process does."""

    redis_url: str
    model: str
    requests: int
    concurrency: int = 1
    batch_every: int = 0  # every Nth call is a predict_many of batch_size
    batch_size: int = 8
    bad_every: int = 0  # every Nth single call sends a wrongly shaped window (INVALID_INPUT)
    report_outcomes: bool = False  # send each answered request's true label as an outcome
    timeout_s: float = 2.0
    routes: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "SOLUSDT")


@dataclass
class LoadResult:
    """Aggregated over all bot processes."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)
    variants: Counter = field(default_factory=Counter)
    elapsed_s: float = 0.0
    client_cpu_s: float = 0.0

    @property
    def requests(self) -> int:
        """Predictions asked for (a predict_many of 8 counts 8)."""
        return len(self.latencies_ms) + sum(self.errors.values())

    def percentile(self, q: float) -> float:
        """Latency percentile of successful requests, in ms."""
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def merge(self, other: dict) -> None:
        """Add one bot's report."""
        self.latencies_ms += other["latencies_ms"]
        self.errors.update(other["errors"])
        self.versions.update(other["versions"])
        self.variants.update(other["variants"])
        self.client_cpu_s += other["cpu_s"]


def _bot(spec: LoadSpec, seed: int, progress: mp.Queue | None, gate) -> dict:
    windows, truth = synthetic_dataset(WINDOWS, seed=1000 + seed)  # known labels: outcomes
    report: dict[str, Any] = {"latencies_ms": [], "errors": Counter(), "versions": Counter(),
                              "variants": Counter()}
    remaining = [spec.requests]
    lock = threading.Lock()

    def take(wanted: int) -> int:
        with lock:
            n = min(wanted, remaining[0])
            remaining[0] -= n
            return n

    def loop(client: Client, lane: int) -> None:
        singles = 0
        for calls in itertools.count(1):
            many = bool(spec.batch_every) and calls % spec.batch_every == 0
            n = take(spec.batch_size if many else 1)
            if n == 0:
                return
            route = spec.routes[(lane + calls) % len(spec.routes)]
            started = time.perf_counter()
            first = (calls * spec.batch_size) % (WINDOWS - spec.batch_size) if many else calls % WINDOWS
            rows = list(range(first, first + n))
            if many:
                results = _predict_many(client, spec.model, list(windows[rows]), route)
            else:
                singles += 1
                bad = spec.bad_every and singles % spec.bad_every == 0
                window = windows[first, :, :100] if bad else windows[first]
                results = _predict_one(client, spec.model, window, route)
            with lock:
                _record(report, results, (time.perf_counter() - started) * 1000)
            if spec.report_outcomes:
                _report_outcomes(client, spec.model, results, truth[rows])
            if progress is not None:
                progress.put(n)

    # The sync client in threads: its command packing runs in hiredis, which costs
    # about half the CPU per request of redis-py's asyncio client (see README).
    with Client.from_url(spec.redis_url, timeout_s=spec.timeout_s) as client:
        client.redis.ping()
        gate.wait()  # every bot is connected: start together so throughput is measured fairly
        report["t0"], cpu0 = time.time(), time.process_time()
        lanes = [threading.Thread(target=loop, args=(client, i)) for i in range(spec.concurrency)]
        for lane in lanes:
            lane.start()
        for lane in lanes:
            lane.join()
    report["t1"] = time.time()
    report["cpu_s"] = time.process_time() - cpu0
    return report


def _predict_many(client: Client, model: str, windows: list, route: str) -> list[Prediction | ReplyError]:
    """Every request's result; a call shed before sending (``Overloaded``) fails each of them."""
    try:
        return client.predict_many(model, windows, route=route, return_exceptions=True)
    except ReplyError as e:
        return [e] * len(windows)


def _predict_one(client: Client, model: str, window: np.ndarray, route: str) -> list[Prediction | ReplyError]:
    """One single-sample call; its error, if any, takes the prediction's place."""
    try:
        return [client.predict(model, window, route=route)]
    except ReplyError as e:
        return [e]


def _report_outcomes(client: Client, model: str, results: list, labels: np.ndarray) -> None:
    """What a bot does later: tell the system the true label of each answered request."""
    client.record_outcomes(model, [(result.request_id, {"label": LABELS[int(label)]})
                                   for result, label in zip(results, labels, strict=True)
                                   if not isinstance(result, ReplyError)])


def _record(report: dict, results: list, latency_ms: float) -> None:
    for r in results:
        if isinstance(r, ReplyError):
            report["errors"][r.code] += 1
        else:
            report["latencies_ms"].append(latency_ms)
            report["versions"][r.model_version] += 1
            if r.variant:
                report["variants"][r.variant] += 1


def _bot_process(spec: LoadSpec, seed: int, progress: mp.Queue | None, results: mp.Queue,
                 ready, gate) -> None:
    ready.release()
    results.put(_bot(spec, seed, progress, gate))


def _drain(progress: mp.Queue[int], on_progress: Callable[[int], object] | None) -> None:
    """Hand every count waiting in ``progress`` to ``on_progress``."""
    while not progress.empty():
        n = progress.get()
        if on_progress:
            on_progress(n)


def _check_alive(bots: list, what: str) -> None:
    dead = [b for b in bots if b.exitcode not in (None, 0)]
    if dead:
        raise RuntimeError(f"bot process {dead[0].pid} exited with code {dead[0].exitcode} before it {what}")


# A bot puts its report on the queue, then exits: the report may show up a moment after the exit.
REPORT_AFTER_EXIT_S = 5.0


def _collect(bots: list, results, progress, on_progress) -> list[dict[str, Any]]:
    """Every bot's report, draining progress meanwhile; a bot that exits without one raises."""
    reports: list[dict[str, Any]] = []
    all_exited_at: float | None = None
    while len(reports) < len(bots):
        _drain(progress, on_progress)
        try:
            reports.append(results.get(timeout=0.05))
            continue
        except Exception:  # queue.Empty: keep draining progress
            pass
        _check_alive(bots, "reported")
        if all(b.exitcode is not None for b in bots):
            all_exited_at = all_exited_at or time.monotonic()
            if time.monotonic() - all_exited_at > REPORT_AFTER_EXIT_S:
                raise RuntimeError(f"{len(bots) - len(reports)} bot processes exited without a report")
    _drain(progress, on_progress)  # the last counts may arrive after the last report
    return reports


def run_load(spec: LoadSpec, processes: int, on_progress=None) -> LoadResult:
    """Run ``processes`` bots of ``spec`` each and wait for all; ``on_progress(n)`` per reply.

    A bot process that dies before it is ready or before it reports raises ``RuntimeError``
    instead of leaving the caller waiting forever."""
    ctx = children.context("lab.loadgen")
    progress, results = ctx.Queue(), ctx.Queue()
    ready, gate = ctx.Semaphore(0), ctx.Event()
    bots = [ctx.Process(target=_bot_process, args=(spec, seed, progress, results, ready, gate))
            for seed in range(processes)]
    for bot in bots:
        bot.start()
    for _ in bots:
        while not ready.acquire(timeout=0.5):
            _check_alive(bots, "started")
    gate.set()
    total = LoadResult()
    reports = _collect(bots, results, progress, on_progress)
    total.elapsed_s = max(r["t1"] for r in reports) - min(r["t0"] for r in reports)
    for bot in bots:
        bot.join()
    for report in reports:
        total.merge(report)
    return total
