"""Prometheus metrics: names and labels, several models in one process, the HTTP endpoint, multiprocess
mode, the supervisor's endpoint."""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_ENV, MODEL, wait_for_workers, wait_until
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from protocol.errors import ConfigError
from worker import metrics as metrics_module
from worker.metrics import (
    LATENCY_BUCKETS_S,
    LOAD_BUCKETS_S,
    MULTIPROC_ENV,
    FleetMetrics,
    WorkerMetrics,
    multiprocess_dir,
    multiprocess_mode,
    serve_http,
    start_metrics,
)

ROOT = Path(__file__).resolve().parents[1]
X = np.random.default_rng(3).standard_normal((60, 110)).astype(np.float32)
OTHER = "othermodel"
# The tests that run real workers need the worker loop on the per-process API (start_metrics(settings,
# worker_id), one ModelMetrics per model); until worker.py calls it so, they are skipped.
WIRED = re.search(r"start_metrics\(\s*[\w.]+\s*,\s*[\w.]+\s*\)", (ROOT / "worker" / "worker.py").read_text())
needs_wiring = pytest.mark.skipif(not WIRED, reason="the worker loop does not call start_metrics(settings, "
                                  "worker_id) yet")


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name → [(labels, value)] of a Prometheus text exposition."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(text: str, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = [v for got, v in samples(text).get(name, []) if labels.items() <= got.items()]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def get(port: int, path: str) -> tuple[int, str]:
    """HTTP status and body of GET ``path`` on localhost."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:  # not listening (yet, or any more)
        return 0, str(e)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def metrics():
    m = WorkerMetrics("w1")
    yield m
    m.close()


def test_every_metric_has_its_name_labels_and_values(metrics):
    model = metrics.model(MODEL)
    model.requests("2", "primary", "OK", 3)
    model.requests("2", "primary", "OK")
    model.requests("2", "primary", "INVALID_INPUT")
    model.queue_wait("live", 0.002)
    model.inference("2", 8, 0.004)
    model.stream(0, "live", 5, 2)
    model.reclaimed(3)
    model.dead_lettered(2)
    model.model_load("2", True)
    model.model_load("3", False)
    model.serving(2, 3)
    text = generate_latest(metrics.registry).decode()
    base = {"model": MODEL}
    assert value(text, "streamserve_requests_total", **base, version="2", variant="primary", code="OK") == 4
    assert value(text, "streamserve_requests_total", code="INVALID_INPUT") == 1
    assert value(text, "streamserve_queue_seconds_count", **base, lane="live") == 1
    assert value(text, "streamserve_queue_seconds_sum", lane="live") == pytest.approx(0.002)
    assert value(text, "streamserve_inference_seconds_count", **base, version="2") == 1
    assert value(text, "streamserve_batch_rows_bucket", **base, le="4.0") == 0
    assert value(text, "streamserve_batch_rows_bucket", le="8.0") == 1
    assert value(text, "streamserve_stream_lag", **base, shard="0", lane="live") == 5
    assert value(text, "streamserve_stream_pending", **base, shard="0", lane="live") == 2
    assert value(text, "streamserve_reclaimed_total", **base) == 3
    assert value(text, "streamserve_dead_letters_total", **base) == 2
    assert value(text, "streamserve_model_loads_total", **base, version="2", result="ok") == 1
    assert value(text, "streamserve_model_loads_total", version="3", result="failed") == 1
    assert value(text, "streamserve_served_version", **base) == 2
    assert value(text, "streamserve_production_version", **base) == 3
    assert value(text, "streamserve_worker_info", **base, worker_id="w1") == 1


def test_histograms_have_the_documented_buckets(metrics):
    model = metrics.model(MODEL)
    model.queue_wait("live", 0.0)
    model.inference("1", 1, 0.0)
    model.load_seconds(0.0)
    text = generate_latest(metrics.registry).decode()

    def bounds(name: str) -> list[float]:
        return [float(labels["le"]) for labels, _ in samples(text)[name]]

    assert bounds("streamserve_batch_rows_bucket") == [2.0**i for i in range(13)] + [math.inf]
    latency = bounds("streamserve_inference_seconds_bucket")
    assert latency == bounds("streamserve_queue_seconds_bucket") == [*LATENCY_BUCKETS_S, math.inf]
    assert latency[0] == 0.0001 and latency[-2] == 10.0
    assert bounds("streamserve_model_load_seconds_bucket") == [*LOAD_BUCKETS_S, math.inf]
    assert LOAD_BUCKETS_S[0] == 0.001 and LOAD_BUCKETS_S[-1] == 60.0, "1 ms .. 60 s"


def test_versions_unknown_are_nan_and_each_worker_has_its_own_registry(metrics):
    metrics.model(MODEL)
    text = generate_latest(metrics.registry).decode()
    assert math.isnan(value(text, "streamserve_served_version", model=MODEL))
    assert math.isnan(value(text, "streamserve_production_version", model=MODEL))
    other = WorkerMetrics("w2")  # a second one in this process: no duplicate-name error
    other.model(MODEL).requests("1", "primary", "OK")
    assert "streamserve_requests_total{" not in text
    assert value(generate_latest(other.registry).decode(), "streamserve_requests_total", code="OK") == 1


def test_http_endpoint_serves_metrics_and_the_two_probes(metrics):
    metrics.model(MODEL)
    server = serve_http(0, metrics, host="127.0.0.1")
    try:
        status, body = get(server.port, "/metrics")
        assert status == 200 and value(body, "streamserve_worker_info", worker_id="w1") == 1
        assert get(server.port, "/healthz")[0] == 200, "ticked at start"
        assert get(server.port, "/readyz")[0] == 503, "nothing reported ready yet"
        metrics.ready(True)
        assert get(server.port, "/readyz")[0] == 200
        metrics.ready(False)
        assert get(server.port, "/readyz")[0] == 503
        metrics.stale_after_s = 0.0  # as if the loop had not ticked for longer than the bound
        assert get(server.port, "/healthz")[0] == 503
        metrics.stale_after_s = 30.0
        metrics.tick()
        assert get(server.port, "/healthz")[0] == 200
        assert get(server.port, "/nothing")[0] == 404
    finally:
        server.close()
    assert get(server.port, "/metrics")[0] == 0, "the port is released"


def test_two_models_in_one_process_each_have_their_own_series(metrics):
    a, b = metrics.model(MODEL), metrics.model(OTHER)
    assert metrics.model(MODEL) is a, "one view per model, cached"
    a.requests("2", "primary", "OK", 3)
    b.requests("2", "primary", "OK")
    b.requests("7", "primary", "OK")
    a.inference("2", 8, 0.004)
    b.stream(0, "live", 9, 1)
    a.reclaimed(2)
    a.serving(2, 2, "stable")
    b.serving(7, 8)
    b.ready(True)
    text = generate_latest(metrics.registry).decode()
    assert value(text, "streamserve_requests_total", model=MODEL, version="2") == 3
    assert value(text, "streamserve_requests_total", model=OTHER, version="2") == 1
    assert value(text, "streamserve_requests_total", model=OTHER, version="7") == 1
    assert value(text, "streamserve_batch_rows_count", model=MODEL) == 1
    assert value(text, "streamserve_batch_rows_count", model=OTHER) == 0
    assert value(text, "streamserve_stream_lag", model=OTHER) == 9
    assert "streamserve_stream_lag{model=\"testmodel\"" not in text
    assert value(text, "streamserve_reclaimed_total", model=MODEL) == 2
    assert value(text, "streamserve_reclaimed_total", model=OTHER) == 0
    assert value(text, "streamserve_served_version", model=MODEL) == 2
    assert value(text, "streamserve_production_version", model=OTHER) == 8
    assert value(text, "streamserve_model_info", model=MODEL, version="2", label="stable") == 1
    assert value(text, "streamserve_model_info", model=OTHER, version="7", label="") == 1
    assert value(text, "streamserve_worker_ready", model=MODEL, worker_id="w1") == 0
    assert value(text, "streamserve_worker_ready", model=OTHER, worker_id="w1") == 1
    assert value(text, "streamserve_worker_process_ready", worker_id="w1") == 0, "the worker decides"
    assert {labels["model"] for labels, _ in samples(text)["streamserve_worker_info"]} == {MODEL, OTHER}
    assert metrics.is_ready(OTHER) and not metrics.is_ready(MODEL) and not metrics.is_ready()
    assert not metrics.is_ready("unknown")


class Clock:
    """The module's ``time`` with a wall clock the test sets (monotonic stays real)."""

    def __init__(self, wall_s: float) -> None:
        self.wall_s = wall_s
        self.monotonic = metrics_module.time.monotonic

    def time(self) -> float:
        return self.wall_s


