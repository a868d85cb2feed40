"""``streamserve bench``'s multi-model scenario: twenty small models, one process each or one fleet for all.

Models ``mm_00`` … ``mm_19`` (``lab/mm_models.py``: distinct ONNX MLPs over a (30, 16) window)
are registered and promoted on one Redis, then served in two layouts:

- **A**: one single-model worker process per model (``streamserve worker --model mm_i``).
- **B**: one multi-model fleet of ``processes`` workers, each serving every model under a memory
  budget that holds them all (``--models mm_00,… --model-memory-mb …``).

For each layout, after every model has answered warm-up requests, open-loop sender processes
offer the same seeded schedule: ``rate_rps`` requests per second in all, evenly spaced, each
request's model drawn from a Zipf law over the models' ranks (weight ``1 / rank^zipf_s``; mm_00
is rank 1). Meanwhile the memory of each layout's process trees is sampled from
``/proc/<pid>/smaps_rollup`` (PSS, RSS, USS = private clean + dirty) and the median kept.
Latency is from a request's issue to its reply; p50 and p99 per model, pooled over the ``hot``
top ranks and the ``cold`` bottom ones. Targets: PSS_B / PSS_A <= 0.2, hot p99 B / A <= 1.2.

Then, on each layout, **fairness**: the coldest model trickles at ``trickle_rps`` (sequential,
paced) alone, then while the hottest is flooded by closed-loop threads in other processes; in
layout B the trickle's p99 flooded / alone should stay within 2. Layout A's ratio (separate
processes: the OS shares the cores) shows what the flood's CPU alone costs the trickle on
this box. Last, **cold start**: one worker with
``--max-loaded-models 1`` serving two mm models and the reference model; the time from send
to reply of the first request to a model never loaded there and to one that was evicted, each
followed by a warm request for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import redis
from rich.console import Console
from rich.table import Table

from lab import children, mm_models
from lab.fleet import Fleet, tree_pids
from producer import AsyncClient, Client
from protocol.errors import ConfigError, StreamserveError
from protocol.settings import Settings
from registry import Registry

Progress = Callable[[str], object]
TARGETS = {"pss_b_vs_a": "<= 0.2", "hot_p99_b_vs_a": "<= 1.2", "trickle_p99_flooded_vs_alone": "<= 2"}
WARM_CONNECTIONS = 8  # connections each sender opens before the clock starts
SENDER_POOL = 256  # connections a sender may hold: calls in flight each hold one until their reply
COLD_TIMEOUT_S = 30.0  # a first request waits for its model's load: well past any load here
REFERENCE_NAME = "mm-reference"  # not matched by the mm_ prefix: served only in the cold-start run


@dataclass(frozen=True, slots=True)
class MultiModelConfig:
    """Sizes, rates and durations of the scenario."""

    models: int = 20
    prefix: str = "mm_"
    processes: int = 2  # layout B's worker processes
    memory_budget_mb: int = 512  # layout B's --model-memory-mb: holds every model
    rate_rps: float = 200.0  # offered to both layouts, all models together
    seconds: float = 20.0  # each layout's load run
    senders: int = 2  # open-loop sender processes
    zipf_s: float = 1.1
    hot: int = 3  # top ranks pooled as "hot"
    cold: int = 10  # bottom ranks pooled as "cold"
    warmup_requests: int = 3  # per model, before memory and latency are measured
    sample_s: float = 1.0  # between memory samples during the load run
    timeout_s: float = 5.0  # each call of the load run
    fairness_seconds: float = 20.0  # the trickle alone, then flooded (500 calls: a p99 that means something)
    trickle_rps: float = 25.0
    flood_processes: int = 2
    flood_threads: int = 4  # per flood process, closed loop
    cold_repeats: int = 3  # evictions measured per cold-start model
    start_timeout_s: float = 120.0  # a layout's workers to serve
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MultiModelConfig:
        """From ``streamserve bench``'s ``--mm-*`` flags (defaults where a flag is not wired)."""
        names = {"models": "mm_models", "processes": "mm_processes", "memory_budget_mb": "mm_memory_mb",
                 "rate_rps": "mm_rate", "seconds": "mm_seconds", "senders": "mm_senders",
                 "fairness_seconds": "mm_fairness_seconds", "trickle_rps": "mm_trickle_rps"}
        return cls(**{f: getattr(args, a) for f, a in names.items() if getattr(args, a, None) is not None})


