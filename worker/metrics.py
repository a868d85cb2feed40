"""Prometheus metrics of a worker, and one HTTP endpoint per process or pod: /metrics, /healthz, /readyz.

A worker process keeps one :class:`WorkerMetrics` (its ``CollectorRegistry``
and every metric family) and takes a :class:`ModelMetrics` view of it for each
model it serves (:meth:`WorkerMetrics.model`): the view's series carry
``model=<name>``. A lone worker serves its registry itself
(:func:`start_metrics` with ``metrics_port``). Under ``--processes N`` the
supervisor gives the children a fresh directory in ``PROMETHEUS_MULTIPROC_DIR``
before spawning them: prometheus-client then keeps each child's values in
files there, the children serve nothing, and the supervisor serves the merged
view (:class:`FleetMetrics`) on the one port.

How each gauge merges across children (prometheus-client's ``multiprocess_mode``;
``live…`` modes drop a child's values when the supervisor reports it dead):

- stream lag/pending and the Production version are facts about the shared
  stream and registry that every child reads: ``livemostrecent``, the freshest
  reading wins (a rollback shows at once, where ``max`` would hide it).
- the version served is each child's own: ``liveall`` keeps one series per
  child (a ``pid`` label is added), so an alert sees a single stale child. So
  does ``streamserve_model_info``, the version served with its registry label.
- everything else a child says about itself carries ``worker_id`` already:
  ``livemax``, one series per worker, gone when it dies. That is worker info,
  readiness (per model and per process), the last loop tick, and the model
  cache (loaded, memory, last load time, the cache's total and budget). The
  supervisor reads the tick and readiness back to answer its own probes.

Counters and histograms are summed over children, dead ones included, so
totals never go backwards when a child is restarted.

The loop tick is labelled ``(model, worker_id)`` for the dashboards that
already read it: :meth:`WorkerMetrics.tick` publishes it for every model the
process has registered, so a child is stale for the supervisor when its loop
is, whichever model is busy. A process with no model registered has no tick
series; the supervisor then only checks that it runs.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app, values
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from protocol.errors import ConfigError

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

    from prometheus_client.samples import Sample

    from protocol.settings import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own switch, read when it is imported
LIVENESS_STALE_S = 30.0  # /healthz fails when the loop has not ticked for this long
TICK_PUBLISH_INTERVAL_S = 1.0  # the tick gauge is a file write under a supervisor: not on every loop
ROW_BUCKETS = tuple(float(2**i) for i in range(13))  # 1, 2, 4 … 4096 rows
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0)
LOAD_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                  30.0, 60.0)  # a model's load: a tiny tree in 1 ms, a large network in a minute
READY_METRIC = "streamserve_worker_ready"  # per model
PROCESS_READY_METRIC = "streamserve_worker_process_ready"
TICK_METRIC = "streamserve_worker_last_tick_timestamp_seconds"
LOADED_STATE = "loaded"  # the cache state (as in the heartbeat) in which a model counts as loaded

M = TypeVar("M", bound=MetricWrapperBase)


class HealthSource(Protocol):
    """What :func:`serve_http` serves: a registry to expose and the two probes."""

    @property
    def registry(self) -> CollectorRegistry:
        """What GET /metrics exposes."""
        ...

    def is_live(self) -> bool:
        """GET /healthz answers 200 when true, else 503."""
        ...

    def is_ready(self, model: str | None = None) -> bool:
        """GET /readyz (``model`` None) or /readyz?model=M answers 200 when true, else 503."""
        ...


class _Children(Generic[M]):
    """A metric's children by label values after ``model``, cached.

    ``labels()`` validates and takes a lock on every call; a dict lookup is a
    fraction of that, and these calls are on the per-batch path.
    """

    __slots__ = ("_cache", "_metric", "_model")

    def __init__(self, metric: M, model: str) -> None:
        self._metric, self._model = metric, model
        self._cache: dict[tuple[object, ...], M] = {}

    def get(self, *label_values: object) -> M:
        """The child for these label values (``str()`` is applied by prometheus-client)."""
        child = self._cache.get(label_values)
        if child is None:
            child = self._cache[label_values] = self._metric.labels(self._model, *label_values)
        return child


class _Families:
    """Every metric family of one registry, each defined once: per-model series are its children."""

    def __init__(self, reg: CollectorRegistry) -> None:
        self._traffic(reg)
        self._fleet(reg)
        self._worker(reg)
        self._cache(reg)

    def _traffic(self, reg: CollectorRegistry) -> None:
        self.requests = Counter(
            "streamserve_requests_total", "Requests answered, by the version and variant that answered "
            "and the reply code (OK or an error code)", ["model", "version", "variant", "code"], registry=reg)
        self.batch_rows = Histogram("streamserve_batch_rows", "Rows per model call", ["model"],
                                    buckets=ROW_BUCKETS, registry=reg)
        self.queue = Histogram(
            "streamserve_queue_seconds", "Time from a request's enqueue to the start of its batch",
            ["model", "lane"], buckets=LATENCY_BUCKETS_S, registry=reg)
        self.inference = Histogram("streamserve_inference_seconds", "Duration of one model call",
                                   ["model", "version"], buckets=LATENCY_BUCKETS_S, registry=reg)

    def _fleet(self, reg: CollectorRegistry) -> None:
        self.lag = Gauge("streamserve_stream_lag", "Entries of a stream not yet read by the consumer group",
                         ["model", "shard", "lane"], multiprocess_mode="livemostrecent", registry=reg)
        self.pending = Gauge(
            "streamserve_stream_pending", "Entries read by the consumer group and not yet acknowledged",
            ["model", "shard", "lane"], multiprocess_mode="livemostrecent", registry=reg)
        self.reclaimed = Counter("streamserve_reclaimed_total", "Entries taken over from other consumers",
                                 ["model"], registry=reg)
        self.dead_letters = Counter("streamserve_dead_letters_total", "Entries moved to the dead letters",
                                    ["model"], registry=reg)
        self.replayed = Counter(
            "streamserve_replayed_total", "Re-sent requests answered from their stored reply, uncomputed",
            ["model"], registry=reg)
        self.loads = Counter("streamserve_model_loads_total", "Model version loads, by result (ok or failed)",
                             ["model", "version", "result"], registry=reg)
        self.production = Gauge(
            "streamserve_production_version", "The registry's Production version (NaN: none)", ["model"],
            multiprocess_mode="livemostrecent", registry=reg)

    def _worker(self, reg: CollectorRegistry) -> None:
        self.served = Gauge("streamserve_served_version", "The version this worker serves (NaN: none)",
                            ["model"], multiprocess_mode="liveall", registry=reg)
        self.info = Gauge("streamserve_worker_info", "A live worker process (always 1)",
                          ["model", "worker_id"], multiprocess_mode="livemax", registry=reg)
        self.model_info = Gauge(
            "streamserve_model_info", "The version this worker serves, with its registry label (\"\": none); "
            "1 while served, 0 for a version served before", ["model", "version", "label"],
            multiprocess_mode="liveall", registry=reg)
        self.ready = Gauge(READY_METRIC, "1 while the model is loaded here and Redis answers",
                           ["model", "worker_id"], multiprocess_mode="livemax", registry=reg)
        self.process_ready = Gauge(PROCESS_READY_METRIC, "1 while this worker process says it can serve",
                                   ["worker_id"], multiprocess_mode="livemax", registry=reg)
        self.tick = Gauge(TICK_METRIC, "When the worker loop last turned (Unix time)", ["model", "worker_id"],
                          multiprocess_mode="livemax", registry=reg)

    def _cache(self, reg: CollectorRegistry) -> None:
        self.loaded = Gauge("streamserve_model_loaded", "1 while the model is loaded in this worker, else 0",
                            ["model", "worker_id"], multiprocess_mode="livemax", registry=reg)
        self.memory = Gauge("streamserve_model_memory_bytes", "Measured size of the loaded model (0: not "
                            "loaded or unknown)", ["model", "worker_id"], multiprocess_mode="livemax",
                            registry=reg)
        self.last_load = Gauge(
            "streamserve_model_last_load_timestamp_seconds", "When the model last finished loading here "
            "(Unix time; NaN: never)", ["model", "worker_id"], multiprocess_mode="livemax", registry=reg)
        self.load_seconds = Histogram("streamserve_model_load_seconds", "Duration of one finished model load",
                                      ["model"], buckets=LOAD_BUCKETS_S, registry=reg)
        self.evictions = Counter("streamserve_model_evictions_total", "Models evicted from a worker's cache",
                                 ["model"], registry=reg)
        self.cache_bytes = Gauge("streamserve_cache_bytes", "Sum of the measured sizes of the loaded models",
                                 ["worker_id"], multiprocess_mode="livemax", registry=reg)
        self.cache_budget = Gauge("streamserve_cache_budget_bytes", "The model cache's memory budget "
                                  "(0: no budget)", ["worker_id"], multiprocess_mode="livemax", registry=reg)


class ModelMetrics:
    """One model's series in a worker process (label ``model=name``); the worker reports into it.

    Made by :meth:`WorkerMetrics.model`. Every method is cheap enough for the
    per-batch path (about 1-4 µs, label children cached); ``stream``,
    ``serving`` and ``cache`` are meant to be called periodically.
    """

    def __init__(self, families: _Families, name: str, worker_id: str) -> None:
        self.name, self.worker_id = name, worker_id
        self._f = families
        self._requests = _Children(families.requests, name)
        self._batch_rows = families.batch_rows.labels(name)
        self._queue = _Children(families.queue, name)
        self._inference = _Children(families.inference, name)
        self._lag, self._pending = _Children(families.lag, name), _Children(families.pending, name)
        self._reclaimed = families.reclaimed.labels(name)
        self._dead_letters = families.dead_letters.labels(name)
        self._replayed = families.replayed.labels(name)
        self._loads = _Children(families.loads, name)
        self._production, self._served = families.production.labels(name), families.served.labels(name)
        self._info_key: tuple[str, str] | None = None
        self._ready_gauge = families.ready.labels(name, worker_id)
        self._ready = False
        self._load_seconds = families.load_seconds.labels(name)
        self._evictions = families.evictions.labels(name)
        self._loaded, self._memory, self._last_load = (
            g.labels(name, worker_id) for g in (families.loaded, families.memory, families.last_load))
        self._start()

    def _start(self) -> None:
        """Every per-model series of this worker exists from registration on, with "nothing yet"."""
        self._f.info.labels(self.name, self.worker_id).set(1)
        self.serving(None, None)
        self.ready(False)
        self.cache("cold", 0, None)

    def requests(self, version: str, variant: str, code: str, n: int = 1) -> None:
        """``n`` requests answered with ``code`` ("OK" or an error code)."""
        self._requests.get(version, variant, code).inc(n)

    def queue_wait(self, lane: str, seconds: float) -> None:
        """One request's wait from enqueue to the start of its batch."""
        self._queue.get(lane).observe(seconds)

    def inference(self, version: str, rows: int, seconds: float) -> None:
        """One model call: its rows and duration."""
        self._batch_rows.observe(rows)
        self._inference.get(version).observe(seconds)

    def stream(self, shard: int, lane: str, lag: int, pending: int) -> None:
        """A stream's consumer-group lag and pending count, as last measured."""
        self._lag.get(shard, lane).set(lag)
        self._pending.get(shard, lane).set(pending)

    def reclaimed(self, n: int) -> None:
        """``n`` entries taken over from other (dead or stuck) consumers."""
        self._reclaimed.inc(n)

    def replayed(self, n: int) -> None:
        """``n`` re-sent requests answered from their marker (no model call)."""
        self._replayed.inc(n)

    def dead_lettered(self, n: int) -> None:
        """``n`` entries moved to the dead letters."""
        self._dead_letters.inc(n)

    def model_load(self, version: str, ok: bool) -> None:
        """A load of ``version`` finished, or failed."""
        self._loads.get(version, "ok" if ok else "failed").inc()

    def load_seconds(self, seconds: float) -> None:
        """A load finished after ``seconds`` (observe once per finished load)."""
        self._load_seconds.observe(seconds)

    def evicted(self) -> None:
        """The model was evicted from this worker's cache."""
        self._evictions.inc()

    def cache(self, state: str, size_bytes: int, loaded_at_s: float | None) -> None:
        """The model's cache entry here: its state (as in the heartbeat: "cold", "loading", "loaded",
        "evicted", "failed"), measured size (0: not loaded or unknown) and last load's end (Unix time;
        None: never loaded)."""
        self._loaded.set(1 if state == LOADED_STATE else 0)
        self._memory.set(size_bytes)
        self._last_load.set(math.nan if loaded_at_s is None else loaded_at_s)

    def serving(self, version: int | None, production: int | None, label: str = "") -> None:
        """The version served (and its ``label``) and the registry's Production version; None (NaN)
        when unknown."""
        self._served.set(math.nan if version is None else version)
        self._production.set(math.nan if production is None else production)
        key = None if version is None else (str(version), label)
        if key != self._info_key:
            self._served_info(key)

    def _served_info(self, key: tuple[str, str] | None) -> None:
        if self._info_key is not None:
            # Under a supervisor a removed series stays in the child's file: 0 says "no longer served".
            self._f.model_info.labels(self.name, *self._info_key).set(0)
            if not multiprocess_mode():
                self._f.model_info.remove(self.name, *self._info_key)
        if key is not None:
            self._f.model_info.labels(self.name, *key).set(1)
        self._info_key = key

    def ready(self, ok: bool) -> None:
        """Whether this model can be served here: it is loaded and Redis answers."""
        self._ready = ok
        self._ready_gauge.set(1 if ok else 0)

    def is_ready(self) -> bool:
        """What :meth:`ready` last reported."""
        return self._ready


