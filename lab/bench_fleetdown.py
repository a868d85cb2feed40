"""``streamserve bench``'s fleet-down scenario: Redis memory while no worker reads a model's stream.

The fleet is started (so the consumer group exists) and stopped; then paced bots keep
sending at ``rate_rps`` with ``fail_fast=False`` (they queue although nobody serves)
for ``seconds``. Every XADD carries ``MINID ~`` at the server's clock minus the clients'
``max_timeout_s``, so the stream should hold at most ``rate × max_timeout_s`` entries,
whatever the fleet does. Redis ``used_memory`` and the stream lengths are sampled every
``sample_s``; the peak is compared with the bound

    baseline + rate × max_timeout_s × entry bytes × ALLOC_FACTOR + one stream node of slack

(``ALLOC_FACTOR`` covers jemalloc's size classes and the stream's own structures; ``~``
trims whole stream nodes, hence the node of slack). A ``maxmemory`` of a few times the
bound keeps a stream that is not trimmed from taking the machine: Redis then refuses the
XADDs (``Overloaded``), which the section reports. Then the fleet is started again and
the time until the streams are empty (each entry answered or expired) is measured.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import redis

from lab.fleet import Fleet
from producer import Client
from protocol import keys, messages, sharding
from protocol.settings import Settings

ALLOC_FACTOR = 1.25  # used_memory per payload byte of a stream entry: allocator classes, listpack, rax
STREAM_NODE_MAX_ENTRIES = 100  # Redis' stream-node-max-entries: what MINID ~ may leave untrimmed
MAXMEMORY_SAFETY = 4.0  # maxmemory = this × the bound (at least MIN_MAXMEMORY_BYTES)
MIN_MAXMEMORY_BYTES = 256 << 20


@dataclass(frozen=True, slots=True)
class FleetDownConfig:
    """The offered load and how long the fleet stays down."""

    rate_rps: float = 1000.0
    seconds: float = 60.0
    max_timeout_s: float = 10.0  # the clients' bound on a timeout, hence on an entry's age
    call_timeout_s: float = 0.05  # each call's own deadline (no reply comes: it ends there)
    senders: int = 4
    batch: int = 50  # requests per predict_many call (one pipelined round trip)
    sample_s: float = 1.0
    drain_timeout_s: float = 120.0

    @classmethod
    def from_args(cls, args: Any) -> FleetDownConfig:
        """From ``streamserve bench``'s flags (defaults where a flag is not wired)."""
        names = {"rate_rps": "fleetdown_rate", "seconds": "fleetdown_seconds",
                 "max_timeout_s": "fleetdown_max_timeout_s"}
        return cls(**{f: getattr(args, a) for f, a in names.items() if getattr(args, a, None) is not None})


@dataclass
class Senders:
    """Paced bot threads sending ``predict_many`` calls that nobody answers."""

    url: str
    model: str
    cfg: FleetDownConfig
    features: np.ndarray
    stop: threading.Event = field(default_factory=threading.Event)
    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> list[threading.Thread]:
        """Start the senders; they stop when ``stop`` is set."""
        threads = [threading.Thread(target=self._loop, args=(i,), daemon=True)
                   for i in range(self.cfg.senders)]
        for t in threads:
            t.start()
        return threads

    def _client(self) -> Client:
        extra: dict[str, Any] = {}
        params = inspect.signature(Client).parameters
        if "fail_fast" in params:
            extra["fail_fast"] = False
        if "max_timeout_s" in params:
            extra["max_timeout_s"] = self.cfg.max_timeout_s
        return Client.from_url(self.url, timeout_s=self.cfg.call_timeout_s, **extra)

    def _loop(self, i: int) -> None:
        period_s = self.cfg.batch * self.cfg.senders / self.cfg.rate_rps
        next_at = time.monotonic() + period_s * i / self.cfg.senders  # interleaved
        batch = [self.features] * self.cfg.batch
        with self._client() as client:
            while not self.stop.wait(max(0.0, next_at - time.monotonic())):
                next_at += period_s
                self._call(client, batch)

    def _call(self, client: Client, batch: list[np.ndarray]) -> None:
        try:
            results: Sequence[Any] = client.predict_many(self.model, batch, return_exceptions=True)
            codes = Counter("OK" if not isinstance(r, Exception) else type(r).__name__ for r in results)
        except Exception as e:  # Overloaded (maxmemory) or Unavailable: the whole call, counted
            codes = Counter({type(e).__name__: len(batch)})
        with self.lock:
            self.sent += len(batch)
            self.outcomes.update(codes)


