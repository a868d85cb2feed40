"""``streamserve bench``'s overload scenario: twice the fleet's capacity, with and without priority lanes.

Against one fleet of ``processes`` workers on one Redis, in four phases:

1. **capacity** C: closed-loop bots (``lab.loadgen``) keep many single-sample calls in
   flight, so the workers run full batches; Redis's CPU and bytes per request are read
   alongside (for the capacity model).
2. **unloaded**: live requests alone at ``unloaded_share``·C, open loop.
3. **lanes**: live at ``live_share``·C (deadline ``live_timeout_s``) and backfill at
   ``backfill_share``·C (deadline ``backfill_timeout_s``), each on its own lane.
4. **no lanes**: the same two classes, rates and deadlines, all sent on the live lane.

Open loop: each class has sender processes of its own (a live bot and a backfill job
are different programs) that issue calls on a fixed, interleaved schedule whatever the
replies, each call its own asyncio task (a closed-loop client slows down with the
server and cannot overload it). Live requests are single ``predict`` calls; backfill
goes in ``predict_many`` chunks of ``backfill_chunk``, as a backfill job sends its
windows (and at a fraction of the client CPU per request, which on a small box is CPU
left to the workers). A request's latency counts from its *scheduled* time, so a
sender that falls behind shows up as latency, and the rate actually offered (requests
issued / time from the first issue to the last) is reported beside the target.

The live deadline (100 ms by default) is about 20 times the unloaded live p99 here, and
above what a live request should wait under load when it is served first: the batch in
progress plus its own, two full batches (about 2 × 16 ms for the reference model at 32
rows on this box). So a live failure means the lanes did not protect the live traffic,
not that the deadline was tight.

Definitions used in the results:

- *success*: answered OK (within the deadline: a later reply is never returned).
- *OVERLOADED, client*: shed by the client before sending (the shard's published
  backlog could not drain within the deadline); *OVERLOADED, worker*: answered so.
- *could have met its deadline*: a class that issued N requests over T seconds at
  capacity C can have at most ``max(0, N - C·T)`` failures forced by a lack of
  capacity; every failure beyond that could have met its deadline had the class been
  served first. With live at 0.5·C that bound is 0: every live failure counts.

On a small box the senders, Redis and the workers share the cores, and the
asyncio senders cost more CPU per request than the closed-loop bots that measured
C, so the capacity left to the workers under overload is below C: the goodput and
the drain rate the workers publish show how far.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import redis
from rich.console import Console
from rich.table import Table

from lab import children
from lab.bench_cluster import per_request, read_counters
from lab.fleet import Fleet, pin
from lab.loadgen import LoadSpec, run_load
from producer import AsyncClient, Prediction
from protocol import keys
from protocol.errors import ConfigError, Overloaded, ReplyError, StreamserveError
from protocol.settings import Settings
from protocol.sharding import ShardLoad

OVERLOADED = Overloaded.code
START_DELAY_S = 0.1  # senders start together this long after the last one is ready
WARM_CONNECTIONS = 32  # connections each sender opens before the clock starts
WIDE = 170  # columns for the tables, also when stdout is not a terminal (rich's default is then 80)
TARGETS = {"live_p99_loaded_vs_unloaded": "<= 2", "live_failures_could_have_met_deadline": "== 0"}


@dataclass(frozen=True, slots=True)
class OverloadConfig:
    """Durations, shares of the capacity C and deadlines of the scenario."""

    capacity_bots: int = 2
    capacity_concurrency: int = 32  # in flight per bot: enough for full batches on every worker
    capacity_requests: int = 4000  # per bot
    unloaded_s: float = 8.0
    loaded_s: float = 20.0  # each of the two overloaded runs
    senders: int = 2  # processes per class of requests
    unloaded_share: float = 0.3
    live_share: float = 0.5
    backfill_share: float = 1.5
    live_timeout_s: float = 0.1
    backfill_timeout_s: float = 1.0
    backfill_chunk: int = 16  # backfill requests per predict_many call
    drain_timeout_s: float = 30.0  # per phase, for the streams to empty; also the fleet's stop
    # Bounds on the scenario's own waits, reached only when something is wrong (a test passes
    # smaller ones, so that their sum stays within its timeout):
    start_timeout_s: float = 60.0  # the fleet to serve; a phase's senders to connect, all together
    report_slack_s: float = 60.0  # a phase's senders report this long after its last deadline
    capacity_timeout_s: float = 10.0  # each call of the capacity run
    # > 0: the senders run at this nice level, below the workers and Redis: as bots on other
    # machines would be (a diagnostic: on one small box the senders' CPU delays the fleet too).
    sender_nice: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OverloadConfig:
        """From ``streamserve bench``'s flags."""
        return cls(capacity_requests=args.overload_capacity_requests,
                   unloaded_s=args.overload_unloaded_seconds, loaded_s=args.overload_seconds,
                   senders=args.overload_senders,
                   live_timeout_s=args.overload_live_timeout_ms / 1000,
                   backfill_timeout_s=args.overload_backfill_timeout_ms / 1000,
                   backfill_chunk=args.overload_backfill_chunk, sender_nice=args.overload_sender_nice)


