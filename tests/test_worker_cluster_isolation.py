"""A worker reading several shards keeps serving the shards on live masters while another is down.

First on a cluster: three masters, no replicas, ``cluster-require-full-coverage no`` and a
node timeout longer than the test. Once the master holding shard 0 (and the model's own slot:
registry, layout, heartbeats) is SIGKILLed, its slots refuse connections while the other two
masters serve on. One worker reads all three shards. Requests routed to shards 1 and 2 must
keep being answered within a bound far below the seconds a command to the dead node used to
cost (the cluster client's retries, then the worker's whole-loop backoff, for every shard at
once); the worker reports the dead shard and its failing heartbeat.

Then on one server, the batch in hand: a shard whose reply transaction keeps failing keeps that
batch (pending, unanswered, retried on the shard's own backoff) while the other shards are
answered, and a stopping worker still writes it before it exits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import redis
from conftest import MODEL, ThreadedWorker, started, stopped, wait_until
from test_failover import X, routes_per_shard, serve_sharded

from lab.embedded_redis import EmbeddedCluster
from producer import Client
from protocol import codec, keys, messages
from worker.worker import Worker

SHARDS = 3
NODE_TIMEOUT_MS = 60_000  # the dead master is never marked failed while the test runs
WATCH_S = 6.0  # longer than the default cluster client's retries of one command (about 4 s)
LIVE_BOUND_S = 1.0  # a live shard's call; normal is milliseconds, a stall was 4 s or more
PERIOD_S = 0.02  # between calls: steady load, not a busy loop on a 2-core box


@pytest.fixture
def cluster() -> Iterator[EmbeddedCluster]:
    """3 masters, no replicas, partial coverage; a fresh one (the test kills a node)."""
    cluster = started(EmbeddedCluster(3, node_timeout_ms=NODE_TIMEOUT_MS, full_coverage=False),
                      "Redis Cluster")
    yield cluster
    stopped(cluster)


def timed_calls(client: Client, model: str, routes: list[str], seconds: float) -> list[float]:
    """Predictions on ``routes`` in turn for ``seconds``; each one's latency (an error raises)."""
    took: list[float] = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        started = time.monotonic()
        client.predict(model, X, route=routes[len(took) % len(routes)])
        took.append(time.monotonic() - started)
        time.sleep(PERIOD_S)
    return took


@pytest.mark.timeout(90)
def test_shards_on_live_masters_are_served_while_another_shards_master_is_down(cluster, tmp_path):
    model, settings = serve_sharded(cluster, tmp_path)
    dead = cluster.master_of(keys.request_stream(model, 0))
    masters = {k: cluster.master_of(keys.request_stream(model, k)) for k in range(SHARDS)}
    assert len(set(masters.values())) == SHARDS, "the model's shards should sit on three masters"
    routes = routes_per_shard(SHARDS)
    live_routes = routes[1] + routes[2]
    worker = Worker(settings, model)
    with ThreadedWorker(worker), Client.from_url(cluster.url, timeout_s=10.0) as client:
        before = timed_calls(client, model, [*routes[0], *live_routes], 1.0)
        cluster.kill_node(dead)
        during = timed_calls(client, model, live_routes, WATCH_S)
        wait_until(lambda: "shard 0: " in worker.problem() and "heartbeat: " in worker.problem(),
                   message=f"the dead shard and heartbeat not reported: {worker.problem()}")
    worst_s = max(during)
    print(f"live shards: {len(during)} calls, worst {worst_s * 1000:.0f} ms "
          f"(before the kill: worst {max(before) * 1000:.0f} ms)")
    assert worst_s < LIVE_BOUND_S, (
        f"a call on a live master's shard took {worst_s:.2f} s while shard 0's master was down "
        f"({sum(t >= LIVE_BOUND_S for t in during)} of {len(during)} calls over {LIVE_BOUND_S:g} s)")


def send(r: redis.Redis, request_id: str, shard: int) -> None:
    """One request straight onto ``shard``'s live stream (the worker replies in that shard's slot)."""
    fields = messages.encode_request(request_id, {"features": X[np.newaxis]},
                                     deadline_ms=int(time.time() * 1000) + 60_000)
    r.xadd(keys.request_stream(MODEL, shard), fields)


def answered(r: redis.Redis, request_id: str, shard: int) -> bool:
    raw = r.lindex(keys.reply_key(MODEL, request_id, shard), 0)
    return raw is not None and codec.unpack(raw, max_bytes=1 << 24)["ok"] is True


def pending(r: redis.Redis, shard: int) -> int:
    return int(r.xpending(keys.request_stream(MODEL, shard), keys.consumer_group(MODEL))["pending"])


@pytest.mark.timeout(60)  # waits: the worker's 10 s, four of 5 s (a shard's retries are 0.5 s apart at most)
def test_a_shard_whose_reply_transaction_fails_keeps_its_batch_and_does_not_hold_the_others(
        r, settings, production):
    worker = Worker(settings.with_overrides(overlap_io=False), MODEL, shards=(0, 1, 2))
    failing, attempts = threading.Event(), []
    real_write = worker.consumers[1].write

    def write(out, prefetch=0):  # type: ignore[no-untyped-def]  # StreamConsumer.write's signature
        if failing.is_set():
            attempts.append(time.monotonic())
            raise redis.ConnectionError("injected: shard 1's node is out of reach")
        real_write(out, prefetch)

    worker.consumers[1].write = write  # type: ignore[method-assign]  # the instance attribute wins
    failing.set()
    threaded = ThreadedWorker(worker)
    with threaded:
        send(r, "s1", 1)
        wait_until(lambda: len(attempts) >= 2, 5, message="shard 1's reply transaction was not retried")
        send(r, "s0", 0)
        send(r, "s2", 2)
        wait_until(lambda: answered(r, "s0", 0) and answered(r, "s2", 2), 5,
                   message="shards 0 and 2 were not served while shard 1's write failed")
        assert "shard 1: " in worker.problem(), worker.problem()
        assert not answered(r, "s1", 1) and pending(r, 1) == 1, "acked or answered without its reply"
        worker.stop()
        retries = len(attempts)
        wait_until(lambda: len(attempts) >= retries + 2, 5, message="a stopping worker gave up the write")
        assert threaded.thread.is_alive(), "stopped with a reply unwritten"
        failing.clear()
        wait_until(lambda: not threaded.thread.is_alive(), 5, message="did not stop once the write landed")
    assert answered(r, "s1", 1)
    assert [pending(r, k) for k in range(3)] == [0, 0, 0]
    assert worker.computed == 3, "a kept batch was computed again"
