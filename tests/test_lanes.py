"""Priority lanes and backpressure: live before backfill, shedding from the published load."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import MODEL, ThreadedWorker, wait_until

from producer import Client
from protocol import codec, keys, messages, sharding
from protocol.errors import DeadlineExceeded, Overloaded
from worker.consumer import Entry, StreamConsumer
from worker.load import LoadMeter, Sample
from worker.worker import Worker

X = np.random.default_rng(5).standard_normal((60, 110)).astype(np.float32)


def send(r, request_id: str, lane: str = "live", deadline_ms: int | None = None) -> None:
    fields = messages.encode_request(request_id, {"features": X[None]},
                                     deadline_ms=deadline_ms or int(time.time() * 1000) + 60_000)
    r.xadd(keys.request_stream(MODEL, 0, lane), fields)


def reply(r, request_id: str) -> dict:
    raw = r.lpop(keys.reply_key(MODEL, request_id))
    assert raw is not None, f"no reply for {request_id}"
    return codec.unpack(raw, max_bytes=1 << 24)


def test_a_read_takes_live_entries_before_backfill(r, settings, production):
    worker = Worker(settings, MODEL, burst=True)
    worker.consumer.ensure_group()
    for i in range(5):
        send(r, f"b{i}", "backfill")
    for i in range(3):
        send(r, f"l{i}")
    batch = worker.consumer.read(4, 0)
    assert [e.lane for e in batch] == ["live"] * 3 + ["backfill"]
    worker.redis.close()


def test_a_burst_worker_answers_both_lanes_and_acks_each_in_its_stream(r, settings, production):
    for i in range(4):
        send(r, f"b{i}", "backfill")
        send(r, f"l{i}")
    Worker(settings, MODEL, burst=True).run()
    assert all(reply(r, f"{lane}{i}")["ok"] for lane in "bl" for i in range(4))
    for lane in keys.LANES:
        stream = keys.request_stream(MODEL, 0, lane)
        assert r.xlen(stream) == 0 and r.xpending(stream, keys.consumer_group(MODEL))["pending"] == 0


def test_a_deadline_sooner_than_the_quickest_model_call_is_shed_on_read(r, settings, production):
    worker = Worker(settings, MODEL, burst=True)
    worker.processor.fastest_call_ms.add(5_000.0)  # as if every recent call took 5 s
    send(r, "short", deadline_ms=int(time.time() * 1000) + 1_000)
    send(r, "long", deadline_ms=int(time.time() * 1000) + 60_000)
    worker.run()
    short = reply(r, "short")
    assert short["ok"] is False and short["error"]["code"] == "OVERLOADED"
    assert "quickest recent model call" in short["error"]["message"]
    assert reply(r, "long")["ok"]


def publish_load(r, backlog: dict[str, int], drain_per_s: float) -> None:
    load = sharding.ShardLoad(backlog, drain_per_s, int(time.time() * 1000))
    r.hset(keys.load_hash(MODEL), mapping=load.to_hash())


def test_the_client_sheds_before_sending_when_the_backlog_outlasts_its_timeout(r, settings, production):
    # 10,000 entries ahead at 100/s: 100 s of backlog for the backfill lane, none for live.
    publish_load(r, {"live": 0, "backfill": 10_000}, 100.0)
    with Client.from_url(settings.redis_url, timeout_s=0.3, fail_fast=False) as client:
        with pytest.raises(DeadlineExceeded):  # the first call reads the load (no worker answers)
            client.predict(MODEL, X, lane="backfill")
        sent = r.xlen(keys.request_stream(MODEL, 0, "backfill"))
        started = time.monotonic()
        with pytest.raises(Overloaded, match="not sent"):
            client.predict(MODEL, X, lane="backfill")
        assert time.monotonic() - started < 0.2, "shed at once, without waiting for the timeout"
        assert r.xlen(keys.request_stream(MODEL, 0, "backfill")) == sent, "nothing was sent"
        with pytest.raises(DeadlineExceeded):  # live does not queue behind backfill: sent, and waits
            client.predict(MODEL, X, lane="live")
    assert r.xlen(keys.request_stream(MODEL)) == 1


def test_a_client_sheds_only_on_a_fresh_reading(r, settings, production, monkeypatch):
    """A shed call reads no load: once the reading is old, the next call goes out and re-reads it."""
    from producer import _core

    publish_load(r, {"live": 0, "backfill": 10_000}, 100.0)
    with Client.from_url(settings.redis_url, timeout_s=0.3, fail_fast=False) as client:
        with pytest.raises(DeadlineExceeded):
            client.predict(MODEL, X, lane="backfill")
        with pytest.raises(Overloaded):
            client.predict(MODEL, X, lane="backfill")
        monkeypatch.setattr(_core, "LOAD_REFRESH_S", 0.0)  # as if the reading were old
        r.delete(keys.load_hash(MODEL))  # the fleet's backlog is gone
        with pytest.raises(DeadlineExceeded):  # sent (no worker answers), not shed
            client.predict(MODEL, X, lane="backfill")
    assert r.xlen(keys.request_stream(MODEL, 0, "backfill")) == 2


def test_stale_or_malformed_load_sheds_nothing():
    old = {"backlog:live": "1000000", "drain_per_s": "1", "at_ms": "0"}
    assert sharding.ShardLoad.from_hash(old) is not None  # parsed, but too old to act on (client side)
    assert sharding.ShardLoad.from_hash({"drain_per_s": "nan", "at_ms": "1"}) is None
    assert sharding.ShardLoad.from_hash({b"drain_per_s": b"\xff", b"at_ms": b"1"}) is None
    unknown_rate = sharding.ShardLoad({"live": 50, "backfill": 0}, 0.0, 1)
    assert unknown_rate.expected_wait_ms("live") == 0.0, "no rate measured: do not guess"
    load = sharding.ShardLoad({"live": 50, "backfill": 150}, 100.0, 1)
    assert load.expected_wait_ms("live") == 500.0 and load.expected_wait_ms("backfill") == 2000.0


@pytest.mark.parametrize("skew_s", [0.0, -10.0, 10.0], ids=["fresh", "stale", "future-dated"])
def test_a_load_dated_far_from_the_clients_clock_sheds_nothing(skew_s):
    from producer._core import Router, Target

    target = Target(MODEL)
    load = sharding.ShardLoad({"live": 1_000_000, "backfill": 0}, 1.0, int((time.time() + skew_s) * 1000))
    router = Router()
    router.set_load(target, [load.to_hash()])
    if skew_s == 0.0:
        with pytest.raises(Overloaded):
            router.check(target, 1.0)
    else:
        router.check(target, 1.0)  # a host whose clock is off is no basis for refusing work


def _sample(at_s: float, computed: int, backlog: int, live: int = 0, backfill: int = 0) -> Sample:
    return Sample(at_s, computed, {"live": live, "backfill": backfill}, backlog)


def test_the_drain_rate_is_entries_computed_over_at_least_a_second():
    meter = LoadMeter.__new__(LoadMeter)  # the rates are pure arithmetic on samples
    meter._reads, meter._busy_rate = {}, {}
    assert meter._rates(0, _sample(0.0, 100, 5))[0] == 0.0
    assert meter._rates(0, _sample(0.3, 130, 5))[0] == 0.0, "too short a window to say"
    assert meter._rates(0, _sample(1.0, 300, 5))[0] == pytest.approx(200.0)
    assert meter._rates(0, _sample(2.0, 400, 5))[0] == pytest.approx(100.0)
    # The backlog emptied: the window measured arrivals, not capacity; the busy rate stands.
    assert meter._rates(0, _sample(3.0, 410, 0))[0] == pytest.approx(100.0)
    assert meter._rates(0, _sample(4.0, 420, 3))[0] == pytest.approx(100.0), "idle time still in the window"
    # A counter that went back (stream recreated) restarts the window instead of a negative rate.
    assert meter._rates(0, _sample(5.0, 10, 3))[0] == pytest.approx(100.0)


def test_arrival_rates_are_measured_per_lane_busy_or_not():
    meter = LoadMeter.__new__(LoadMeter)
    meter._reads, meter._busy_rate = {}, {}
    meter._rates(0, _sample(0.0, 0, 0, live=1000, backfill=0))
    _, arrive = meter._rates(0, _sample(1.0, 0, 0, live=1300, backfill=2000))
    assert arrive == {"live": pytest.approx(300.0), "backfill": pytest.approx(2000.0)}


def test_a_lower_lane_waits_for_what_arrives_on_the_higher_ones():
    load = sharding.ShardLoad({"live": 10, "backfill": 90}, 1000.0, 1, {"live": 600.0, "backfill": 5000.0})
    assert load.expected_wait_ms("live") == pytest.approx(10.0), "live arrivals do not delay live"
    assert load.expected_wait_ms("backfill") == pytest.approx(100 / 400 * 1000)
    swamped = sharding.ShardLoad({"live": 0, "backfill": 1}, 1000.0, 1, {"live": 1200.0})
    assert swamped.expected_wait_ms("backfill") == float("inf"), "live alone takes every slot"
    assert swamped.expected_wait_ms("live") == 0.0
    again = sharding.ShardLoad.from_hash(load.to_hash())
    assert again is not None and again.arrive_per_s == load.arrive_per_s
    assert sharding.ShardLoad.from_hash({**load.to_hash(), "arrive_per_s:live": "-1"}) is None


def test_discarded_entries_do_not_count_as_drained(r, settings, slow_production):
    """Expired entries leave the stream at once; only computed ones show what the fleet can do."""
    s = settings.with_overrides(load_interval_s=0.05)
    for i in range(50):  # long expired when read: answered DEADLINE_EXCEEDED without a model call
        send(r, f"x{i}", "backfill", deadline_ms=1)
    send(r, "ok", "live")
    Worker(s, MODEL, burst=True).run()
    assert int(r.get(keys.discarded_counter(MODEL))) == 50
    consumer = StreamConsumer(r, MODEL, "probe", s)
    state, discarded = consumer.group_state()
    assert sum(c.answered for c in state.values()) - discarded == 1


def test_workers_publish_backlog_and_drain_rate(r, settings, slow_production):
    s = settings.with_overrides(load_interval_s=0.05, max_batch=1)
    for i in range(400):  # a backlog that lasts over a second: only a busy window measures the rate
        send(r, f"b{i}", "backfill")
    with ThreadedWorker(Worker(s, MODEL)):
        load = wait_until(lambda: sharding.ShardLoad.from_hash(r.hgetall(keys.load_hash(MODEL))), 5)
        assert set(load.backlog) == set(keys.LANES)
        wait_until(lambda: (sharding.ShardLoad.from_hash(r.hgetall(keys.load_hash(MODEL))) or load)
                   .drain_per_s > 0, 10, message="no drain rate measured")
    assert r.pttl(keys.load_hash(MODEL)) > 0, "the load expires when no worker is left"


def test_live_requests_jump_a_backfill_backlog(r, settings, slow_production):
    """The priority-lane scenario: a deep backfill backlog on a slow model, then live requests.

    Every live request is answered while the backfill backlog is still deep: each waits at
    most for the batch in progress, never behind the queued backfill.
    """
    for i in range(30):
        send(r, f"b{i}", "backfill")
    backfill = keys.request_stream(MODEL, 0, "backfill")
    with ThreadedWorker(Worker(settings.with_overrides(max_batch=1), MODEL)) as worker, \
            Client.from_url(settings.redis_url, timeout_s=5.0) as client:
        wait_until(lambda: worker.batches >= 1, 5)
        for _ in range(3):
            assert client.predict(MODEL, X, lane="live").model_version == slow_production.version
            assert r.xlen(backfill) > 15, "the live request was answered before the backfill backlog"


def test_backfill_fills_a_batch_only_up_to_its_cap_while_live_requests_arrive(r, settings, production):
    worker = Worker(settings.with_overrides(max_batch=8, backfill_max_batch=2, overlap_io=False), MODEL,
                    burst=True)
    consumer = worker.consumer
    consumer.ensure_group()
    worker.reconcile()
    for i in range(12):
        send(r, f"b{i}", "backfill")
    batches = [consumer.read(8, 0)]
    assert len(batches[0]) == 8, "no live traffic: backfill gets full batches"
    send(r, "l0")
    batches.append(consumer.read(8, 0))
    assert [e.lane for e in batches[-1]] == ["live", "backfill", "backfill"]
    batches.append(consumer.read(8, 0))
    assert [e.lane for e in batches[-1]] == ["backfill"] * 2, "live seen recently: still capped"
    for batch in batches:
        worker.process(batch)
    assert all(reply(r, f"b{i}")["ok"] for i in range(12)) and reply(r, "l0")["ok"]
    assert r.xlen(keys.request_stream(MODEL, 0, "backfill")) == 0
    worker.redis.close()


def test_a_write_brings_back_the_next_batch_and_a_stopping_worker_answers_it(r, settings, production):
    worker = Worker(settings.with_overrides(overlap_io=False), MODEL, burst=True)  # the read in the write
    worker.consumer.ensure_group()
    worker.reconcile()
    send(r, "first")
    batch = worker.consumer.read(32, 0)
    for i in range(3):
        send(r, f"next{i}")
    worker.process(batch, prefetch=32)
    assert [e.lane for e in worker.consumer.prefetched] == ["live"] * 3, "read in the reply transaction"
    assert reply(r, "first")["ok"]
    worker.stop()
    worker.run()  # stopping at once: only the prefetched entries are answered before it exits
    assert all(reply(r, f"next{i}")["ok"] for i in range(3))
    assert r.xlen(keys.request_stream(MODEL)) == 0


def test_live_entries_beyond_a_read_are_held_never_dropped(r, settings):
    consumer = StreamConsumer(r, MODEL, "c1", settings)
    consumer.prefetched = [Entry(f"1-{i}", {}, "live") for i in range(5)]  # a prefetch larger than the read
    assert [e.id for e in consumer.read(3, 0)] == ["1-0", "1-1", "1-2"]
    assert [e.id for e in consumer.take_unanswered()] == ["1-3", "1-4"]


def test_a_malformed_discarded_counter_reads_as_zero(r, settings):
    consumer = StreamConsumer(r, MODEL, "c1", settings)
    consumer.ensure_group()
    for junk in ("junk", "-5", "1e400"):
        r.set(keys.discarded_counter(MODEL), junk)
        assert consumer.group_state()[1] == 0, junk


def test_a_read_ahead_that_fails_inside_the_reply_transaction_is_left_to_the_next_read(
        r, settings, production):
    worker = Worker(settings.with_overrides(overlap_io=False), MODEL, burst=True)
    worker.consumer.ensure_group()
    worker.reconcile()
    send(r, "first")
    batch = worker.consumer.read(32, 0)
    for lane in keys.LANES:  # gone under the worker: XACK/XDEL of nothing, XREADGROUP answers NOGROUP
        r.delete(keys.request_stream(MODEL, 0, lane))
    worker.process(batch, prefetch=32)
    assert worker.consumer.prefetched is None and reply(r, "first")["ok"], "the reply still landed"
    assert worker.consumer.read(32, 0) == [], "the next read recreates the group"
    send(r, "second")
    assert [e.lane for e in worker.consumer.read(32, 0)] == ["live"]
    worker.redis.close()


def test_backfill_held_back_by_its_cap_makes_the_write_read_ahead(r, settings, production):
    worker = Worker(settings.with_overrides(max_batch=8, backfill_max_batch=2, overlap_io=False), MODEL,
                    burst=True)
    worker.consumer.ensure_group()
    worker.reconcile()
    send(r, "l0")
    for i in range(10):
        send(r, f"b{i}", "backfill")
    assert worker._step()  # live + 2 backfill: not a full batch, but 6 backfill are held back
    assert reply(r, "l0")["ok"] and worker.consumer.prefetched is not None, "the write read ahead"
    worker.run()
    assert all(reply(r, f"b{i}")["ok"] for i in range(10))