@dataclass(frozen=True, slots=True)
class Flow:
    """One class of requests (``live`` or ``backfill``) paced at ``rate_rps`` on ``lane``, sent
    ``chunk`` at a time (a backfill job sends its windows in ``predict_many`` chunks)."""

    cls: str
    lane: str
    rate_rps: float
    timeout_s: float
    chunk: int = 1

    @property
    def calls_per_s(self) -> float:
        """Calls (of ``chunk`` requests each) per second."""
        return self.rate_rps / self.chunk


@dataclass(frozen=True, slots=True)
class Offer:
    """What the sender processes do together: each of ``flows`` for ``seconds``, split over ``senders``
    processes of its own (a live bot and a backfill job are different programs: neither's CPU
    delays the other's sends)."""

    url: str
    model: str
    flows: tuple[Flow, ...]
    seconds: float
    senders: int
    nice: int = 0


class Outcome(NamedTuple):
    """One request: its class, when it was due (s from the start), how late it was issued, its latency
    from when it was due, its code (``OK`` or the error's) and whether it was sent at all."""

    cls: str
    at_s: float
    lag_s: float
    latency_s: float
    code: str
    sent: bool
    server_s: float = float("nan")  # enqueue to the end of its model call (the reply's queue + infer)
    infer_s: float = float("nan")  # its batch's model call alone


def offer(o: Offer, start_timeout_s: float = 60.0,
          report_slack_s: float = 60.0) -> tuple[list[Outcome], float]:
    """Run the sender processes; every issued request's outcome, and when they started (wall clock).

    They have ``start_timeout_s`` together to connect, and must all report within ``report_slack_s``
    of the last deadline of the last call they make: else a ConfigError says which step failed."""
    ctx = children.context("lab.bench_overload")
    ready, gate, out, start_at = ctx.Semaphore(0), ctx.Event(), ctx.Queue(), ctx.Value("d", 0.0)
    senders = [ctx.Process(target=_sender_main, args=(o, flow, i, ready, gate, start_at, out))
               for flow in o.flows for i in range(o.senders)]
    for p in senders:
        p.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        for _ in senders:
            if not ready.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise ConfigError(f"the sender processes did not all connect within {start_timeout_s:g} s")
        start_at.value = time.time() + START_DELAY_S
        gate.set()
        wait_s = START_DELAY_S + o.seconds + max(f.timeout_s for f in o.flows) + report_slack_s
        outcomes = _collect(out, len(senders), wait_s)
    finally:
        _reap(senders, 5.0)
    return outcomes, start_at.value