def test_the_loop_tick_is_published_for_every_registered_model(monkeypatch):
    clock = Clock(1000.0)
    monkeypatch.setattr(metrics_module, "time", clock)
    monkeypatch.setattr(metrics_module, "TICK_PUBLISH_INTERVAL_S", 0.0)
    metrics = WorkerMetrics("w1")
    metrics.model(MODEL)
    clock.wall_s = 2000.0
    metrics.model(OTHER)  # registered later: its tick is fresh at once, not 0 (stale to a supervisor)

    def ticks() -> dict[str, float]:
        rows = samples(generate_latest(metrics.registry).decode())[metrics_module.TICK_METRIC]
        return {labels["model"]: v for labels, v in rows if labels["worker_id"] == "w1"}

    assert ticks() == {MODEL: 1000.0, OTHER: 2000.0}
    clock.wall_s = 3000.0
    metrics.tick()
    assert ticks() == {MODEL: 3000.0, OTHER: 3000.0}


def test_the_model_cache_series(metrics):
    text = generate_latest(metrics.registry).decode()
    assert value(text, "streamserve_cache_bytes", worker_id="w1") == 0
    assert value(text, "streamserve_cache_budget_bytes", worker_id="w1") == 0, "no budget"
    a, b = metrics.model(MODEL), metrics.model(OTHER)
    text = generate_latest(metrics.registry).decode()
    assert value(text, "streamserve_model_loaded", model=MODEL, worker_id="w1") == 0, "cold at first"
    assert value(text, "streamserve_model_memory_bytes", model=MODEL, worker_id="w1") == 0
    assert math.isnan(value(text, "streamserve_model_last_load_timestamp_seconds", model=MODEL)), "never"
    a.cache("loaded", 3_000_000, 1_700_000_000.5)
    a.load_seconds(0.42)
    b.cache("loaded", 1_000_000, 1_700_000_001.0)
    b.load_seconds(0.002)
    b.evicted()
    b.cache("evicted", 0, 1_700_000_001.0)
    metrics.cache_totals(3_000_000, 4_000_000)
    text = generate_latest(metrics.registry).decode()
    assert value(text, "streamserve_model_loaded", model=MODEL, worker_id="w1") == 1
    assert value(text, "streamserve_model_memory_bytes", model=MODEL) == 3_000_000
    assert value(text, "streamserve_model_last_load_timestamp_seconds", model=MODEL) == 1_700_000_000.5
    assert value(text, "streamserve_model_loaded", model=OTHER) == 0
    assert value(text, "streamserve_model_memory_bytes", model=OTHER) == 0
    assert value(text, "streamserve_model_last_load_timestamp_seconds", model=OTHER) == 1_700_000_001.0
    assert value(text, "streamserve_model_load_seconds_count", model=MODEL) == 1
    assert value(text, "streamserve_model_load_seconds_sum", model=MODEL) == pytest.approx(0.42)
    assert value(text, "streamserve_model_load_seconds_bucket", model=OTHER, le="0.0025") == 1
    assert value(text, "streamserve_model_load_seconds_bucket", model=OTHER, le="0.001") == 0
    assert value(text, "streamserve_model_evictions_total", model=OTHER) == 1
    assert value(text, "streamserve_model_evictions_total", model=MODEL) == 0
    assert value(text, "streamserve_cache_bytes", worker_id="w1") == 3_000_000
    assert value(text, "streamserve_cache_budget_bytes", worker_id="w1") == 4_000_000


