"""Fail fast on what nobody serves: an unknown model raises ModelNotFound and a known one without a
live worker raises Unavailable before anything is sent, from state read once a second."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest
import redis
from conftest import MODEL

from producer import AsyncClient, Client, DeadlineExceeded, ModelNotFound, Unavailable, _core
from protocol import keys, presence

X = np.random.default_rng(9).standard_normal((60, 110)).astype(np.float32)


def predict(url: str, kind: str, model: str, **kwargs: Any) -> Any:
    options = {k: kwargs.pop(k) for k in ("fail_fast",) if k in kwargs}
    if kind == "sync":
        with Client.from_url(url, timeout_s=5.0, **options) as client:
            return client.predict(model, X, **kwargs)

    async def call() -> Any:
        async with AsyncClient.from_url(url, timeout_s=5.0, **options) as client:
            return await client.predict(model, X, **kwargs)
    return asyncio.run(call())


def heartbeat(r: redis.Redis, worker_id: str = "w1") -> None:
    """A live worker, as the fleet writes it (member scored with its heartbeat time)."""
    r.zadd(keys.workers_zset(MODEL), {worker_id: presence.now_in_ms()})


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_unknown_model_raises_model_not_found_before_anything_is_sent(r, redis_server, production, kind):
    started = time.monotonic()
    with pytest.raises(ModelNotFound, match="model 'my_cnnn' is not in the registry"):
        predict(redis_server.url, kind, "my_cnnn")
    assert time.monotonic() - started < 1.0, "not after the 5 s timeout"
    assert not r.exists(keys.request_stream("my_cnnn")), "no orphan stream"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_known_model_without_a_live_worker_raises_unavailable_at_once(r, redis_server, production, kind):
    r.zadd(keys.workers_zset(MODEL), {"dead": presence.now_in_ms() - 60_000})  # heartbeat long expired
    started = time.monotonic()
    with pytest.raises(Unavailable, match=f"no live worker for {MODEL}"):
        predict(redis_server.url, kind, MODEL)
    assert time.monotonic() - started < 1.0
    assert not r.exists(keys.request_stream(MODEL))


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_fail_fast_off_queues_the_request(r, redis_server, kind):
    with pytest.raises(DeadlineExceeded):
        predict(redis_server.url, kind, "my_cnnn", fail_fast=False, timeout_s=0.05)
    assert r.xlen(keys.request_stream("my_cnnn")) == 1


def test_a_worker_that_just_started_is_not_refused_from_the_cached_state(r, redis_server, production):
    with Client.from_url(redis_server.url, timeout_s=5.0) as client:
        with pytest.raises(Unavailable, match="no live worker"):
            client.predict(MODEL, X)
        heartbeat(r)  # a worker comes up within the client's 1 s refresh interval
        time.sleep(_core.NEGATIVE_RECHECK_S)  # the cached "none" is now old enough to be read again
        with pytest.raises(DeadlineExceeded):  # sent (the fake worker never answers)
            client.predict(MODEL, X, timeout_s=0.05)
    assert r.xlen(keys.request_stream(MODEL)) == 1


def test_a_model_unregistered_later_is_refused_after_the_refresh_interval(r, redis_server, production):
    heartbeat(r)
    with Client.from_url(redis_server.url, timeout_s=5.0) as client:
        with pytest.raises(DeadlineExceeded):
            client.predict(MODEL, X, timeout_s=0.02)
        r.delete(keys.model_hash(MODEL))
        client._router._state(MODEL).read_at -= 2  # the refresh interval has passed
        with pytest.raises(ModelNotFound):
            client.predict(MODEL, X, timeout_s=0.02)
    assert r.xlen(keys.request_stream(MODEL)) == 1


def test_a_failed_state_read_keeps_the_last_state_and_is_not_retried_on_every_call(r, redis_server,
                                                                                   production):
    heartbeat(r)
    with Client.from_url(redis_server.url, timeout_s=5.0) as client:
        with pytest.raises(DeadlineExceeded):
            client.predict(MODEL, X, timeout_s=0.02)
        tries, real = [], client._round_trip

        def failing(trip: _core.Trip) -> list[Any]:
            if trip.commands[0][0] == "HGETALL":  # the state read: its node is failing over
                tries.append(trip)
                raise redis.ConnectionError("connection refused")
            return real(trip)

        client._round_trip = failing  # type: ignore[method-assign]
        client._router._state(MODEL).read_at -= 2
        started = time.monotonic()
        for _ in range(5):
            with pytest.raises(DeadlineExceeded):
                client.predict(MODEL, X, timeout_s=0.02)
        assert time.monotonic() - started < 1.0 and len(tries) == 1, "tried once per interval"
    assert r.xlen(keys.request_stream(MODEL)) == 6


def test_the_state_read_is_one_round_trip_in_the_models_slot():
    trip = _core.Router().state_trip(MODEL, time.time() + 1)
    assert [c[0] for c in trip.commands] == ["HGETALL", "EXISTS", "ZRANGEBYSCORE"]
    slots = {_core.key_slot(str(c[1]).encode()) for c in trip.commands}
    assert slots == {_core.key_slot(trip.key.encode())}
    assert trip.deadline_s - time.time() <= 1.0


def test_no_live_worker_is_not_believed_right_after_the_models_slot_was_unreadable(monkeypatch):
    """A failover of the node holding {model}: its workers could not beat meanwhile either."""
    from producer import _core

    router, now = _core.Router(), [100.0]
    monkeypatch.setattr(_core.time, "monotonic", lambda: now[0])
    nobody = [{}, 1, []]  # layout, registry knows it, no live worker
    router.set_state(MODEL, nobody)
    assert isinstance(router.refusal(MODEL), Unavailable)
    router.set_state(MODEL, None)  # the node is gone
    now[0] += 5.0
    router.set_state(MODEL, nobody)  # back, before any worker could beat again
    assert router.refusal(MODEL) is None
    now[0] += _core.OUTAGE_GRACE_S
    router.set_state(MODEL, nobody)
    assert isinstance(router.refusal(MODEL), Unavailable)
