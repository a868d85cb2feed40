"""Restarts and outages, worker side: a read lost with its connection is recovered by its own worker in
seconds, and an outage longer than the heartbeat TTL does not make live workers look dead."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from conftest import MODEL, ThreadedWorker, wait_until
from test_takeover import GROUP, STREAM, beat, consumers
from test_worker import reply, send

from protocol import keys, presence
from worker.worker import Worker


def lose_a_read(r, consumer: str, request_ids: list[str]) -> None:
    """Send requests and deliver them to ``consumer`` in one transaction, as if its XREADGROUP had run
    and its answer then been lost: the worker blocked on the stream finds nothing new afterwards."""
    pipe = r.pipeline(transaction=True)
    for request_id in request_ids:
        send(pipe, request_id)
    pipe.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=len(request_ids))
    assert len(pipe.execute()[-1][0][1]) == len(request_ids)


def cut_connections(r, worker_id: str) -> int:
    """CLIENT KILL every connection the worker named itself on (``ss-worker:<id>``)."""
    name = f"ss-worker:{worker_id}"[:120].encode()
    ids = [c["id"] for c in r.client_list() if c["name"].encode() == name]
    for client_id in ids:
        r.client_kill_filter(_id=client_id)
    return len(ids)


def test_a_read_lost_with_its_connection_is_recovered_by_its_worker_in_seconds(r, settings, production):
    s = settings.with_overrides(reclaim_min_idle_ms=3_600_000, reclaim_interval_s=1.0)  # no backstop
    with ThreadedWorker(Worker(s, MODEL)) as worker:
        lose_a_read(r, worker.worker_id, ["lost0", "lost1"])
        assert cut_connections(r, worker.worker_id) >= 1
        started = time.monotonic()
        wait_until(lambda: r.llen(keys.reply_key(MODEL, "lost1")), 15, message="the lost read stayed lost")
        assert time.monotonic() - started < 15
    assert [reply(r, f"lost{i}")["ok"] for i in range(2)] == [True, True]
    assert consumers(r) == {}, "nothing pending; the worker signed off"


@contextmanager
def beating(r, worker_id: str, interval_s: float) -> Iterator[threading.Event]:
    """Heartbeats for a worker that is alive (its process is this test); set the event to stop."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            beat(r, worker_id)
            stop.wait(interval_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join()


@pytest.mark.timeout(60)  # waits: the worker's 10 s, three of 10 s (the pause is 3 s, the grace 2.2 s)
def test_an_outage_longer_than_the_ttl_does_not_make_a_live_worker_look_dead(r, settings, production):
    """Redis paused longer than the TTL: nobody could beat. After it, a worker waits an interval and a
    TTL before taking over: the live worker beats again meanwhile and keeps its entries; a worker that
    never beats again is still taken over once that grace has passed."""
    s = settings.with_overrides(heartbeat_ttl_s=2.0, reclaim_min_idle_ms=3_600_000)
    pause_ms = int(s.heartbeat_ttl_s * 1000 * 1.5)
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    with beating(r, "live-worker", s.heartbeat_interval_s / 2) as stop:
        send(r, "a0")
        send(r, "a1")
        r.xreadgroup(GROUP, "live-worker", {STREAM: ">"})
        with ThreadedWorker(Worker(s, MODEL)) as taker:
            stop.set()  # the outage: neither the live worker nor the taker can beat
            paused_at_ms = presence.now_in_ms()
            r.execute_command("CLIENT", "PAUSE", pause_ms, "ALL")
            member, zset = taker.worker_id, keys.workers_zset(MODEL)
            wait_until(lambda: (r.zscore(zset, member) or 0) > paused_at_ms + pause_ms, 10,
                       message="the taker did not beat after the pause")
            with beating(r, "live-worker", s.heartbeat_interval_s / 2):  # back, as its pulse would be
                grace_end_ms = presence.now_in_ms() + (s.heartbeat_interval_s + s.heartbeat_ttl_s) * 1000
                # A heartbeat after the grace, and so the take-over check that follows it, has run.
                wait_until(lambda: (r.zscore(zset, member) or 0) > grace_end_ms + 2 * s.heartbeat_interval_s
                           * 1000, 10, message="the taker stopped beating")
                assert consumers(r).get("live-worker") == 2, "a live worker's entries were taken over"
                assert r.llen(keys.reply_key(MODEL, "a0")) == 0
            # Now it is dead for real: taken over once its heartbeat is older than the TTL.
            wait_until(lambda: r.llen(keys.reply_key(MODEL, "a1")), 10,
                       message="a dead worker kept its entries")
    assert [reply(r, f"a{i}")["ok"] for i in range(2)] == [True, True]


@pytest.mark.timeout(60)
def test_a_worker_starting_as_redis_comes_back_leaves_workers_yet_to_beat_alone(r, settings, production):
    """A worker that starts (or first reaches Redis) right after an outage has not watched the others
    beat for a TTL: a worker whose heartbeat lapsed only with the outage, and that beats again within an
    interval and a TTL, keeps its entries."""
    # A short interval: the take-over's guard (a consumer seen within one interval is left alone) has
    # expired by the time the starter has loaded its model.
    s = settings.with_overrides(heartbeat_interval_s=0.05, heartbeat_ttl_s=2.0, reclaim_min_idle_ms=3_600_000)
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    send(r, "b0")
    r.xreadgroup(GROUP, "live-worker", {STREAM: ">"})
    r.zadd(keys.workers_zset(MODEL), {"live-worker": presence.now_in_ms() - 10_000})  # lapsed in the outage
    with ThreadedWorker(Worker(s, MODEL)) as starter, beating(r, "live-worker", s.heartbeat_interval_s / 2):
        member, zset = starter.worker_id, keys.workers_zset(MODEL)
        after_grace_ms = presence.now_in_ms() + (s.heartbeat_interval_s + s.heartbeat_ttl_s) * 1000
        wait_until(lambda: (r.zscore(zset, member) or 0) > after_grace_ms, 15,
                   message="the starter stopped beating")
        assert consumers(r).get("live-worker") == 1, "a live worker's entry was taken over"
    assert r.llen(keys.reply_key(MODEL, "b0")) == 0