def request_streams(client: redis.Redis, model: str) -> list[str]:
    """Every request stream of the model: each shard ever used, each lane."""
    highest = sharding.read_layout(client, model).highest
    return [keys.request_stream(model, k, lane) for k in range(highest) for lane in keys.LANES]


def sample(client: redis.Redis, streams: list[str], t0: float) -> dict[str, float]:
    """One reading: seconds since ``t0``, ``used_memory``, entries in the streams, oldest entry's age."""
    pipe = client.pipeline(transaction=False)
    pipe.info("memory")
    pipe.time()
    for s in streams:
        pipe.xrange(s, count=1)
    memory, (now_s, now_us), *firsts = pipe.execute()
    lengths = [client.xlen(s) for s in streams]
    now_ms = now_s * 1000 + now_us / 1000
    oldest = [now_ms - int(f[0][0].split(b"-")[0]) for f in firsts if f]
    return {"t_s": time.monotonic() - t0, "used_memory": int(memory["used_memory"]),
            "entries": sum(lengths), "oldest_entry_s": max(oldest, default=0.0) / 1000}


def entry_bytes(features: np.ndarray) -> int:
    """Payload bytes of one request entry (field names and values) as the client sends it."""
    fields = messages.encode_request("0" * 32, {"features": features[np.newaxis]},
                                     deadline_ms=int(time.time() * 1000), reply_to="0" * 32)
    return sum(len(_raw(k)) + len(_raw(v)) for k, v in fields.items())


def _raw(value: object) -> bytes:
    """A field name or value as it goes on the wire (numbers as their decimal text)."""
    return value if isinstance(value, bytes) else str(value).encode()


def bound_bytes(baseline: int, rate_rps: float, cfg: FleetDownConfig, size: int) -> int:
    """What ``used_memory`` should stay under at ``rate_rps``."""
    return int(baseline + (rate_rps * cfg.max_timeout_s + STREAM_NODE_MAX_ENTRIES) * size * ALLOC_FACTOR)


def run_fleetdown(settings: Settings, model: str, processes: int, fleet_args: Sequence[str],
                  cfg: FleetDownConfig, progress: Callable[[str], object] = print,
                  features: np.ndarray | None = None) -> dict[str, Any]:
    """Fleet down under load, then back: the JSON section (``model`` registered and in Production)."""
    x = np.random.default_rng(3).standard_normal((60, 110)).astype("<f4") if features is None else features
    client = redis.Redis.from_url(settings.redis_url)
    try:
        progress(f"fleet down: starting and stopping {processes} workers (the group exists, nobody reads) …")
        with Fleet(settings, model, processes, *fleet_args):
            pass
        streams = request_streams(client, model)
        size, baseline = entry_bytes(x), int(client.info("memory")["used_memory"])
        cap = max(MIN_MAXMEMORY_BYTES, int(MAXMEMORY_SAFETY * bound_bytes(baseline, cfg.rate_rps, cfg, size)))
        old_cap = str(client.config_get("maxmemory").get("maxmemory") or 0)
        client.config_set("maxmemory", cap)
        try:
            down = _load_while_down(client, settings.redis_url, model, streams, cfg, x, progress)
        finally:
            client.config_set("maxmemory", old_cap)
        progress("fleet down: the fleet comes back …")
        back = _drain(client, settings, model, processes, fleet_args, streams, cfg)
    finally:
        client.close()
    bound = bound_bytes(baseline, down["achieved_rps"], cfg, size)
    return {"config": asdict(cfg), "processes": processes, "entry_bytes": size, "baseline_bytes": baseline,
            "maxmemory_bytes": cap, "bound_bytes": bound, "within_bound": down["peak_bytes"] <= bound,
            "expected_entries": down["achieved_rps"] * cfg.max_timeout_s, **down, "back": back}