@dataclass(frozen=True, slots=True)
class ReferenceModel:
    """The artifact the cold-start run also serves, with what its registration needs."""

    path: Path
    input_spec: dict[str, dict[str, Any]]
    output_names: list[str]
    labels: list[str]


class Outcome(NamedTuple):
    """One request of the load run: its model's rank index, when it was due (s from the start), how
    late it was issued, its latency from issue to reply (s) and its code (``OK`` or the error's)."""

    model: int
    at_s: float
    lag_s: float
    latency_s: float
    code: str


def zipf_weights(n: int, s: float) -> np.ndarray:
    """Shares of ``n`` ranks under a Zipf law with exponent ``s`` (rank 1 first); they sum to 1."""
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def schedule(cfg: MultiModelConfig) -> list[tuple[float, int]]:
    """(offset s, model index) of every request: evenly spaced, models drawn with a seeded Zipf law."""
    n = int(cfg.rate_rps * cfg.seconds)
    shares = zipf_weights(cfg.models, cfg.zipf_s)
    models = np.random.default_rng(cfg.seed).choice(cfg.models, size=n, p=shares)
    return [(i / cfg.rate_rps, int(m)) for i, m in enumerate(models)]


def sample_input(index: int) -> np.ndarray:
    """The window sent to model ``index`` (seeded: the same in both layouts)."""
    return np.random.default_rng(100 + index).standard_normal(mm_models.SAMPLE_SHAPE).astype(np.float32)


# --- memory ---------------------------------------------------------------------------------------

ROLLUP_FIELDS = {"Pss": "pss", "Rss": "rss", "Private_Clean": "uss", "Private_Dirty": "uss"}


def process_memory_kb(pid: int) -> Counter[str]:
    """PSS, RSS and USS of one process (kB, from smaps_rollup); empty if it has exited."""
    out: Counter[str] = Counter()
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ROLLUP_FIELDS:
            out[ROLLUP_FIELDS[name]] += int(rest.split()[0])
    return out


def trees_memory_mb(roots: Sequence[int]) -> dict[str, float]:
    """Memory summed over every process of the trees under ``roots``, and how many processes."""
    total: Counter[str] = Counter()
    pids = [pid for root in roots for pid in tree_pids(root)]
    for pid in pids:
        total.update(process_memory_kb(pid))
    return {f"{m}_mb": total[m] / 1024 for m in ("pss", "rss", "uss")} | {"processes": len(pids)}


class MemorySampler:
    """Samples :func:`trees_memory_mb` every ``interval_s`` in a thread; the median of each field."""

    def __init__(self, roots: Sequence[int], interval_s: float) -> None:
        self.roots, self.interval_s = list(roots), interval_s
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(trees_memory_mb(self.roots))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def median(self) -> dict[str, float]:
        """Median of each field over the samples, and how many there were."""
        fields = ("pss_mb", "rss_mb", "uss_mb", "processes")
        medians = {f: float(np.median([s[f] for s in self.samples])) for f in fields}
        return medians | {"samples": len(self.samples)}


# --- open-loop load -------------------------------------------------------------------------------


