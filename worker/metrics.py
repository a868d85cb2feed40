"""Prometheus metrics of a worker, and one HTTP endpoint per process or pod: /metrics, /healthz, /readyz.

A lone worker keeps its :class:`WorkerMetrics` in its own ``CollectorRegistry``
and serves it itself (:func:`start_metrics` with ``metrics_port``). Under
``--processes N`` the supervisor gives the children a fresh directory in
``PROMETHEUS_MULTIPROC_DIR`` before spawning them: prometheus-client then keeps
each child's values in files there, the children serve nothing, and the
supervisor serves the merged view (:class:`FleetMetrics`) on the one port.

How each gauge merges across children (prometheus-client's ``multiprocess_mode``;
``live…`` modes drop a child's values when the supervisor reports it dead):

- stream lag/pending and the Production version are facts about the shared
  stream and registry that every child reads: ``livemostrecent``, the freshest
  reading wins (a rollback shows at once, where ``max`` would hide it).
- the version served is each child's own: ``liveall`` keeps one series per
  child (a ``pid`` label is added), so an alert sees a single stale child. So
  does ``streamserve_model_info``, the version served with its registry label.
- worker info, readiness and the last loop tick carry ``worker_id`` already:
  ``livemax`` (one series per worker, gone when it dies). The supervisor reads
  the last two back to answer its own /readyz and /healthz.

Counters and histograms are summed over children, dead ones included, so
totals never go backwards when a child is restarted.
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
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app, values
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from protocol.errors import ConfigError

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

    from protocol.settings import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own switch, read when it is imported
LIVENESS_STALE_S = 30.0  # /healthz fails when the loop has not ticked for this long
TICK_PUBLISH_INTERVAL_S = 1.0  # the tick gauge is a file write under a supervisor: not on every loop
ROW_BUCKETS = tuple(float(2**i) for i in range(13))  # 1, 2, 4 … 4096 rows
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0)
READY_METRIC = "streamserve_worker_ready"
TICK_METRIC = "streamserve_worker_last_tick_timestamp_seconds"

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

    def is_ready(self) -> bool:
        """GET /readyz answers 200 when true, else 503."""
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


class WorkerMetrics:
    """One worker process's metrics, all labelled with its model; the worker loop reports into it.

    Every method is cheap enough for the per-batch path (about 1-4 µs, label
    children cached); ``stream`` and ``serving`` are meant to be called periodically.
    """

    def __init__(self, model: str, worker_id: str, registry: CollectorRegistry | None = None) -> None:
        self.model, self.worker_id = model, worker_id
        self._registry = registry if registry is not None else CollectorRegistry()
        self.stale_after_s = LIVENESS_STALE_S
        self.server: MetricsServer | None = None
        self._ready = False
        self._last_tick_s, self._next_tick_publish_s = time.monotonic(), 0.0
        self._define_traffic(self._registry)
        self._define_fleet(self._registry)
        self._define_worker(self._registry)
        self.serving(None, None)
        self.ready(False)
        self.tick()

    @property
    def registry(self) -> CollectorRegistry:
        """This process's registry (what its own /metrics exposes when not supervised)."""
        return self._registry

    def _define_traffic(self, reg: CollectorRegistry) -> None:
        model = self.model
        self._requests = _Children(Counter(
            "streamserve_requests_total", "Requests answered, by the version and variant that answered "
            "and the reply code (OK or an error code)", ["model", "version", "variant", "code"],
            registry=reg), model)
        self._batch_rows = Histogram("streamserve_batch_rows", "Rows per model call", ["model"],
                                     buckets=ROW_BUCKETS, registry=reg).labels(model)
        self._queue = _Children(Histogram(
            "streamserve_queue_seconds", "Time from a request's enqueue to the start of its batch",
            ["model", "lane"], buckets=LATENCY_BUCKETS_S, registry=reg), model)
        self._inference = _Children(Histogram(
            "streamserve_inference_seconds", "Duration of one model call", ["model", "version"],
            buckets=LATENCY_BUCKETS_S, registry=reg), model)

    def _define_fleet(self, reg: CollectorRegistry) -> None:
        model = self.model
        self._lag = _Children(Gauge(
            "streamserve_stream_lag", "Entries of a stream not yet read by the consumer group",
            ["model", "shard", "lane"], multiprocess_mode="livemostrecent", registry=reg), model)
        self._pending = _Children(Gauge(
            "streamserve_stream_pending", "Entries read by the consumer group and not yet acknowledged",
            ["model", "shard", "lane"], multiprocess_mode="livemostrecent", registry=reg), model)
        self._reclaimed = Counter("streamserve_reclaimed_total", "Entries taken over from other consumers",
                                  ["model"], registry=reg).labels(model)
        self._dead_letters = Counter("streamserve_dead_letters_total", "Entries moved to the dead letters",
                                     ["model"], registry=reg).labels(model)
        self._replayed = Counter(
            "streamserve_replayed_total", "Re-sent requests answered from their stored reply, uncomputed",
            ["model"], registry=reg).labels(model)
        self._loads = _Children(Counter(
            "streamserve_model_loads_total", "Model version loads, by result (ok or failed)",
            ["model", "version", "result"], registry=reg), model)
        self._production = Gauge(
            "streamserve_production_version", "The registry's Production version (NaN: none)", ["model"],
            multiprocess_mode="livemostrecent", registry=reg).labels(model)

    def _define_worker(self, reg: CollectorRegistry) -> None:
        model, worker = self.model, self.worker_id
        self._served = Gauge("streamserve_served_version", "The version this worker serves (NaN: none)",
                             ["model"], multiprocess_mode="liveall", registry=reg).labels(model)
        Gauge("streamserve_worker_info", "A live worker process (always 1)", ["model", "worker_id"],
              multiprocess_mode="livemax", registry=reg).labels(model, worker).set(1)
        self._model_info = Gauge(
            "streamserve_model_info", "The version this worker serves, with its registry label (\"\": none); "
            "1 while served, 0 for a version served before", ["model", "version", "label"],
            multiprocess_mode="liveall", registry=reg)
        self._info_key: tuple[str, str] | None = None
        self._ready_gauge = Gauge(READY_METRIC, "1 while a model is loaded and Redis answers",
                                  ["model", "worker_id"], multiprocess_mode="livemax",
                                  registry=reg).labels(model, worker)
        self._tick_gauge = Gauge(TICK_METRIC, "When the worker loop last turned (Unix time)",
                                 ["model", "worker_id"], multiprocess_mode="livemax",
                                 registry=reg).labels(model, worker)

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
            self._model_info.labels(self.model, *self._info_key).set(0)
            if not multiprocess_mode():
                self._model_info.remove(self.model, *self._info_key)
        if key is not None:
            self._model_info.labels(self.model, *key).set(1)
        self._info_key = key

    def tick(self) -> None:
        """The loop is alive: call it every iteration, backoff waits included (Redis down is not dead)."""
        now_s = time.monotonic()
        self._last_tick_s = now_s
        if now_s >= self._next_tick_publish_s:
            self._next_tick_publish_s = now_s + TICK_PUBLISH_INTERVAL_S
            self._tick_gauge.set(time.time())

    def ready(self, ok: bool) -> None:
        """Whether this worker can serve: a model is loaded and Redis answers."""
        self._ready = ok
        self._ready_gauge.set(1 if ok else 0)

    def is_live(self) -> bool:
        """The loop ticked within ``stale_after_s``."""
        return time.monotonic() - self._last_tick_s < self.stale_after_s

    def is_ready(self) -> bool:
        """What :meth:`ready` last reported."""
        return self._ready

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

    def _values(self, name: str) -> list[float]:
        return [s.value for m in self._collector.collect() if m.name == name for s in m.samples]

    def is_live(self) -> bool:
        """Every child is running and no child's loop is stale."""
        if not self._children_alive():
            return False
        oldest_s = time.time() - self.stale_after_s
        return all(tick_s >= oldest_s for tick_s in self._values(TICK_METRIC))

    def is_ready(self) -> bool:
        """At least one child reported ready."""
        return any(v >= 1 for v in self._values(READY_METRIC))

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
    """GET /metrics, /healthz, /readyz of ``source`` in a background thread; ``close()`` stops it."""

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
            ok = self._source.is_live() if path == "/healthz" else self._source.is_ready()
            return _plain(start_response, "200 OK" if ok else "503 Service Unavailable",
                          "ok\n" if ok else "not ok\n")
        return _plain(start_response, "404 Not Found", "try /metrics, /healthz or /readyz\n")

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def serve_http(port: int, metrics_source: HealthSource, host: str = "0.0.0.0") -> MetricsServer:
    """Serve ``metrics_source`` on ``host:port`` (0: a free port, see ``.port``); ``ConfigError`` if taken."""
    return MetricsServer(metrics_source, host, port)


def start_metrics(settings: Settings, model: str, worker_id: str) -> WorkerMetrics:
    """The worker's metrics; served on ``settings.metrics_port`` unless that is 0 or a supervisor serves.

    In a supervised child (multiprocess mode) the values go to the supervisor's
    directory and the supervisor's endpoint serves them: the child binds nothing.
    The caller calls ``close()`` on exit.
    """
    metrics = WorkerMetrics(model, worker_id)
    if settings.metrics_port and not multiprocess_mode():
        metrics.server = serve_http(settings.metrics_port, metrics)
    return metrics