class WorkerMetrics:
    """One worker process's metrics: its registry, every family, and a :class:`ModelMetrics` per model.

    The process-level probes live here: the loop's :meth:`tick` and the
    worker's own verdict on whether it can serve (:meth:`ready`).
    """

    def __init__(self, worker_id: str, registry: CollectorRegistry | None = None) -> None:
        self.worker_id = worker_id
        self._registry = registry if registry is not None else CollectorRegistry()
        self._families = _Families(self._registry)
        self.stale_after_s = LIVENESS_STALE_S
        self.server: MetricsServer | None = None
        self._models: dict[str, ModelMetrics] = {}
        self._ticks: tuple[Gauge, ...] = ()  # replaced, never mutated: tick() may run in another thread
        self._lock = threading.Lock()
        self._ready = False
        self._last_tick_s, self._next_tick_publish_s = time.monotonic(), 0.0
        self._process_ready = self._families.process_ready.labels(worker_id)
        self.ready(False)
        self.cache_totals(0, 0)
        self.tick()

    @property
    def registry(self) -> CollectorRegistry:
        """This process's registry (what its own /metrics exposes when not supervised)."""
        return self._registry

    def model(self, name: str) -> ModelMetrics:
        """The series of model ``name``, made (and its tick published) on first call, then cached."""
        found = self._models.get(name)
        if found is not None:
            return found
        with self._lock:
            if name not in self._models:
                tick = self._families.tick.labels(name, self.worker_id)
                tick.set(time.time())  # a fresh child reads 0 to the supervisor: stale at once
                self._ticks = (*self._ticks, tick)
                self._models[name] = ModelMetrics(self._families, name, self.worker_id)
            return self._models[name]

    def cache_totals(self, used_bytes: int, budget_bytes: int) -> None:
        """The model cache's total: the sum of the loaded models' sizes, and its budget (0: none)."""
        self._families.cache_bytes.labels(self.worker_id).set(used_bytes)
        self._families.cache_budget.labels(self.worker_id).set(budget_bytes)

    def tick(self) -> None:
        """The loop is alive: call it every iteration, backoff waits included (Redis down is not dead)."""
        now_s = time.monotonic()
        self._last_tick_s = now_s
        if now_s >= self._next_tick_publish_s:
            self._next_tick_publish_s = now_s + TICK_PUBLISH_INTERVAL_S
            wall_s = time.time()
            for gauge in self._ticks:
                gauge.set(wall_s)

    def ready(self, ok: bool) -> None:
        """Whether this worker process can serve, as the worker decides (plain /readyz)."""
        self._ready = ok
        self._process_ready.set(1 if ok else 0)

    def is_live(self) -> bool:
        """The loop ticked within ``stale_after_s``."""
        return time.monotonic() - self._last_tick_s < self.stale_after_s

    def is_ready(self, model: str | None = None) -> bool:
        """What :meth:`ready` last reported; with ``model``, what that model's ``ready`` last reported
        (False for a model never registered)."""
        if model is None:
            return self._ready
        found = self._models.get(model)
        return found is not None and found.is_ready()

    def close(self) -> None:
        """Stop this process's HTTP endpoint, if it has one."""
        if self.server is not None:
            self.server.close()
            self.server = None