def test_readyz_per_model_over_http(metrics):
    server = serve_http(free_port(), metrics, host="127.0.0.1")
    try:
        model = metrics.model(MODEL)
        assert get(server.port, f"/readyz?model={MODEL}")[0] == 503, "registered, not ready"
        model.ready(True)
        assert get(server.port, f"/readyz?model={MODEL}")[0] == 200
        assert get(server.port, "/readyz")[0] == 503, "plain /readyz is the process's own verdict"
        assert get(server.port, "/readyz?model=unknown")[0] == 503
        assert get(server.port, f"/readyz?model={OTHER}")[0] == 503, "never registered"
        metrics.ready(True)
        model.ready(False)
        assert get(server.port, "/readyz")[0] == 200
        assert get(server.port, f"/readyz?model={MODEL}")[0] == 503
    finally:
        server.close()


def test_a_taken_port_is_a_config_error(metrics):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match="metrics endpoint"):
            serve_http(taken.getsockname()[1], metrics, host="127.0.0.1")


def test_start_metrics_serves_on_the_port_and_not_when_it_is_zero(settings):
    assert not multiprocess_mode(), "the test process keeps values in memory"
    off = start_metrics(settings.model_copy(update={"metrics_port": 0}), "w1")
    assert off.server is None
    port = free_port()
    on = start_metrics(settings.model_copy(update={"metrics_port": port}), "w2")
    on.model(MODEL)
    try:
        assert on.server is not None and on.server.port == port
        assert value(get(port, "/metrics")[1], "streamserve_worker_info", worker_id="w2") == 1
    finally:
        on.close()
    assert on.server is None