def offer(url: str, names: Sequence[str], plan: Sequence[tuple[float, int]], senders: int,
          timeout_s: float, start_timeout_s: float = 60.0) -> list[Outcome]:
    """Run ``plan`` from ``senders`` processes (request j from sender j mod senders), each call its
    own asyncio task whatever the replies; every request's outcome."""
    ctx = children.context("lab.bench_multimodel")
    ready, gate, out, start_at = ctx.Semaphore(0), ctx.Event(), ctx.Queue(), ctx.Value("d", 0.0)
    procs = [ctx.Process(target=_sender_main, args=(url, list(names), list(plan[i::senders]), timeout_s,
                                                    ready, gate, start_at, out)) for i in range(senders)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        for _ in procs:
            if not ready.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise ConfigError(f"the sender processes did not all connect within {start_timeout_s:g} s")
        start_at.value = time.time() + 0.1
        gate.set()
        wait_s = 0.1 + (plan[-1][0] if plan else 0.0) + timeout_s + start_timeout_s
        return _gather(out, senders, wait_s)
    finally:
        for p in procs:
            p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join()


def _gather(out: Any, senders: int, wait_s: float) -> list[Outcome]:
    deadline, outcomes = time.monotonic() + wait_s, []
    for _ in range(senders):
        try:
            outcomes += [Outcome(*o) for o in out.get(timeout=max(0.0, deadline - time.monotonic()))]
        except queue.Empty:
            raise ConfigError(f"a sender process did not report within {wait_s:g} s") from None
    return outcomes


def _sender_main(url: str, names: list[str], plan: list[tuple[float, int]], timeout_s: float,
                 ready: Any, gate: Any, start_at: Any, out: Any) -> None:
    out.put(asyncio.run(_send(url, names, plan, timeout_s, ready, gate, start_at)))


async def _send(url: str, names: list[str], plan: list[tuple[float, int]], timeout_s: float,
                ready: Any, gate: Any, start_at: Any) -> list[tuple]:
    inputs = [sample_input(i) for i in range(len(names))]
    outcomes: list[tuple] = []
    async with AsyncClient.from_url(url, timeout_s=timeout_s, max_connections=SENDER_POOL) as client:
        await asyncio.gather(*(client.redis.ping() for _ in range(WARM_CONNECTIONS)))
        ready.release()
        await asyncio.to_thread(gate.wait)
        t0, tasks = start_at.value, set()
        for offset_s, m in plan:
            await asyncio.sleep(max(0.0, t0 + offset_s - time.time()))
            task = asyncio.create_task(_call(client, names[m], m, inputs[m], t0, offset_s, outcomes))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*list(tasks))
    return outcomes


async def _call(client: AsyncClient, model: str, index: int, x: np.ndarray, t0: float, offset_s: float,
                outcomes: list[tuple]) -> None:
    issued = time.time()
    try:
        await client.predict(model, x)
        code = "OK"
    except StreamserveError as e:  # a reply's error, shed before sending, Redis unreachable
        code = getattr(e, "code", type(e).__name__)
    outcomes.append((index, offset_s, issued - t0 - offset_s, time.time() - issued, code))


# --- latency summaries ----------------------------------------------------------------------------