def _collect(out: Any, senders: int, wait_s: float) -> list[Outcome]:
    """The outcomes of every sender, all due within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    outcomes: list[Outcome] = []
    for _ in range(senders):
        try:
            outcomes += out.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise ConfigError(f"a sender process did not report its outcomes within {wait_s:g} s") from None
    return outcomes


def _reap(processes: Sequence[Any], timeout_s: float) -> None:
    """Join ``processes`` within ``timeout_s`` in all; kill what is still running then."""
    deadline = time.monotonic() + timeout_s
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _sender_main(o: Offer, flow: Flow, index: int, ready: Any, gate: Any, start_at: Any, out: Any) -> None:
    if o.nice:
        os.nice(o.nice)
    out.put(asyncio.run(_send(o, flow, index, ready, gate, start_at)))


async def _send(o: Offer, flow: Flow, index: int, ready: Any, gate: Any, start_at: Any) -> list[Outcome]:
    x = np.random.default_rng(index).standard_normal((60, 110)).astype(np.float32)
    outcomes: list[Outcome] = []
    # Each call in flight holds a connection while it waits for its reply: size the pool for the
    # most this sender can have in flight (redis-py's asyncio default of 100 refuses the rest).
    pool = int(2 * flow.calls_per_s / o.senders * flow.timeout_s) + 2 * WARM_CONNECTIONS
    async with AsyncClient.from_url(o.url, max_connections=pool) as client:
        # Open the connections now: connecting is not what the scenario measures.
        await asyncio.gather(*(client.redis.ping() for _ in range(WARM_CONNECTIONS)))
        ready.release()
        await asyncio.to_thread(gate.wait)
        t0 = start_at.value
        await _pace(client, o, flow, index, t0, x, outcomes)
    return outcomes


def schedule(flow: Flow, seconds: float, senders: int, index: int) -> list[float]:
    """When sender ``index`` makes its share of ``flow``'s calls (s from the start): every
    ``senders / calls_per_s`` seconds, offset by ``index / calls_per_s`` so that the senders interleave."""
    period_s = senders / flow.calls_per_s
    times = ((j + index / senders) * period_s for j in range(int(seconds / period_s) + 1))
    return [t for t in times if t < seconds]


async def _pace(client: AsyncClient, o: Offer, flow: Flow, index: int, t0: float, x: np.ndarray,
                outcomes: list[Outcome]) -> None:
    """Make this sender's share of ``flow``'s calls on schedule, each its own task (open loop)."""
    tasks: set[asyncio.Task[None]] = set()
    for offset_s in schedule(flow, o.seconds, o.senders, index):
        await asyncio.sleep(max(0.0, t0 + offset_s - time.time()))  # sleep(0) still lets replies in
        task = asyncio.create_task(_call(client, o.model, flow, t0 + offset_s, t0, x, outcomes))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*list(tasks))


async def _call(client: AsyncClient, model: str, flow: Flow, due: float, t0: float, x: np.ndarray,
                outcomes: list[Outcome]) -> None:
    """One call, due at wall-clock time ``due``; the outcome of each of its requests is appended."""
    issued = time.time()
    results: list[Any]
    try:
        if flow.chunk == 1:
            results = [await client.predict(model, x, lane=flow.lane, timeout_s=flow.timeout_s)]
        else:
            results = await client.predict_many(model, [x] * flow.chunk, lane=flow.lane,
                                                timeout_s=flow.timeout_s, return_exceptions=True)
    except StreamserveError as e:  # a reply's error (predict), shed before sending, Redis unreachable
        results = [e] * flow.chunk
    done = time.time()
    outcomes.extend(Outcome(flow.cls, due - t0, issued - due, done - due, *_code(r), *_fleet_s(r))
                    for r in results)


def _fleet_s(result: object) -> tuple[float, float]:
    """Seconds an answered request spent in the fleet (queued, then its batch's model call), and in
    that model call alone."""
    if isinstance(result, Prediction):
        return (result.queue_ms + result.infer_ms) / 1000, result.infer_ms / 1000
    return float("nan"), float("nan")


def _code(result: object) -> tuple[str, bool]:
    """A result's code and whether its request was sent."""
    if isinstance(result, ReplyError):
        # The client's own shedding happens before a request id exists; a worker's reply carries one.
        return result.code, not (isinstance(result, Overloaded) and result.request_id is None)
    if isinstance(result, StreamserveError):  # Unavailable
        return type(result).__name__.upper(), True
    return "OK", True


def _percentile_ms(values_s: Sequence[float], q: float) -> float:
    return float(np.percentile(values_s, q) * 1000) if len(values_s) else float("nan")


def summarize(outcomes: Sequence[Outcome], cls: str, capacity_rps: float) -> dict[str, Any]:
    """One class's outcomes in a phase: rate offered, latency of successes, failures by code."""
    mine = [o for o in outcomes if o.cls == cls]
    if not mine:
        return {"issued": 0}
    issue_s = [o.at_s + o.lag_s for o in mine]
    span_s = max(1e-3, max(issue_s) - min(issue_s))
    ok = [o.latency_s for o in mine if o.code == "OK"]
    server = [o.server_s for o in mine if o.code == "OK"]
    infer = [o.infer_s for o in mine if o.code == "OK"]
    failed = Counter(o.code for o in mine if o.code != "OK")
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for o in sorted(mine, key=lambda o: o.at_s):
        if o.code != "OK":
            first.setdefault(o.code, o.at_s)
            last[o.code] = o.at_s
    forced = max(0.0, len(mine) - capacity_rps * span_s)  # failures a lack of capacity explains
    return {"issued": len(mine), "offered_rps": len(mine) / span_s, "span_s": span_s,
            "issue_lag_p50_ms": _percentile_ms([o.lag_s for o in mine], 50),
            "issue_lag_p99_ms": _percentile_ms([o.lag_s for o in mine], 99),
            "ok": len(ok), "success_rate": len(ok) / len(mine), "goodput_rps": len(ok) / span_s,
            "p50_ms": _percentile_ms(ok, 50), "p99_ms": _percentile_ms(ok, 99),
            "server_p50_ms": _percentile_ms(server, 50), "server_p99_ms": _percentile_ms(server, 99),
            "infer_p99_ms": _percentile_ms(infer, 99),
            "failed": dict(failed), "sent": sum(o.sent for o in mine),
            "overloaded_client": sum(1 for o in mine if o.code == OVERLOADED and not o.sent),
            "overloaded_worker": sum(1 for o in mine if o.code == OVERLOADED and o.sent),
            "first_failure_s": first, "last_failure_s": last,
            "failures_could_have_met_deadline": int(max(0.0, sum(failed.values()) - forced))}


class LoadSampler:
    """Polls the model's shard-0 load hash (what clients shed on) in a thread while a phase runs."""

    def __init__(self, url: str, model: str, interval_s: float = 0.1) -> None:
        self.client = redis.Redis.from_url(url)
        self.key, self.interval_s = keys.load_hash(model), interval_s
        self.loads: list[tuple[float, ShardLoad]] = []  # (wall-clock time read, load)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                load = ShardLoad.from_hash(self.client.hgetall(self.key))
            except redis.RedisError:
                continue
            if load is not None:
                self.loads.append((time.time(), load))

    def summary(self, t0: float) -> dict[str, Any]:
        """Largest backlog seen per lane, the median drain rate the workers published, and every
        sample from ``t0`` (wall clock) on as ``[s since t0, live backlog, backfill backlog, drain/s]``."""
        samples = [(t - t0, load) for t, load in self.loads if t >= t0]
        loads = [load for _, load in samples]
        drains = [load.drain_per_s for load in loads if load.drain_per_s > 0]
        return {"samples": len(loads),
                "max_backlog": {lane: max((load.backlog.get(lane, 0) for load in loads), default=0)
                                for lane in keys.LANES},
                "drain_per_s_median": float(np.median(drains)) if drains else 0.0,
                "timeline": [[round(t, 2), *(load.backlog.get(lane, 0) for lane in keys.LANES),
                              round(load.drain_per_s)] for t, load in samples]}

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()


def wait_drained(url: str, model: str, timeout_s: float) -> int:
    """Wait until both lanes' streams are empty (every entry answered and acked); entries left."""
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left = sum(int(client.xlen(keys.request_stream(model, 0, lane))) for lane in keys.LANES)
            if left == 0 or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)
    finally:
        client.close()