def test_multiprocess_dir_is_exported_then_removed_and_restored(monkeypatch):
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    with multiprocess_dir() as path:
        assert os.environ[MULTIPROC_ENV] == path and Path(path).is_dir()
    assert MULTIPROC_ENV not in os.environ and not Path(path).exists()
    monkeypatch.setenv(MULTIPROC_ENV, "/elsewhere")
    with multiprocess_dir():
        pass
    assert os.environ[MULTIPROC_ENV] == "/elsewhere"


CHILD = textwrap.dedent("""
    import os
    import sys
    from types import SimpleNamespace
    from worker.metrics import multiprocess_mode, start_metrics
    worker_id, ready, port = sys.argv[1], sys.argv[2] == "ready", int(sys.argv[3])
    m = start_metrics(SimpleNamespace(metrics_port=port), worker_id)
    a, b = m.model("testmodel"), m.model("othermodel")
    a.requests("1", "primary", "OK", 2)
    a.inference("1", 4, 0.001)
    a.serving(1, 1)
    a.ready(ready)  # the ready child serves testmodel, the other othermodel
    b.ready(not ready)
    m.ready(ready)
    a.cache("loaded", 1000, 1700000000.0)
    a.load_seconds(0.5)
    b.cache("evicted", 0, 1700000000.0)
    b.evicted()
    m.cache_totals(1000, 5000)
    print(multiprocess_mode(), m.server is None, os.getpid())
""")


def run_child(path: str, worker_id: str, ready: bool, port: int) -> int:
    """A process that reports into the multiprocess directory ``path``, then exits; its pid."""
    proc = subprocess.run([sys.executable, "-c", CHILD, worker_id, "ready" if ready else "no", str(port)],
                          env={**os.environ, MULTIPROC_ENV: path}, cwd=ROOT, capture_output=True,
                          text=True, check=True)
    mode, unserved, pid = proc.stdout.split()
    assert (mode, unserved) == ("True", "True"), "multiprocess mode, and no server of its own"
    return int(pid)