def percentiles_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50, p99 (ms) and the count; NaN percentiles when nothing was measured."""
    if not latencies_s:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "n": 0}
    a = np.asarray(latencies_s) * 1000
    return {"p50_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99)), "n": len(a)}


def latency_summary(outcomes: Sequence[Outcome], names: Sequence[str],
                    cfg: MultiModelConfig) -> dict[str, Any]:
    """Per model, hot (top ``cfg.hot`` ranks) and cold (bottom ``cfg.cold``) pooled, errors, sender lag."""
    ok: dict[int, list[float]] = {i: [] for i in range(len(names))}
    errors: Counter[str] = Counter()
    for o in outcomes:
        if o.code == "OK":
            ok[o.model].append(o.latency_s)
        else:
            errors[o.code] += 1
    hot = [t for i in range(min(cfg.hot, len(names))) for t in ok[i]]
    cold = [t for i in range(max(0, len(names) - cfg.cold), len(names)) for t in ok[i]]
    lag_p99_ms = float(np.percentile([o.lag_s for o in outcomes], 99) * 1000) if outcomes else 0.0
    return {"per_model": {names[i]: percentiles_ms(v) for i, v in ok.items()},
            "hot": percentiles_ms(hot), "cold": percentiles_ms(cold),
            "all": percentiles_ms([t for v in ok.values() for t in v]), "errors": dict(errors),
            "issued": len(outcomes), "issue_lag_p99_ms": lag_p99_ms}


# --- layouts --------------------------------------------------------------------------------------


def warm_up(url: str, names: Sequence[str], requests: int) -> dict[str, Any]:
    """``requests`` sequential calls per model (the first may wait for a load); errors counted."""
    errors: Counter[str] = Counter()
    with Client.from_url(url, timeout_s=COLD_TIMEOUT_S) as client:
        for i, name in enumerate(names):
            for _ in range(requests):
                try:
                    client.predict(name, sample_input(i))
                except StreamserveError as e:
                    errors[f"{name}:{getattr(e, 'code', type(e).__name__)}"] += 1
    return {"requests": requests * len(names), "errors": dict(errors)}


def start_all(fleets: Sequence[Fleet], timeout_s: float) -> None:
    """Start every fleet at once (their imports overlap) and wait for all; on a failure stop all."""
    with ThreadPoolExecutor(len(fleets)) as pool:
        results = list(pool.map(lambda f: _try_start(f, timeout_s), fleets))
    failures = [r for r in results if r is not None]
    if failures:
        stop_all(fleets)
        raise failures[0]


def _try_start(fleet: Fleet, timeout_s: float) -> Exception | None:
    try:
        fleet.start(timeout_s)
        return None
    except Exception as e:  # reported by start_all after every fleet has had its chance
        return e


def stop_all(fleets: Sequence[Fleet]) -> None:
    """Stop every fleet, concurrently (each drains for up to its stop timeout)."""
    with ThreadPoolExecutor(max(1, len(fleets))) as pool:
        list(pool.map(lambda f: f.stop(), fleets))


def measure_layout(url: str, fleets: Sequence[Fleet], names: Sequence[str], cfg: MultiModelConfig,
                   plan: Sequence[tuple[float, int]], progress: Progress) -> dict[str, Any]:
    """Warm-up, then the load run with memory sampled alongside; the layout's section."""
    warm = warm_up(url, names, cfg.warmup_requests)
    roots = [f.process.pid for f in fleets if f.process is not None]
    progress(f"multi-model: {cfg.rate_rps:g} requests/s over {len(names)} models for {cfg.seconds:g} s …")
    with MemorySampler(roots, cfg.sample_s) as sampler:
        outcomes = offer(url, names, plan, cfg.senders, cfg.timeout_s)
    progress(f"multi-model: fairness, {names[-1]} at {cfg.trickle_rps:g}/s alone, then beside a flood "
             f"of {names[0]} …")
    return {"warmup": warm, "memory": sampler.median(), "latency": latency_summary(outcomes, names, cfg),
            "fairness": fairness(url, names[0], names[-1], len(names) - 1, cfg)}


def layout_a(settings: Settings, names: Sequence[str], cfg: MultiModelConfig, fleet_args: Sequence[str],
             plan: Sequence[tuple[float, int]], progress: Progress) -> dict[str, Any]:
    """One single-model worker process per model."""
    progress(f"multi-model: layout A, {len(names)} single-model worker processes …")
    fleets = [Fleet(settings, name, 1, *fleet_args) for name in names]
    started = time.monotonic()
    start_all(fleets, cfg.start_timeout_s)
    try:
        ready_s = time.monotonic() - started
        return {"workers": len(names), "ready_s": ready_s} | measure_layout(
            settings.redis_url, fleets, names, cfg, plan, progress)
    finally:
        stop_all(fleets)


def multi_fleet(settings: Settings, names: Sequence[str], processes: int, *extra_args: str) -> Fleet:
    """A fleet of ``processes`` workers serving every one of ``names`` (``--models a,b,…``)."""
    return Fleet(settings, names[0], processes, *extra_args, models=list(names))


def layout_b(settings: Settings, names: Sequence[str], cfg: MultiModelConfig, fleet_args: Sequence[str],
             plan: Sequence[tuple[float, int]], progress: Progress) -> dict[str, Any]:
    """One multi-model fleet serving every model."""
    progress(f"multi-model: layout B, one fleet of {cfg.processes} processes serving {len(names)} models …")
    fleet = multi_fleet(settings, names, cfg.processes, *fleet_args,
                        "--model-memory-mb", str(cfg.memory_budget_mb))
    started = time.monotonic()
    fleet.start(cfg.start_timeout_s)
    try:
        ready_s = time.monotonic() - started
        return {"workers": cfg.processes, "ready_s": ready_s} | measure_layout(
            settings.redis_url, [fleet], names, cfg, plan, progress)
    finally:
        fleet.stop()


