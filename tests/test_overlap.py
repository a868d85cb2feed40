"""overlap_io: the next read and the last reply transaction travel while the model runs."""

from __future__ import annotations

import pytest
from conftest import MODEL
from test_worker import drain, pending_count, reply, send

from protocol import keys
from worker.consumer import Outbox
from worker.worker import Worker


def _ready(settings, **overrides) -> Worker:
    worker = Worker(settings.with_overrides(**overrides), MODEL, burst=True)
    worker.consumer.ensure_group()
    worker.reconcile()
    return worker


def test_the_read_ahead_is_in_flight_during_the_model_call_and_the_write_confirmed_after(
        r, settings, production):
    worker = _ready(settings)
    consumer = worker.consumer
    assert consumer.link is not None, "on by default on a single node"
    send(r, "first")
    batch = consumer.read(32, 0)
    for i in range(3):
        send(r, f"next{i}")
    in_flight: list[list[object]] = []
    backend, run = worker.slot.loaded.backend, worker.slot.loaded.backend.run

    def watched(*args, **kwargs):
        in_flight.append([tag for _, tag in consumer.link.unanswered])
        return run(*args, **kwargs)

    backend.run = watched
    consumer.read_ahead(32)
    worker.process(batch, consumer=consumer)
    assert in_flight == [[None]], "the read was sent, its answer not yet read, while the model ran"
    assert [type(tag) for _, tag in consumer.link.unanswered] == [Outbox], "the write's answer comes later"
    assert [e.lane for e in consumer.prefetched] == ["live"] * 3, "the read's answer is the next batch"
    consumer.settle()
    assert len(consumer.confirmed) == 1 and not consumer.unconfirmed
    worker._collect(consumer)
    assert reply(r, "first")["ok"]
    worker.stop()
    worker.run()  # stopping at once: the entries read ahead are answered, every write lands
    assert all(reply(r, f"next{i}")["ok"] for i in range(3))
    assert r.xlen(keys.request_stream(MODEL)) == 0 and pending_count(r) == 0
    assert consumer.link.conn is None and not consumer.link.unanswered, "the connection went back"


def test_a_write_whose_answer_is_lost_is_written_again_and_the_link_recovers(r, settings, production):
    worker = _ready(settings)
    consumer = worker.consumer
    send(r, "first")
    worker.process(consumer.read(32, 0), consumer=consumer)
    consumer.link.conn.disconnect()  # the answer never comes back: landed or not, it is unconfirmed
    send(r, "second")
    batch = consumer.read(32, 0)
    assert len(batch) == 1, "the read settles the link (lost) and reads anew"
    assert len(consumer.unconfirmed) == 1 and consumer.link_error is not None
    worker._collect(consumer)  # written again, synchronously: a second copy of the reply is tolerated
    assert reply(r, "first")["ok"]
    worker.process(batch, consumer=consumer)  # on the link's new connection
    worker.run()
    assert reply(r, "second")["ok"] and pending_count(r) == 0 and r.xlen(keys.request_stream(MODEL)) == 0


def test_without_overlap_the_write_is_confirmed_before_process_returns(r, settings, production):
    worker = _ready(settings, overlap_io=False)
    assert worker.consumer.link is None
    send(r, "first")
    worker.process(worker.consumer.read(32, 0))
    assert reply(r, "first")["ok"]
    worker.redis.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overlap_io", [True, False])
def test_a_reply_key_of_the_wrong_type_costs_its_reply_only_never_the_worker(
        r, settings, production, caplog, overlap_io):
    """A command refused inside EXEC (here LPUSH onto a string a bot or an operator left at a reply
    key) fails the same way every time: writing the transaction again would wedge the worker."""
    r.set(keys.reply_key(MODEL, "poisoned"), "not a list")
    send(r, "poisoned")
    send(r, "fine")
    drain(settings.with_overrides(overlap_io=overlap_io))
    assert reply(r, "fine")["ok"]
    assert r.get(keys.reply_key(MODEL, "poisoned")) == b"not a list"
    assert r.xlen(keys.request_stream(MODEL)) == 0 and pending_count(r) == 0, "acked with the other replies"
    assert any("WRONGTYPE" in m for m in caplog.messages)


def test_a_read_ahead_that_cannot_be_sent_hands_the_unanswered_write_back(r, settings, production):
    """The link fails while sending: the write still unanswered on it is written again, and the
    entries are served by the next plain read."""
    import redis as redis_py

    worker = _ready(settings)
    consumer = worker.consumer
    send(r, "first")
    worker.process(consumer.read(32, 0), consumer=consumer)  # its write's answer not read yet
    send(r, "second")

    conn = consumer.link.conn
    real = conn.send_packed_command

    def refuse_once(*_args, **_kwargs):
        conn.send_packed_command = real  # the connection goes back to the pool: fine from then on
        raise redis_py.ConnectionError("connection reset")

    conn.send_packed_command = refuse_once
    consumer.read_ahead(32)
    assert len(consumer.unconfirmed) == 1 and not consumer.link.unanswered and consumer.link.conn is None
    worker._collect(consumer)
    assert reply(r, "first")["ok"]
    worker.run()
    assert reply(r, "second")["ok"] and pending_count(r) == 0


def test_a_consumer_whose_idle_time_is_unreadable_counts_as_idle():
    from worker.consumer import _idle_ms

    assert _idle_ms({"idle": 250}) == 250.0
    assert _idle_ms({"idle": b"junk"}) == _idle_ms({}) == float("inf")


def test_a_shard_no_longer_read_gives_its_kept_connection_back(r, settings, production):
    worker = Worker(settings, MODEL, burst=True, shards=[0, 1])
    worker.reconcile()
    for consumer in worker.consumers.values():
        consumer.ensure_group()
    dropped = worker.consumers[1]
    dropped.read_ahead(8)  # the link opens its connection
    dropped.settle()
    assert dropped.link.conn is not None and not dropped.busy
    worker._set_shards(worker.served[MODEL], [0])
    assert 1 not in worker.consumers and dropped.link.conn is None, "the connection went back to the pool"
    worker.redis.close()


def test_refreshing_idle_times_does_not_count_a_write_landing_meanwhile_as_trimmed(r, settings, production):
    """The heartbeat lists what is pending on the worker, then claims it to itself; a reply transaction
    in flight that lands in between acks and deletes its entries: answered, not trimmed."""
    worker = _ready(settings)
    consumer = worker.consumer
    send(r, "first")
    batch = consumer.read(32, 0)
    r.execute_command("CLIENT", "PAUSE", 300, "WRITE")  # the write waits; the listing (a read) does not
    worker.process(batch, consumer=consumer)  # overlap_io: the transaction is sent, not confirmed
    consumer.touch()  # lists "first" as pending; its claim runs after the write lands
    consumer.settle()
    assert reply(r, "first")["ok"]
    assert int(r.get(keys.discarded_counter(MODEL)) or 0) == 0, "an answered entry counted as trimmed"