def measure_capacity(url: str, model: str, cfg: OverloadConfig) -> dict[str, Any]:
    """Closed-loop saturation with single-sample calls: the fleet's capacity, and Redis's work per request."""
    client = redis.Redis.from_url(url)
    try:
        before = read_counters(client)
        spec = LoadSpec(url, model, requests=cfg.capacity_requests, concurrency=cfg.capacity_concurrency,
                        timeout_s=cfg.capacity_timeout_s, routes=("",))
        result = run_load(spec, cfg.capacity_bots)
        used = read_counters(client) - before
    finally:
        client.close()
    return {"rps": len(result.latencies_ms) / result.elapsed_s, "p50_ms": result.percentile(50),
            "p99_ms": result.percentile(99), "n": result.requests, "errors": dict(result.errors),
            "bots": cfg.capacity_bots, "concurrency": cfg.capacity_concurrency,
            "redis": per_request(used, result.requests)}


def phases(capacity_rps: float, cfg: OverloadConfig) -> dict[str, tuple[tuple[Flow, ...], float]]:
    """The three open-loop phases: name → (flows, seconds)."""
    live = Flow("live", "live", cfg.live_share * capacity_rps, cfg.live_timeout_s)
    backfill = Flow("backfill", "backfill", cfg.backfill_share * capacity_rps, cfg.backfill_timeout_s,
                    cfg.backfill_chunk)
    return {"unloaded": ((Flow("live", "live", cfg.unloaded_share * capacity_rps, cfg.live_timeout_s),),
                         cfg.unloaded_s),
            "lanes": ((live, backfill), cfg.loaded_s),
            "no_lanes": ((live, replace(backfill, lane="live")), cfg.loaded_s)}