def test_fleet_merges_children_and_forgets_a_dead_ones_gauges(tmp_path):
    path = str(tmp_path)
    port = free_port()  # the children are given a port and must not bind it
    ready_pid = run_child(path, "w0", True, port)
    run_child(path, "w1", False, port)
    alive = {"all": True}
    fleet = FleetMetrics(path, lambda: alive["all"])
    text = generate_latest(fleet.registry).decode()
    assert value(text, "streamserve_requests_total", model=MODEL, code="OK") == 4, "summed over children"
    assert value(text, "streamserve_batch_rows_count", model=MODEL) == 2
    assert {labels["worker_id"] for labels, _ in samples(text)["streamserve_worker_info"]} == {"w0", "w1"}
    assert len(samples(text)["streamserve_served_version"]) == 4, "liveall: one series per child and model"
    assert fleet.is_ready() and fleet.is_live(), "each child's models ticked when registered"
    assert fleet.is_ready(MODEL) and fleet.is_ready(OTHER) and not fleet.is_ready("unknown")
    alive["all"] = False
    assert not fleet.is_live(), "a child is down"
    alive["all"] = True
    fleet.stale_after_s = -1.0  # every child's last tick is now too old
    assert not fleet.is_live()
    fleet.child_exited(ready_pid)
    text = generate_latest(fleet.registry).decode()
    assert {labels["worker_id"] for labels, _ in samples(text)["streamserve_worker_info"]} == {"w1"}
    assert not fleet.is_ready(), "the only ready child is gone"
    assert not fleet.is_ready(MODEL) and fleet.is_ready(OTHER), "the one serving othermodel is alive"
    assert value(text, "streamserve_requests_total", code="OK") == 4, "a dead child's counts stay"
    assert value(text, "streamserve_model_evictions_total", model=OTHER) == 2, "summed, a dead child's kept"
    assert value(text, "streamserve_model_load_seconds_count", model=MODEL) == 2
    assert [labels["worker_id"] for labels, _ in samples(text)["streamserve_model_loaded"]] == ["w1", "w1"]


def test_fleet_keeps_one_cache_series_per_child_and_answers_readyz_per_model(tmp_path):
    path = str(tmp_path)
    run_child(path, "w0", True, 0)
    run_child(path, "w1", False, 0)
    fleet = FleetMetrics(path, lambda: True)
    text = generate_latest(fleet.registry).decode()
    for worker in ("w0", "w1"):
        assert value(text, "streamserve_model_loaded", model=MODEL, worker_id=worker) == 1
        assert value(text, "streamserve_model_loaded", model=OTHER, worker_id=worker) == 0
        assert value(text, "streamserve_model_memory_bytes", model=MODEL, worker_id=worker) == 1000
        assert value(text, "streamserve_model_last_load_timestamp_seconds", model=OTHER,
                     worker_id=worker) == 1_700_000_000.0
        assert value(text, "streamserve_cache_bytes", worker_id=worker) == 1000
        assert value(text, "streamserve_cache_budget_bytes", worker_id=worker) == 5000
        ticks = samples(text)[metrics_module.TICK_METRIC]
        assert {labels["model"] for labels, _ in ticks if labels["worker_id"] == worker} == {MODEL, OTHER}
    assert value(text, "streamserve_worker_process_ready", worker_id="w0") == 1
    assert value(text, "streamserve_worker_process_ready", worker_id="w1") == 0
    server = serve_http(0, fleet, host="127.0.0.1")
    try:
        assert get(server.port, "/readyz")[0] == 200
        assert get(server.port, f"/readyz?model={MODEL}")[0] == 200
        assert get(server.port, "/readyz?model=unknown")[0] == 503
    finally:
        server.close()


SUPERVISOR = textwrap.dedent("""
    import sys
    from protocol.settings import Settings
    from worker.supervisor import Supervisor
    sys.exit(Supervisor(Settings(), "testmodel", 2).run())  # the port comes from STREAMSERVE_METRICS_PORT
""")


def metric_dirs(tmp: Path) -> list[Path]:
    return list(tmp.glob("streamserve-metrics-*"))


def serving_pids(client) -> set[int]:
    return {int(w.worker_id.split("-")[-2]) for w in client.health(MODEL).workers if w.version is not None}