def _load_while_down(client: redis.Redis, url: str, model: str, streams: list[str], cfg: FleetDownConfig,
                     x: np.ndarray, progress: Callable[[str], object]) -> dict[str, Any]:
    """Send for ``cfg.seconds`` with nobody reading; samples and what the senders saw."""
    progress(f"fleet down: {cfg.rate_rps:g} requests/s for {cfg.seconds:g} s, max_timeout_s "
             f"{cfg.max_timeout_s:g} …")
    senders = Senders(url, model, cfg, x)
    t0 = time.monotonic()
    threads = senders.run()
    samples = []
    while time.monotonic() - t0 < cfg.seconds:
        samples.append(sample(client, streams, t0))
        time.sleep(max(0.0, cfg.sample_s - (time.monotonic() - t0 - samples[-1]["t_s"])))
    senders.stop.set()
    for t in threads:
        t.join(cfg.call_timeout_s + 30)
    elapsed_s = time.monotonic() - t0
    samples.append(sample(client, streams, t0))
    return {"elapsed_s": elapsed_s, "sent": senders.sent, "achieved_rps": senders.sent / elapsed_s,
            "outcomes": dict(senders.outcomes), "peak_bytes": max(s["used_memory"] for s in samples),
            "peak_entries": max(s["entries"] for s in samples),
            "peak_oldest_entry_s": max(s["oldest_entry_s"] for s in samples), "end": samples[-1],
            "samples": samples}


def _drain(client: redis.Redis, settings: Settings, model: str, processes: int, fleet_args: Sequence[str],
           streams: list[str], cfg: FleetDownConfig) -> dict[str, Any]:
    """Start the fleet again; seconds until it is up and until every stream is empty."""
    t0 = time.monotonic()
    with Fleet(settings, model, processes, *fleet_args):
        ready_s = time.monotonic() - t0
        left = sample(client, streams, t0)
        while left["entries"] and time.monotonic() - t0 < cfg.drain_timeout_s:
            time.sleep(0.05)
            left = sample(client, streams, t0)
        drained_s = time.monotonic() - t0
    return {"fleet_ready_s": ready_s, "empty_s": drained_s if left["entries"] == 0 else None,
            "empty_after_ready_s": drained_s - ready_s if left["entries"] == 0 else None,
            "entries_left": left["entries"], "used_memory_after": left["used_memory"]}


def print_fleetdown(section: dict[str, Any]) -> None:
    """The scenario in a few lines."""
    cfg, mb = section["config"], 1 / 1e6
    print(f"fleet down ({section['processes']} workers stopped): {section['achieved_rps']:.0f} requests/s "
          f"achieved ({cfg['rate_rps']:g} asked) for {section['elapsed_s']:.0f} s, entries of "
          f"{section['entry_bytes'] / 1e3:.1f} KB, clients' max_timeout_s {cfg['max_timeout_s']:g}; "
          f"outcomes {section['outcomes']}")
    print(f"  Redis used_memory: baseline {section['baseline_bytes'] * mb:.1f} MB, peak "
          f"{section['peak_bytes'] * mb:.1f} MB, bound {section['bound_bytes'] * mb:.1f} MB "
          f"({'within' if section['within_bound'] else 'OVER'}); stream entries peak "
          f"{section['peak_entries']} (rate x max_timeout_s = {section['expected_entries']:.0f}), "
          f"oldest entry at most {section['peak_oldest_entry_s']:.1f} s old")
    back = section["back"]
    empty = "never" if back["empty_s"] is None else f"{back['empty_after_ready_s']:.2f} s after it was up"
    print(f"  fleet back: up in {back['fleet_ready_s']:.2f} s, streams empty {empty} "
          f"({back['entries_left']} entries left, used_memory {back['used_memory_after'] * mb:.1f} MB)")