def run_phase(url: str, model: str, flows: tuple[Flow, ...], seconds: float, cfg: OverloadConfig,
              capacity_rps: float) -> dict[str, Any]:
    """Offer ``flows`` for ``seconds``, then wait until the streams are drained; the phase's numbers."""
    with LoadSampler(url, model) as sampler:
        outcomes, t0 = offer(Offer(url, model, flows, seconds, cfg.senders, cfg.sender_nice),
                             cfg.start_timeout_s, cfg.report_slack_s)
    started = time.monotonic()
    left = wait_drained(url, model, cfg.drain_timeout_s)
    classes = {flow.cls: summarize(outcomes, flow.cls, capacity_rps) for flow in flows}
    for flow in flows:  # every request the schedule called for, whether or not it has an outcome
        classes[flow.cls]["scheduled"] = flow.chunk * sum(len(schedule(flow, seconds, cfg.senders, i))
                                                          for i in range(cfg.senders))
    span_s = max(c["span_s"] for c in classes.values())
    return {"seconds": seconds, "flows": [asdict(f) for f in flows], "classes": classes,
            "goodput_rps": sum(c["ok"] for c in classes.values()) / span_s, "load": sampler.summary(t0),
            "drain_s": time.monotonic() - started, "left_in_streams": left}


def run_overload(settings: Settings, model: str, processes: int, fleet_args: Sequence[str],
                 cfg: OverloadConfig, progress: Callable[[str], object] = print,
                 fleet_cores: set[int] | None = None) -> dict[str, Any]:
    """The four phases against a fleet serving ``model`` (registered and in Production on
    ``settings.redis_url``, one shard); the ``overload`` section of the bench's document.
    With ``fleet_cores`` the fleet runs on those cores only (the caller keeps the rest off them)."""
    url = settings.redis_url
    fleet = Fleet(settings, model, processes, *fleet_args).start(cfg.start_timeout_s)
    try:
        if fleet_cores and fleet.process is not None:
            pin(fleet.process.pid, fleet_cores)
        progress(f"overload: capacity, {cfg.capacity_bots} clients x {cfg.capacity_concurrency} "
                 "single-sample calls …")
        capacity = measure_capacity(url, model, cfg)
        if not capacity["rps"] > 0:
            raise ConfigError(f"overload: no capacity measured ({capacity['errors']})")
        runs = {}
        for name, (flows, seconds) in phases(capacity["rps"], cfg).items():
            rates = ", ".join(f"{f.cls} {f.rate_rps:.0f}/s on {f.lane}" for f in flows)
            progress(f"overload: {name}, {rates}, {cfg.senders} senders each, {seconds:.0f} s …")
            runs[name] = run_phase(url, model, flows, seconds, cfg, capacity["rps"])
    finally:
        fleet.stop(cfg.drain_timeout_s)
    return {"config": asdict(cfg), "processes": processes, "capacity": capacity, **runs,
            "ratios": ratios(runs, capacity["rps"]), "targets": TARGETS}