# Waits: the children's start 30 s, then 10 + 10 s, a child's restart 20 s, 10 s, the stop 20 s: 100 s.
@needs_wiring
@pytest.mark.timeout(150)
def test_supervisor_serves_one_endpoint_and_health_follows_its_children(settings, client, production,
                                                                        tmp_path):
    port, tmp = free_port(), tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, **FAST_ENV, "TMPDIR": str(tmp), "STREAMSERVE_REDIS_URL": settings.redis_url,
           "STREAMSERVE_ARTIFACT_DIR": str(settings.artifact_dir), "STREAMSERVE_METRICS_PORT": str(port)}
    with open(tmp_path / "supervisor.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", SUPERVISOR], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        pids = wait_for_workers(client, 2)
        wait_until(lambda: get(port, "/healthz")[0] == 200, 10, message="healthy with 2 children")
        assert get(port, "/metrics")[0] == 200 and len(metric_dirs(tmp)) == 1
        victim = next(iter(pids))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: get(port, "/healthz")[0] == 503, 10, message="unhealthy while a child is down")
        wait_until(lambda: get(port, "/healthz")[0] == 200, 20, message="healthy once it is restarted")
        # SIGTERM only once the replacement serves: one still starting up has no handler and dies of it.
        wait_until(lambda: len(serving_pids(client) - {victim}) == 2, 10, message="replacement serving")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.kill()
        proc.wait()
    assert metric_dirs(tmp) == [], "the children's metric files are removed at exit"
    assert get(port, "/healthz")[0] == 0


# ---- end to end, once the worker loop reports into WorkerMetrics (the lead's wiring) ----


@needs_wiring
@pytest.mark.timeout(90)
def test_a_lone_worker_serves_its_metrics(client, start_worker, production):
    port = free_port()
    start_worker("--metrics-port", str(port))
    wait_until(lambda: get(port, "/readyz")[0] == 200, 30, message="ready once a model is loaded")
    assert client.predict(MODEL, X).model_version == production.version
    assert get(port, "/healthz")[0] == 200

    def answered() -> float:
        rows = samples(get(port, "/metrics")[1]).get("streamserve_requests_total", [])
        return sum(v for labels, v in rows if labels.get("model") == MODEL and labels.get("code") == "OK")

    # Counted once the worker reads its transaction's answer, which may be after the bot has its reply.
    wait_until(lambda: answered() >= 1, 10)
    body = get(port, "/metrics")[1]
    assert value(body, "streamserve_served_version", model=MODEL) == production.version
    assert value(body, "streamserve_production_version", model=MODEL) == production.version
    assert len(samples(body)["streamserve_worker_info"]) == 1


# Waits: the children's start 30 s, then 10 s, a call 10 s, 10 + 10 s, a child's restart 30 s, the
# stop 20 s: 120 s.
@needs_wiring
@pytest.mark.timeout(180)
def test_supervised_children_are_aggregated_on_one_port(client, start_worker, production):
    port = free_port()
    proc = start_worker("--processes", "2", "--metrics-port", str(port))

    def worker_ids() -> set[str]:
        status, body = get(port, "/metrics")
        rows = samples(body).get("streamserve_worker_info", []) if status == 200 else []
        return {labels["worker_id"] for labels, _ in rows}

    first = wait_until(lambda: ids if len(ids := worker_ids()) == 2 else None, 30, message="two children")
    wait_until(lambda: get(port, "/readyz")[0] == 200, 10, message="ready once a child is")
    client.predict_many(MODEL, [X] * 8)
    wait_until(lambda: value(get(port, "/metrics")[1], "streamserve_requests_total", code="OK") >= 8, 10)
    pids = wait_for_workers(client, 2, 10)
    victim_pid = next(iter(pids))
    os.kill(victim_pid, signal.SIGKILL)
    after = wait_until(lambda: ids if len(ids := worker_ids()) == 2 and ids != first else None, 30,
                       message="the dead child's series gone, its replacement's there")
    assert pids[victim_pid] not in after and len(after & first) == 1
    assert value(get(port, "/metrics")[1], "streamserve_requests_total", code="OK") >= 8, "totals kept"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