class FleetMetrics:
    """The supervisor's view: its children's metric files merged, and probes for the whole pod."""

    def __init__(self, path: str, children_alive: Callable[[], bool]) -> None:
        self.path, self._children_alive = path, children_alive
        self._registry = CollectorRegistry()
        self._collector = MultiProcessCollector(self._registry, path=path)
        self.stale_after_s = LIVENESS_STALE_S

    @property
    def registry(self) -> CollectorRegistry:
        """Every child's metrics, merged."""
        return self._registry

    def _samples(self, name: str) -> list[Sample]:
        return [s for m in self._collector.collect() if m.name == name for s in m.samples]

    def _values(self, name: str) -> list[float]:
        return [s.value for s in self._samples(name)]

    def is_live(self) -> bool:
        """Every child is running and no child's loop is stale."""
        if not self._children_alive():
            return False
        oldest_s = time.time() - self.stale_after_s
        return all(tick_s >= oldest_s for tick_s in self._values(TICK_METRIC))

    def is_ready(self, model: str | None = None) -> bool:
        """At least one child reported itself ready; with ``model``, reported that model ready."""
        if model is None:
            return any(v >= 1 for v in self._values(PROCESS_READY_METRIC))
        return any(s.value >= 1 for s in self._samples(READY_METRIC) if s.labels.get("model") == model)

    def child_exited(self, pid: int) -> None:
        """Drop a dead child's ``live…`` gauges (its counters stay in the totals)."""
        mark_process_dead(pid, self.path)