# --- fairness -------------------------------------------------------------------------------------


def trickle(url: str, model: str, index: int, rate_rps: float, seconds: float) -> dict[str, Any]:
    """Sequential calls paced at ``rate_rps`` for ``seconds``: latency from send to reply."""
    x, period_s, latencies = sample_input(index), 1.0 / rate_rps, []
    errors: Counter[str] = Counter()
    with Client.from_url(url, timeout_s=5.0) as client:
        next_at = end = time.monotonic()
        end += seconds
        while next_at < end:
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += period_s
            started = time.perf_counter()
            try:
                client.predict(model, x)
                latencies.append(time.perf_counter() - started)
            except StreamserveError as e:
                errors[getattr(e, "code", type(e).__name__)] += 1
    return percentiles_ms(latencies) | {"errors": dict(errors)}


def _flood_main(url: str, model: str, index: int, threads: int, ready: Any, stop: Any, out: Any) -> None:
    x, counts = sample_input(index), [0] * threads

    def loop(k: int, client: Client) -> None:
        while not stop.is_set():
            try:
                client.predict(model, x)
                counts[k] += 1
            except StreamserveError:
                pass  # the flood's own outcome is not what is measured

    with Client.from_url(url, timeout_s=5.0) as client:
        client.redis.ping()
        ready.release()
        lanes = [threading.Thread(target=loop, args=(k, client)) for k in range(threads)]
        for t in lanes:
            t.start()
        for t in lanes:
            t.join()
    out.put(sum(counts))


def fairness(url: str, flooded: str, trickled: str, trickled_index: int,
             cfg: MultiModelConfig) -> dict[str, Any]:
    """The trickle's latency alone, then while ``flooded`` is driven closed loop from other processes."""
    alone = trickle(url, trickled, trickled_index, cfg.trickle_rps, cfg.fairness_seconds)
    ctx = children.context("lab.bench_multimodel")
    ready, stop, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_flood_main, args=(url, flooded, 0, cfg.flood_threads, ready, stop, out))
             for _ in range(cfg.flood_processes)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            if not ready.acquire(timeout=60):
                raise ConfigError("the flood processes did not connect within 60 s")
        started = time.monotonic()
        time.sleep(1.0)  # the flood reaches its pace before the trickle is measured
        flooded_run = trickle(url, trickled, trickled_index, cfg.trickle_rps, cfg.fairness_seconds)
        stop.set()
        flood_rps = sum(out.get(timeout=30) for _ in procs) / (time.monotonic() - started)
    finally:
        stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return {"flooded_model": flooded, "trickle_model": trickled, "trickle_rps": cfg.trickle_rps,
            "flood_threads": cfg.flood_processes * cfg.flood_threads, "flood_rps": flood_rps,
            "alone": alone, "flooded": flooded_run,
            "trickle_p99_flooded_vs_alone": flooded_run["p99_ms"] / alone["p99_ms"]}


# --- cold start -----------------------------------------------------------------------------------


def timed_call(client: Client, model: str, x: np.ndarray) -> tuple[float, str]:
    """Milliseconds from send to reply, and ``OK`` or the error's code."""
    started = time.perf_counter()
    try:
        client.predict(model, x, timeout_s=COLD_TIMEOUT_S)
        code = "OK"
    except StreamserveError as e:
        code = getattr(e, "code", type(e).__name__)
    return (time.perf_counter() - started) * 1000, code


