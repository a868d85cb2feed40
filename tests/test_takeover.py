"""A whole trading day: answered entries leave the stream, dead workers' entries are taken over at once."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from conftest import MODEL, wait_for_workers, wait_until
from test_worker import drain, pending_count, reply, send

from protocol import keys, presence
from worker.consumer import StreamConsumer

X = np.random.default_rng(3).standard_normal((60, 110)).astype(np.float32)
STREAM, GROUP = keys.request_stream(MODEL), keys.consumer_group(MODEL)


def read_as(r, consumer: str, count: int = 100) -> list[bytes]:
    """Deliver entries to ``consumer`` (a worker that then dies without a word)."""
    response = r.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=count)
    return [entry_id for entry_id, _ in response[0][1]] if response else []


def consumers(r) -> dict[str, int]:
    return {c["name"].decode(): c["pending"] for c in r.xinfo_consumers(STREAM, GROUP)}


def idle_for(r, consumer: str, idle_ms: int) -> None:
    """Backdate ``consumer``'s pending entries as if delivered ``idle_ms`` ago (XCLAIM IDLE to the
    same consumer; JUSTID leaves the delivery count as it is)."""
    rows = r.xpending_range(STREAM, GROUP, "-", "+", 1000, consumername=consumer)
    r.xclaim(STREAM, GROUP, consumer, 0, [row["message_id"] for row in rows], idle=idle_ms, justid=True)


def beat(r, worker_id: str) -> None:
    """A heartbeat as a live worker writes it."""
    now_ms = presence.now_in_ms()
    fields = presence.Heartbeat(worker_id, heartbeat_ms=now_ms).to_hash()
    r.hset(keys.worker_hash(MODEL, worker_id), mapping=fields)
    r.zadd(keys.workers_zset(MODEL), {worker_id: now_ms})


def test_answered_entries_leave_the_stream_with_their_ack(r, settings, production):
    for i in range(20):
        send(r, f"r{i}")
    send(r, "bad", X[:, :100])
    drain(settings)
    assert r.xlen(STREAM) == 0 and pending_count(r) == 0
    assert all(reply(r, f"r{i}")["ok"] for i in range(20)) and reply(r, "bad")["ok"] is False


def test_a_dead_workers_entries_are_taken_over_without_waiting_for_the_idle_time(r, settings, production):
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    send(r, "late", deadline_ms=int(time.time() * 1000) - 5)
    for i in range(3):
        send(r, f"t{i}")
    assert len(read_as(r, "dead-worker")) == 4  # it never heartbeats: dead as far as the fleet knows
    read_as(r, "empty-dead-worker")
    slow_backstop = settings.with_overrides(reclaim_min_idle_ms=3_600_000, heartbeat_interval_s=0.001)
    # The XCLAIM guard: entries must be idle longer than one heartbeat interval (a minute here),
    # still far below the reclaim backstop's hour.
    idle_for(r, "dead-worker", 60_000)
    drain(slow_backstop)
    assert [reply(r, f"t{i}")["ok"] for i in range(3)] == [True] * 3
    assert reply(r, "late")["error"]["code"] == "DEADLINE_EXCEEDED"
    assert consumers(r) == {} and r.xlen(STREAM) == 0, "dead consumers removed, nothing left behind"


def test_entries_of_a_live_worker_are_left_alone(r, settings, production):
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    send(r, "busy")
    beat(r, "live-worker")
    read_as(r, "live-worker")
    drain(settings.with_overrides(reclaim_min_idle_ms=3_600_000))
    assert consumers(r) == {"live-worker": 1}
    assert r.llen(keys.reply_key(MODEL, "busy")) == 0


def test_two_workers_racing_for_a_dead_consumer_take_each_entry_once(r, settings, production):
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    for i in range(5):
        send(r, f"x{i}")
    read_as(r, "dead-worker")
    s = settings.with_overrides(heartbeat_interval_s=0.05)
    idle_for(r, "dead-worker", 60_000)  # dead long enough: its entries are idle past the guard
    got: list[list[str]] = []
    first, second = (StreamConsumer(r, MODEL, name, s) for name in ("w1", "w2"))
    # Both listed the dead consumer's entries before either claimed them: only XCLAIM's guard decides.
    # The dead worker read a moment ago; as listed, it has been silent for a minute.
    listed = [c | {"idle": 60_000} for c in first._consumers("live")]
    seen = iter([first._pending_ids("dead-worker", "live"), []])
    for c in (first, second):
        c._consumers = lambda lane="live": listed if lane == "live" else []  # type: ignore[method-assign]
    second._pending_ids = lambda consumer, lane="live": next(seen, [])  # type: ignore[method-assign]
    for consumer in (first, second):
        consumer.take_over({"w1", "w2"}, lambda fresh, over: got.append([e[0] for e in fresh + over]))
    assert [len(ids) for ids in got] == [5], "the second claim finds them freshly claimed and skips them"


def test_a_consumer_seen_within_a_heartbeat_interval_is_kept_though_missing_from_live(r, settings):
    """``live`` is read before the listing: a worker that started in between (heartbeat, then its
    first read) is not in it, and deleting its empty consumer would drop what it reads next."""
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    r.xgroup_createconsumer(STREAM, GROUP, "just-started")  # as its first read does; nothing pending
    slow_beats = settings.with_overrides(heartbeat_interval_s=60, heartbeat_ttl_s=120)
    taker = StreamConsumer(r, MODEL, "w1", slow_beats)
    assert taker.take_over(set(), lambda fresh, over: None) == 0
    assert consumers(r) == {"just-started": 0}


@pytest.mark.timeout(90)  # waits: the children's start 30 s, their exit 20 s
def test_killing_the_supervisor_stops_its_workers(r, client, start_worker, production):
    supervisor = start_worker("--processes", "2")
    pids = wait_for_workers(client, 2)
    supervisor.send_signal(signal.SIGKILL)
    supervisor.wait()
    wait_until(lambda: not any(_alive(pid) for pid in pids), 20, interval_s=0.05,
               message="orphaned workers still running")
    assert client.health(MODEL).workers == [], "they drained and signed off"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return os.path.exists(f"/proc/{pid}")


def test_registry_history_is_capped(r, registry, production, monkeypatch):
    from registry import store

    monkeypatch.setattr(store, "HISTORY_MAXLEN", 3)
    for i in range(6):
        registry.set_alias(MODEL, f"a{i}", production.version)
    assert r.xlen(keys.history_stream(MODEL)) == 3
