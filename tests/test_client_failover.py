"""Failover, client side: once a request may be queued and its slot's master changes under the
wait, the client looks for the request on the new master: found (entry or reply), it waits
there; not found, it ends at once with ``Interrupted``, which says it is safe to re-send."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis
from conftest import wait_until

from producer import Interrupted, _core
from protocol import codec, connection, keys, messages

X = np.random.default_rng(12).standard_normal((60, 110)).astype(np.float32)
MOVED_MODEL = "failover-model"  # a slot of its own: moving it leaves the other tests' keys alone


# ---- the decision, without Redis ------------------------------------------------------------


def exchange(n: int = 2) -> _core.Exchange:
    pendings = _core.prepare_many(_core.Target("m"), [X] * n, route="", timeout_s=5.0)
    ex = _core.Exchange(pendings, 5.0)
    ex.trip()
    ex.sent([f"{1000 + i}-0".encode() for i in range(n)])
    return ex


def reply_for(ex: _core.Exchange, i: int) -> bytes:
    return codec.pack({"v": 1, "id": ex.gatherer.pendings[i].request_id, "ok": True, "model": "m",
                       "version": 1, "outputs": {}})


def test_the_look_reads_each_entry_by_its_id_and_the_reply_list_on_the_new_master():
    ex = exchange()
    trip = ex.verify_trip()
    assert trip.commands == [("XRANGE", ex.stream, "1000-0", "1000-0"),
                             ("XRANGE", ex.stream, "1001-0", "1001-0"), ("LRANGE", ex.reply_key, 0, -1)]
    assert trip.key == ex.reply_key and trip.deadline_s <= time.time() + _core.VERIFY_MAX_S


def test_entries_there_keep_the_wait_going():
    ex = exchange()
    ex.verified([[(b"1000-0", {})], [(b"1001-0", {})], []])  # no raise: the new master has them


def test_a_reply_there_counts_and_a_lost_entry_is_interrupted_with_its_id():
    ex = exchange()
    with pytest.raises(Interrupted, match="re-sent with the same id") as caught:
        ex.verified([[], [], [reply_for(ex, 0)]])
    assert caught.value.request_ids == [ex.gatherer.pendings[1].request_id], "only the unanswered one"
    assert caught.value.request_ids[0] in str(caught.value) and "resend=True" in str(caught.value)


def test_nothing_there_interrupts_every_request_and_an_unreadable_answer_proves_nothing():
    ex = exchange()
    ex.verified([redis.ConnectionError("gone"), [], []])  # cannot tell: keep waiting
    with pytest.raises(Interrupted) as caught:
        ex.verified([[], [], []])
    assert caught.value.request_ids == [p.request_id for p in ex.gatherer.pendings]


def test_entries_the_bot_role_may_not_read_count_as_not_seen():
    """Under the documented ACLs a bot cannot XRANGE request streams: decide on the reply alone."""
    ex = exchange()
    denied = redis.exceptions.NoPermissionError("this user has no permissions to run the 'xrange' command")
    with pytest.raises(Interrupted) as caught:
        ex.verified([denied, denied, [reply_for(ex, 0)]])
    assert caught.value.request_ids == [ex.gatherer.pendings[1].request_id]


def test_entry_ids_never_read_are_interrupted_if_no_reply_is_there():
    pendings = [_core.prepare(_core.Target("m"), X, route="", timeout_s=5.0, sample_ndim=None)]
    ex = _core.Exchange(pendings, 5.0)
    ex.trip()
    ex.lost(redis.ConnectionError("lost before the XADD's answer"))
    assert [c[0] for c in ex.verify_trip().commands] == ["LRANGE"]
    with pytest.raises(Interrupted):
        ex.verified([[]])


def test_a_resend_needs_the_earlier_id_and_marks_the_entry():
    with pytest.raises(Exception, match="needs the request_id"):
        _core.check_call(1.0, 60.0, None, resend=True)
    pending = _core.prepare(_core.Target("m"), X, route="", timeout_s=1.0, sample_ndim=None,
                            request_id="order-7", resend=True)
    assert pending.fields["resend"] == "1" and pending.fields["id"] == "order-7"
    many = _core.prepare_many(_core.Target("m"), [X, X], route="", timeout_s=1.0, request_ids=["a", "b"],
                              resend=True)
    assert [p.fields["id"] for p in many] == ["a", "b"] and all(p.fields["resend"] == "1" for p in many)


# ---- on a real cluster: the slot moves under a waiting call ---------------------------------


@pytest.fixture
def rc(redis_cluster):
    client = connection.connect(redis_cluster.url)
    yield client
    client.close()


def _move_slot(plain: dict, slot: int, to_port: int) -> None:
    """Give ``slot`` (emptied first) to the node on ``to_port``: what the wait sees is what a
    failover to a replica that had not received the entry looks like."""
    for client in plain.values():
        for key in client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000):
            client.delete(key)
    node_id = plain[to_port].execute_command("CLUSTER", "MYID")
    for client in plain.values():
        client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", node_id)


def _blocked(client: redis.Redis) -> dict | None:
    return next((c for c in client.client_list() if "b" in c["flags"]), None)


@pytest.mark.timeout(60)  # waits: 5 + 5 s, then 15 s or 5 + 15 s
@pytest.mark.parametrize("replicated", [False, True])
def test_a_wait_whose_slot_changes_master_ends_interrupted_or_goes_on_there(rc, redis_cluster, call,
                                                                           replicated):
    stream = keys.request_stream(MOVED_MODEL)
    slot, home = connection.slot(stream), rc.get_node_from_key(stream).port
    plain = {node.port: client for node, client in zip(redis_cluster.nodes, redis_cluster.node_clients(),
                                                       strict=True)}
    away = next(port for port in plain if port != home)
    _move_slot(plain, slot, home)  # a clean slot
    future = call(redis_cluster.url, "predict", MOVED_MODEL, X, timeout_s=10.0)
    entry = wait_until(lambda: plain[home].xrange(stream), 5)[0]
    victim = wait_until(lambda: _blocked(plain[home]), 5)
    started = time.monotonic()
    try:
        _move_slot(plain, slot, away)
        if replicated:  # the new master got the entry before the old one died
            plain[away].xadd(stream, entry[1], id=entry[0])
        plain[home].client_kill_filter(_id=victim["id"])
        if not replicated:
            with pytest.raises(Interrupted) as caught:
                future.result(timeout=15)
            request_id = entry[1][b"id"].decode()
            assert caught.value.request_ids == [request_id]
            assert time.monotonic() - started < 3.0, "at once, not after the 10 s timeout"
        else:
            wait_until(lambda: _blocked(plain[away]), 5, message="the wait did not go on on the new master")
            request = messages.decode_request(entry[0].decode(), entry[1], max_bytes=1 << 24)
            plain[away].lpush(keys.reply_key(MOVED_MODEL, request.reply_to), messages.encode_ok(
                request, model=MOVED_MODEL, version=1, outputs={"p": np.ones((1, 2), np.float32)},
                labels=None, timings={}, worker="new-master"))
            assert future.result(timeout=15).worker == "new-master"
            assert plain[away].xlen(stream) == 1, "not sent again"
    finally:
        _move_slot(plain, slot, home)
        rc.nodes_manager.initialize()


def test_clusterdown_on_the_xadd_is_sent_again_and_an_unreachable_node_ends_interrupted():
    pendings = [_core.prepare(_core.Target("m"), X, route="", timeout_s=5.0, sample_ndim=None)]
    ex = _core.Exchange(pendings, 5.0)
    ex.trip()
    with pytest.raises(_core.NotQueued, match="CLUSTERDOWN"):
        ex.sent([redis.exceptions.ClusterDownError("The cluster is down")])
    assert not ex.queued, "nothing was queued: the same trip is sent again"
    assert 0 < ex.refused_for_now(_core.NotConnected("connection refused")) <= _core.BACKOFF_MAX_S
    ex.gatherer.deadline_s = time.time() - 1  # the failover outlasted the deadline
    with pytest.raises(Interrupted, match="nothing was sent") as caught:
        ex.refused_for_now(_core.NotConnected("connection refused"))
    assert caught.value.request_ids == [pendings[0].request_id]