def cold_start(settings: Settings, models: dict[str, tuple[str, np.ndarray]], repeats: int,
               progress: Progress, timeout_s: float) -> dict[str, Any]:
    """One worker, ``--max-loaded-models 1``: each model's first request (never loaded), then
    ``repeats`` rounds in which each is evicted by the others before its request; each cold request
    is followed by a warm one. ``models`` maps a name to (kind, input)."""
    progress(f"multi-model: cold start, one worker with --max-loaded-models 1 serving {list(models)} …")
    times: dict[str, dict[str, list[float]]] = {}
    codes: Counter[str] = Counter()
    fleet = multi_fleet(settings, list(models), 1, "--max-loaded-models", "1").start(timeout_s)
    try:
        with Client.from_url(settings.redis_url, timeout_s=COLD_TIMEOUT_S) as client:
            for round_ in range(repeats + 1):
                for name, (kind, x) in models.items():
                    state = "never_loaded" if round_ == 0 else "evicted"
                    before_ms = _last_load(client, name)[0]
                    for what in (state, "warm"):
                        ms, code = timed_call(client, name, x)
                        codes[code] += 1
                        times.setdefault(kind, {}).setdefault(what, []).append(ms)
                    load_ms = _reported_load_ms(client, name, before_ms)
                    times[kind].setdefault("worker_load", []).extend([load_ms] if load_ms == load_ms else [])
    finally:
        fleet.stop()
    summary = {kind: {what: {"median_ms": float(np.median(v)) if v else float("nan"),
                             "max_ms": max(v, default=float("nan")), "n": len(v)}
                      for what, v in by.items()} for kind, by in times.items()}
    return summary | {"codes": dict(codes), "models": {n: k for n, (k, _) in models.items()}}


def _last_load(client: Client, model: str) -> tuple[int, float]:
    """The worker's last load of ``model`` as its heartbeat reports it: (wall-clock ms, load ms)."""
    workers = client.health(model).workers
    return (workers[0].loaded_at_ms, workers[0].load_ms) if workers else (0, float("nan"))


def _reported_load_ms(client: Client, model: str, before_ms: int, wait_s: float = 2.0) -> float:
    """How long the worker says the load after ``before_ms`` took (its heartbeat follows a load at
    once; NaN if none is reported within ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        loaded_at_ms, load_ms = _last_load(client, model)
        if loaded_at_ms > before_ms:
            return load_ms
        time.sleep(0.02)
    return float("nan")


# --- the scenario ---------------------------------------------------------------------------------


def register_reference(registry: Registry, reference: ReferenceModel) -> np.ndarray:
    """Register and promote the reference model under :data:`REFERENCE_NAME`; an input for it."""
    mv = registry.register(REFERENCE_NAME, reference.path, input_spec=reference.input_spec,
                           output_names=reference.output_names, labels=reference.labels)
    registry.promote(REFERENCE_NAME, mv.version)
    spec = next(iter(reference.input_spec.values()))
    return np.random.default_rng(7).standard_normal(spec["shape"]).astype(spec["dtype"])


def ratio(b: float, a: float) -> float:
    """b / a, NaN where a is 0 or not a number."""
    return b / a if a and a == a else float("nan")


def run_multimodel(settings: Settings, cfg: MultiModelConfig, tmp: Path, fleet_args: Sequence[str] = (),
                   reference: ReferenceModel | None = None, progress: Progress = print) -> dict[str, Any]:
    """The whole scenario on ``settings.redis_url`` (a server of its own); the JSON section."""
    names = mm_models.model_names(cfg.prefix, cfg.models)
    progress(f"multi-model: fitting and registering {len(names)} models …")
    client = redis.Redis.from_url(settings.redis_url)
    try:
        registry = Registry(client, settings.artifact_dir)
        accuracy = mm_models.register_models(registry, names, tmp / "mm-models", seed=cfg.seed)
        ref_x = register_reference(registry, reference) if reference is not None else None
    finally:
        client.close()
    plan = schedule(cfg)
    a = layout_a(settings, names, cfg, fleet_args, plan, progress)
    b = layout_b(settings, names, cfg, fleet_args, plan, progress)
    cold_models = {names[0]: ("mm", sample_input(0)), names[1]: ("mm", sample_input(1))}
    if ref_x is not None:
        cold_models[REFERENCE_NAME] = ("reference", ref_x)
    cold = cold_start(settings, cold_models, cfg.cold_repeats, progress, cfg.start_timeout_s)
    shares = dict(zip(names, zipf_weights(cfg.models, cfg.zipf_s).tolist(), strict=True))
    both = ratios(a, b)
    fair = {"layout_a": a.pop("fairness"), "layout_b": b.pop("fairness")}
    return {"config": asdict(cfg), "models": names, "train_accuracy": accuracy, "zipf_shares": shares,
            "ratios": both, "fairness": fair, "layout_a": a, "layout_b": b, "cold_start": cold,
            "targets": TARGETS}


def ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Layout B over layout A (memory, latency); each layout's trickle p99 flooded over alone."""
    out = {f"{m}_b_vs_a": ratio(b["memory"][f"{m}_mb"], a["memory"][f"{m}_mb"])
           for m in ("pss", "rss", "uss")}
    for pool in ("hot", "cold", "all"):
        for q in ("p50", "p99"):
            out[f"{pool}_{q}_b_vs_a"] = ratio(b["latency"][pool][f"{q}_ms"], a["latency"][pool][f"{q}_ms"])
    out["trickle_p99_flooded_vs_alone"] = b["fairness"]["trickle_p99_flooded_vs_alone"]
    out["trickle_p99_flooded_vs_alone_layout_a"] = a["fairness"]["trickle_p99_flooded_vs_alone"]
    return out