def multiprocess_mode() -> bool:
    """True in a supervised child: prometheus-client keeps values in ``PROMETHEUS_MULTIPROC_DIR``."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


@contextlib.contextmanager
def multiprocess_dir() -> Iterator[str]:
    """A fresh directory for the children's metric files, exported to processes spawned inside.

    prometheus-client reads the variable once, at import, so it must be in the
    environment the children start with. Removed, and the variable restored, on exit.
    """
    previous = os.environ.get(MULTIPROC_ENV)
    with tempfile.TemporaryDirectory(prefix="streamserve-metrics-") as path:
        os.environ[MULTIPROC_ENV] = path
        try:
            yield path
        finally:
            if previous is None:
                os.environ.pop(MULTIPROC_ENV, None)
            else:
                os.environ[MULTIPROC_ENV] = previous


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scraper that hangs must not hold up the worker's exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes and probes every few seconds would flood the worker's log."""


def _plain(start_response: StartResponse, status: str, body: str) -> Iterable[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [body.encode()]


class MetricsServer:
    """GET /metrics, /healthz, /readyz[?model=M] of ``source`` in a background thread; ``close()`` stops
    it."""

    def __init__(self, source: HealthSource, host: str, port: int) -> None:
        self._source, self._metrics_app = source, make_wsgi_app(source.registry)
        try:
            self._httpd = make_server(host, port, self._app, _ThreadingServer, handler_class=_QuietHandler)
        except OSError as e:
            raise ConfigError(f"metrics endpoint on {host}:{port}: {e.strerror or e}") from e
        self.port: int = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path in ("/healthz", "/readyz"):
            ok = self._source.is_live() if path == "/healthz" else self._ready(environ)
            return _plain(start_response, "200 OK" if ok else "503 Service Unavailable",
                          "ok\n" if ok else "not ok\n")
        return _plain(start_response, "404 Not Found", "try /metrics, /healthz, /readyz or /readyz?model=M\n")

    def _ready(self, environ: WSGIEnvironment) -> bool:
        """/readyz: the process (or pod); /readyz?model=M: that model (the last ``model`` given wins)."""
        models = parse_qs(environ.get("QUERY_STRING", "")).get("model")
        return self._source.is_ready(models[-1] if models else None)

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def serve_http(port: int, metrics_source: HealthSource, host: str = "0.0.0.0") -> MetricsServer:
    """Serve ``metrics_source`` on ``host:port`` (0: a free port, see ``.port``); ``ConfigError`` if taken."""
    return MetricsServer(metrics_source, host, port)


def start_metrics(settings: Settings, worker_id: str) -> WorkerMetrics:
    """The worker process's metrics (``.model(M)`` for each model it serves); served on
    ``settings.metrics_port`` unless that is 0 or a supervisor serves.

    In a supervised child (multiprocess mode) the values go to the supervisor's
    directory and the supervisor's endpoint serves them: the child binds nothing.
    The caller calls ``close()`` on exit.
    """
    metrics = WorkerMetrics(worker_id)
    if settings.metrics_port and not multiprocess_mode():
        metrics.server = serve_http(settings.metrics_port, metrics)
    return metrics
