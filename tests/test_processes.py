"""Real worker processes: SIGKILL under load, SIGTERM drain, the --processes supervisor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import FAST_ENV, MODEL, wait_for_workers, wait_until

from producer import _core
from protocol import keys
from worker.worker import Worker

X = np.random.default_rng(2).standard_normal((60, 110)).astype(np.float32)
def pending_of(r, consumer: str, lane: str = "live") -> list[bytes]:
    rows = r.xpending_range(keys.request_stream(MODEL, 0, lane), keys.consumer_group(MODEL), "-", "+",
                            1000, consumername=consumer)
    return [row["message_id"] for row in rows]


def freeze_mid_batch(r, proc: subprocess.Popen, consumer: str, timeout_s: float = 10.0,
                     lane: str = "live") -> bool:
    """SIGSTOP ``proc`` at a moment its consumer holds unacked entries (retrying until it does)."""
    def frozen_holding_entries() -> bool:
        if not pending_of(r, consumer, lane):
            return False
        proc.send_signal(signal.SIGSTOP)
        if pending_of(r, consumer, lane):
            return True
        proc.send_signal(signal.SIGCONT)
        return False

    return wait_until(frozen_holding_entries, timeout_s, interval_s=0.001,
                      message="caught the victim with a batch in flight")


# Full batches of 8: the worker reads the next entries before each model call and reads each reply
# transaction's answer after the next call (overlap_io, the default), so the victim dies holding
# entries it read ahead, writes not yet confirmed (and, on the backfill lane, entries held beyond
# its batch). Waits: the workers' start 30 s, the freeze 10 s, the kill 10 s, the load 30 s (its join
# 40 s): 90 s.
@pytest.mark.timeout(120)
@pytest.mark.parametrize("lane", ["live", "backfill"])
def test_sigkill_mid_batch_every_request_is_still_answered(r, client, start_worker, slow_production, lane):
    procs = [start_worker("--max-batch", "8") for _ in range(2)]
    results: list = []
    ids = wait_for_workers(client, 2)
    victim = procs[0]
    load = threading.Thread(target=lambda: results.extend(client.predict_many(
        MODEL, [X * (i % 7 + 1) for i in range(160)], return_exceptions=True, lane=lane, timeout_s=30)))
    load.start()
    try:
        assert freeze_mid_batch(r, victim, ids[victim.pid], lane=lane), "caught the victim mid-batch"
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        load.join(40)  # past the calls' own timeout: they end first, with DeadlineExceeded
    errors = [e for e in results if isinstance(e, Exception)]
    assert len(results) == 160 and not errors, errors[:3]
    assert all(p.worker != ids[victim.pid] for p in results[-20:])
    assert r.xpending(keys.request_stream(MODEL, 0, lane), keys.consumer_group(MODEL))["pending"] == 0


@pytest.mark.timeout(90)  # waits: the worker's start 30 s, a batch in flight 20 s, the drain 15 s
def test_sigterm_finishes_and_acks_the_batch_then_exits_zero(r, settings, client, start_worker,
                                                             slow_production):
    proc = start_worker("--max-batch", "4")
    ids = wait_for_workers(client, 1)
    stream, group = keys.request_stream(MODEL), keys.consumer_group(MODEL)
    pendings = [_core.prepare(_core.Target(MODEL), X, route="", timeout_s=60, sample_ndim=None)
                for _ in range(12)]
    for p in pendings:
        r.xadd(stream, p.fields)
    deadline, in_flight = time.monotonic() + 20, []
    while not in_flight and time.monotonic() < deadline:
        in_flight = pending_of(r, ids[proc.pid])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert in_flight
    assert r.xpending(stream, group)["pending"] == 0, "the in-flight batch was acked"
    answered = [p for p in pendings if r.exists(p.reply_key)]
    unread = r.xinfo_groups(stream)[0]["lag"]
    assert len(answered) >= len(in_flight) and len(answered) + unread == 12, "nothing lost"
    Worker(settings, MODEL, burst=True).run()
    assert all(r.exists(p.reply_key) for p in pendings)


@pytest.mark.timeout(90)  # waits: the children's start 30 s, a call 10 s, the stop 20 s
def test_processes_flag_runs_a_supervised_fleet_that_stops_cleanly(r, client, start_worker, production):
    proc = start_worker("--processes", "2")
    ids = wait_for_workers(client, 2)
    assert len(ids) == 2 and proc.pid not in ids, "two child processes serve"
    assert client.predict(MODEL, X).model_version == production.version
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert r.zcard(keys.workers_zset(MODEL)) == 0


# Waits: the children's start 30 s, a batch in hand 10 s, the drain 20 s, the load's join 40 s: 100 s.
@pytest.mark.timeout(150)
def test_group_sigterm_drains_every_supervised_child_once(r, settings, client, tmp_path, production):
    """systemd's KillMode=control-group (``kill -- -PGID``): each child gets SIGTERM directly and from
    the supervisor; both are one request to drain, never a forcing second signal."""
    cmd = [sys.executable, "-m", "streamserve", "--redis-url", settings.redis_url, "--artifact-dir",
           str(settings.artifact_dir), "worker", "--model", MODEL, "--processes", "2", "--max-batch", "4"]
    log_path = tmp_path / "supervisor.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env={**os.environ, **FAST_ENV}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    stream, group = keys.request_stream(MODEL), keys.consumer_group(MODEL)
    results: list = []
    load = threading.Thread(target=lambda: results.extend(client.predict_many(
        MODEL, [X * (i % 5 + 1) for i in range(120)], timeout_s=30, return_exceptions=True)))
    try:
        wait_for_workers(client, 2)
        load.start()
        wait_until(lambda: r.xpending(stream, group)["pending"] > 0, 10, interval_s=0.001,
                   message="the children hold no batch")
        os.killpg(proc.pid, signal.SIGTERM)
        exit_code = proc.wait(20)
        pending = r.xpending(stream, group)["pending"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        Worker(settings, MODEL, burst=True).run()  # what the children never read
        load.join(40)  # past the call's own timeout: it ends first, with DeadlineExceeded
    assert exit_code == 0, log_path.read_text()
    assert pending == 0, "every batch in hand was finished and acked"
    assert "forcing exit" not in log_path.read_text()
    errors = [e for e in results if isinstance(e, Exception)]
    assert len(results) == 120 and not errors, errors[:3]