# --- the table ------------------------------------------------------------------------------------


def print_multimodel(section: dict[str, Any]) -> None:
    """Both layouts side by side, then fairness and cold start in a few lines."""
    cfg, a, b, r = section["config"], section["layout_a"], section["layout_b"], section["ratios"]
    table = Table(title=f"multi-model: {cfg['models']} models, Zipf s={cfg['zipf_s']:g}, "
                        f"{cfg['rate_rps']:g} requests/s for {cfg['seconds']:g} s")
    table.add_column("measurement")
    for col in (f"A: {a['workers']} x 1 model", f"B: {b['workers']} x {cfg['models']} models", "B / A"):
        table.add_column(col, justify="right")
    for m in ("pss", "rss", "uss"):
        table.add_row(f"{m.upper()} MB (summed)", f"{a['memory'][f'{m}_mb']:.0f}",
                      f"{b['memory'][f'{m}_mb']:.0f}", f"{r[f'{m}_b_vs_a']:.3f}")
    table.add_row("processes", f"{a['memory']['processes']:.0f}", f"{b['memory']['processes']:.0f}", "")
    for pool in ("hot", "cold", "all"):
        for q in ("p50", "p99"):
            table.add_row(f"{pool} {q} ms", f"{a['latency'][pool][f'{q}_ms']:.2f}",
                          f"{b['latency'][pool][f'{q}_ms']:.2f}", f"{r[f'{pool}_{q}_b_vs_a']:.2f}")
    table.add_row("errors", *(str(sum(x["latency"]["errors"].values())) for x in (a, b)), "")
    Console(width=120).print(table)
    print(f"PSS B / A = {r['pss_b_vs_a']:.3f} (target <= 0.2); hot p99 B / A = {r['hot_p99_b_vs_a']:.2f} "
          "(target <= 1.2)")
    for layout, f in section["fairness"].items():
        target = " (target <= 2)" if layout == "layout_b" else ""
        print(f"fairness, {layout}: {f['trickle_model']} at {f['trickle_rps']:g}/s p99 "
              f"{f['alone']['p99_ms']:.2f} ms alone, {f['flooded']['p99_ms']:.2f} ms beside a flood of "
              f"{f['flooded_model']} ({f['flood_rps']:.0f}/s, {f['flood_threads']} threads): "
              f"x{f['trickle_p99_flooded_vs_alone']:.2f}{target}")
    _print_cold(section["cold_start"])


def _print_cold(cold: dict[str, Any]) -> None:
    for kind in ("mm", "reference"):
        if kind in cold:
            c = cold[kind]
            print(f"cold start ({kind}, --max-loaded-models 1): never loaded "
                  f"{c['never_loaded']['median_ms']:.1f} ms, "
                  f"evicted {c['evicted']['median_ms']:.1f} ms (max {c['evicted']['max_ms']:.1f}), "
                  f"warm {c['warm']['median_ms']:.2f} ms; the load itself (worker-reported) "
                  f"{c['worker_load']['median_ms']:.1f} ms")