def ratios(runs: dict[str, Any], capacity_rps: float) -> dict[str, float]:
    """The numbers to judge the scenario by."""
    unloaded, lanes, plain = (runs[n]["classes"]["live"] for n in ("unloaded", "lanes", "no_lanes"))
    return {"live_p99_loaded_vs_unloaded": lanes["p99_ms"] / unloaded["p99_ms"],
            "live_server_p99_loaded_vs_unloaded": lanes["server_p99_ms"] / unloaded["server_p99_ms"],
            "live_p50_loaded_vs_unloaded": lanes["p50_ms"] / unloaded["p50_ms"],
            "no_lanes_live_p99_vs_unloaded": plain["p99_ms"] / unloaded["p99_ms"],
            "live_success_lanes": lanes["success_rate"], "live_success_no_lanes": plain["success_rate"],
            "live_failures_could_have_met_deadline": lanes["failures_could_have_met_deadline"],
            "no_lanes_live_failures_could_have_met_deadline": plain["failures_could_have_met_deadline"],
            "goodput_vs_capacity_lanes": runs["lanes"]["goodput_rps"] / capacity_rps,
            "goodput_vs_capacity_no_lanes": runs["no_lanes"]["goodput_rps"] / capacity_rps}


def print_overload(section: dict[str, Any]) -> None:
    """The overload scenario as a table, then the ratios against their targets."""
    cap, cfg = section["capacity"], section["config"]
    table = Table(title=f"overload scenario — capacity C = {cap['rps']:.0f}/s "
                        f"({section['processes']} workers, single-sample calls), "
                        f"deadlines live {cfg['live_timeout_s'] * 1000:.0f} ms, "
                        f"backfill {cfg['backfill_timeout_s'] * 1000:.0f} ms"
                        + ("; the fleet on a core of its own" if section.get("pinned") else ""))
    for col in ("run / class", "target/s", "offered/s", "p50 ms", "p99 ms", "success", "OVERLOADED client",
                "OVERLOADED worker", "DEADLINE_EXCEEDED", "other", "goodput/s"):
        table.add_column(col, justify="left" if col == "run / class" else "right")
    for run in ("unloaded", "lanes", "no_lanes"):
        for flow in section[run]["flows"]:
            table.add_row(*_row(run, flow, section[run]["classes"][flow["cls"]]))
    Console(width=max(Console().width, WIDE)).print(table)
    r = section["ratios"]
    print(f"live p99 loaded / unloaded = {r['live_p99_loaded_vs_unloaded']:.2f} (target <= 2); "
          f"p50 {r['live_p50_loaded_vs_unloaded']:.2f}; "
          f"without lanes p99 {r['no_lanes_live_p99_vs_unloaded']:.2f}")
    u, ln = section["unloaded"]["classes"]["live"], section["lanes"]["classes"]["live"]
    print(f"where live time goes (p99 ms, unloaded -> lanes): in the fleet (queue + model call) "
          f"{u['server_p99_ms']:.1f} -> {ln['server_p99_ms']:.1f} "
          f"(x{r['live_server_p99_loaded_vs_unloaded']:.2f}; its model call alone {u['infer_p99_ms']:.1f} -> "
          f"{ln['infer_p99_ms']:.1f}); senders issuing late "
          f"{u['issue_lag_p99_ms']:.1f} -> {ln['issue_lag_p99_ms']:.1f}")
    print(f"live success {r['live_success_lanes']:.1%} with lanes, {r['live_success_no_lanes']:.1%} without; "
          f"live failures that could have met their deadline: {r['live_failures_could_have_met_deadline']} "
          f"(target 0), without lanes {r['no_lanes_live_failures_could_have_met_deadline']}")
    print(f"goodput / C = {r['goodput_vs_capacity_lanes']:.2f} with lanes, "
          f"{r['goodput_vs_capacity_no_lanes']:.2f} without; workers' drain rate "
          f"{section['lanes']['load']['drain_per_s_median']:.0f}/s with lanes (the median they published)")


def _row(run: str, flow: dict[str, Any], c: dict[str, Any]) -> list[str]:
    failed = dict(c.get("failed", {}))
    failed.pop(OVERLOADED, 0)
    deadline = failed.pop("DEADLINE_EXCEEDED", 0)
    lane = "" if flow["lane"] == flow["cls"] else f" (on {flow['lane']})"
    return [f"{run}: {flow['cls']}{lane}", f"{flow['rate_rps']:.0f}", f"{c.get('offered_rps', 0):.0f}",
            f"{c.get('p50_ms', float('nan')):.2f}", f"{c.get('p99_ms', float('nan')):.2f}",
            f"{c.get('success_rate', 0):.1%}", str(c.get("overloaded_client", 0)),
            str(c.get("overloaded_worker", 0)), str(deadline), str(sum(failed.values())),
            f"{c.get('goodput_rps', 0):.0f}"]
