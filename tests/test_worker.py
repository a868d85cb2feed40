"""Worker behaviour on a real Redis, in burst mode (drain the stream, return)."""

import logging
import time

import models
import numpy as np
import pytest
import redis
from conftest import MODEL, ThreadedWorker, wait_until

from lab.embedded_redis import EmbeddedRedis
from protocol import codec, keys, messages
from protocol.errors import InternalError
from protocol.settings import Settings
from worker.worker import Worker

X = np.random.default_rng(0).standard_normal((60, 110)).astype(np.float32)


def send(r, request_id, features=X, *, deadline_ms=None, version=1, rows=True, entry_id="*"):
    arrays = {"features": features[np.newaxis] if rows else features}
    fields = messages.encode_request(request_id, arrays,
                                     deadline_ms=deadline_ms or int(time.time() * 1000) + 60_000)
    fields["v"] = version
    return r.xadd(keys.request_stream(MODEL), fields, id=entry_id)


def reply(r, request_id):
    raw = r.lpop(keys.reply_key(MODEL, request_id))
    assert raw is not None, f"no reply for {request_id}"
    return codec.unpack(raw, max_bytes=1 << 24)


def drain(settings, **kwargs):
    worker = Worker(settings, MODEL, burst=True, **kwargs)
    worker.run()
    return worker


def pending_count(r):
    return r.xpending(keys.request_stream(MODEL), keys.consumer_group(MODEL))["pending"]


def test_batch_with_one_invalid_request_answers_the_others(r, settings, production, model_path):
    for i in range(5):
        send(r, f"ok{i}")
    send(r, "bad", X[:, :100])
    worker = drain(settings)
    assert worker.batches == 1, "all six were read as one batch"
    bad = reply(r, "bad")
    assert bad["ok"] is False and bad["error"]["code"] == "INVALID_INPUT"
    assert "per-sample shape [60, 100], expected [60, 110]" in bad["error"]["message"]
    expected = models.reference_outputs(model_path, X[np.newaxis])
    for i in range(5):
        ok = reply(r, f"ok{i}")
        assert ok["ok"] and ok["version"] == production.version and len(ok["label"]) == 1
        probs = codec.decode_tensor(ok["outputs"]["probs"], max_bytes=1 << 20)
        np.testing.assert_allclose(probs, expected, rtol=1e-5)
        assert ok["label"][0] == models.LABELS[int(expected.argmax())]
    assert pending_count(r) == 0
    assert r.hgetall(keys.batch_histogram(MODEL)) == {b"5": b"1"}


def test_multi_row_request_is_split_back_per_request(r, settings, production, model_path):
    batch = np.stack([X, X * 2, X * 3])
    send(r, "three", batch, rows=False)
    send(r, "one", X)
    drain(settings)
    three = reply(r, "three")
    probs = codec.decode_tensor(three["outputs"]["probs"], max_bytes=1 << 20)
    np.testing.assert_allclose(probs, models.reference_outputs(model_path, batch), rtol=1e-5)
    assert len(three["label"]) == 3 and len(three["confidence"]) == 3
    assert codec.decode_tensor(reply(r, "one")["outputs"]["probs"], max_bytes=1 << 20).shape == (1, 3)


def test_expired_deadline_is_answered_without_compute(r, settings, production):
    send(r, "late", deadline_ms=int(time.time() * 1000) - 5)
    send(r, "fine")
    worker = drain(settings)
    late = reply(r, "late")
    assert late["error"]["code"] == "DEADLINE_EXCEEDED"
    assert late["timings"]["infer_ms"] == 0.0
    assert reply(r, "fine")["ok"]
    assert r.hgetall(keys.batch_histogram(MODEL)) == {b"1": b"1"}, "only 'fine' was computed"
    assert worker.requests == 2 and pending_count(r) == 0


def test_queue_time_over_the_limit_is_shed_as_overloaded(r, settings, production):
    # The queue age is read from the entry id: an id one second old was enqueued one second ago.
    send(r, "old", entry_id=f"{int(time.time() * 1000) - 1000}-0")
    drain(settings, max_queue_ms=10)
    assert reply(r, "old")["error"]["code"] == "OVERLOADED"


def test_unknown_protocol_version_gets_an_error_reply(r, settings, production):
    send(r, "future", version=2)
    drain(settings)
    assert "unsupported protocol version '2'" in reply(r, "future")["error"]["message"]


def test_no_production_version_answers_model_not_found(r, settings, registry, model_path):
    registry.register(MODEL, model_path, input_spec=models.SPEC, output_names=["probs"])
    send(r, "q")
    drain(settings)
    error = reply(r, "q")["error"]
    assert error["code"] == "MODEL_NOT_FOUND" and "no version in Production" in error["message"]


def test_sha256_mismatch_is_refused_and_nothing_is_served(r, settings, registry, production):
    path = settings.artifact_dir / production.artifact
    path.chmod(0o644)
    path.write_bytes(path.read_bytes() + b"tampered")
    send(r, "q")
    worker = drain(settings)
    assert worker.slot.loaded is None
    error = reply(r, "q")["error"]
    assert error["code"] == "MODEL_NOT_FOUND"
    assert "refusing to load" in error["message"] and "sha256" in error["message"]


def test_entry_without_request_id_is_dead_lettered(r, settings, production):
    r.xadd(keys.request_stream(MODEL), {"v": 1, "inputs": b"junk"})
    drain(settings)
    dead = r.xrange(keys.dead_letter_stream(MODEL))
    assert len(dead) == 1 and b"unanswerable" in dead[0][1][b"reason"]
    assert pending_count(r) == 0


def test_entry_delivered_too_often_is_dead_lettered_with_internal_reply(r, settings, production):
    settings = settings.with_overrides(max_deliveries=2, reclaim_min_idle_ms=0)
    stream, group = keys.request_stream(MODEL), keys.consumer_group(MODEL)
    r.xgroup_create(stream, group, id="0", mkstream=True)
    entry_id = send(r, "poison")
    r.xreadgroup(group, "crashed-1", {stream: ">"})            # delivery 1, never acked
    r.xclaim(stream, group, "crashed-2", 0, [entry_id])         # delivery 2, never acked
    drain(settings)                                             # delivery 3 > 2
    error = reply(r, "poison")["error"]
    assert error["code"] == "INTERNAL" and "delivered more than 2 times" in error["message"]
    dead = r.xrange(keys.dead_letter_stream(MODEL))
    assert dead[0][1][b"id"] == b"poison" and dead[0][1][b"entry_id"] == entry_id
    assert pending_count(r) == 0


def test_entry_left_pending_by_a_dead_consumer_is_reclaimed_and_answered(r, settings, production):
    settings = settings.with_overrides(reclaim_min_idle_ms=0)  # idle long enough at once
    stream, group = keys.request_stream(MODEL), keys.consumer_group(MODEL)
    r.xgroup_create(stream, group, id="0", mkstream=True)
    send(r, "orphan")
    r.xreadgroup(group, "dead-worker", {stream: ">"})
    drain(settings)
    assert reply(r, "orphan")["ok"]
    assert pending_count(r) == 0


def test_model_failure_fails_the_batch_not_the_worker(r, settings, production, monkeypatch):
    send(r, "a")
    send(r, "b")
    worker = Worker(settings, MODEL, burst=True)
    worker.reconcile()

    def explode(inputs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(worker.slot.loaded.backend, "run", explode)
    worker.run()
    for rid in ("a", "b"):
        error = reply(r, rid)["error"]
        assert error["code"] == InternalError.code and "kaboom" in error["message"]
    monkeypatch.undo()
    send(r, "c")
    worker.run()
    assert reply(r, "c")["ok"], "the same worker serves the next batch"


def test_existing_group_is_reused_and_other_group_errors_are_waited_out(r, settings, production):
    drain(settings)
    drain(settings)  # BUSYGROUP ignored the second time
    r.delete(keys.request_stream(MODEL))
    r.set(keys.request_stream(MODEL), "not a stream")
    worker = Worker(settings, MODEL)
    with pytest.raises(Exception, match="WRONGTYPE"):
        worker.consumer.ensure_group()
    # The worker reports and retries; it does not crash-loop (nor heartbeat: nothing to wait for).
    with ThreadedWorker(worker, wait_s=0):
        wait_until(lambda: "WRONGTYPE" in worker.problems.get("redis", ""), 5, message="not reported")
        r.delete(keys.request_stream(MODEL))
        wait_until(lambda: "redis" not in worker.problems and worker.slot.loaded is not None, 5,
                   message="never started once the key was fixed")


def test_heartbeat_is_published_and_removed_on_exit(r, settings, production):
    worker = Worker(settings, MODEL, burst=True)
    worker.reconcile()
    worker.heartbeat()
    members = r.zrange(keys.workers_zset(MODEL), 0, -1)
    assert members == [worker.worker_id.encode()]
    state = r.hgetall(keys.worker_hash(MODEL, worker.worker_id))
    assert state[b"version"] == b"1" and state[b"backend"] == b"onnxruntime"
    assert 0 < r.pttl(keys.worker_hash(MODEL, worker.worker_id)) <= 1000
    worker.run()
    assert r.zcard(keys.workers_zset(MODEL)) == 0


def test_requests_sharing_a_reply_list_are_answered_there_by_id(r, settings, production):
    for i in range(3):
        fields = messages.encode_request(f"m{i}", {"features": X[None] if i != 1 else X[None, :, :5]},
                                         deadline_ms=int(time.time() * 1000) + 60_000, reply_to="shared")
        r.xadd(keys.request_stream(MODEL), fields)
    drain(settings)
    replies = [codec.unpack(p, max_bytes=1 << 24) for p in r.lrange(keys.reply_key(MODEL, "shared"), 0, -1)]
    by_id = {rep["id"]: rep for rep in replies}
    assert sorted(by_id) == ["m0", "m1", "m2"]
    assert by_id["m0"]["ok"] and by_id["m2"]["ok"]
    assert by_id["m1"]["error"]["code"] == "INVALID_INPUT"
    assert 0 < r.pttl(keys.reply_key(MODEL, "shared")) <= settings.reply_ttl_s * 1000
    assert not r.exists(keys.reply_key(MODEL, "m0")), "no reply under the request id"


def test_invalid_reply_to_is_dead_lettered_not_written_anywhere(r, settings, production):
    fields = messages.encode_request("ok1", {"features": X[None]}, deadline_ms=0)
    fields["reply_to"] = "other:{model}"
    r.xadd(keys.request_stream(MODEL), fields)
    drain(settings)
    assert b"unanswerable" in r.xrange(keys.dead_letter_stream(MODEL))[0][1][b"reason"]
    assert r.keys(keys.reply_key_pattern(MODEL)) == []



def wait_for_reply(r, request_id, timeout_s=5.0):
    wait_until(lambda: r.exists(keys.reply_key(MODEL, request_id)), timeout_s,
               message=f"no reply for {request_id} within {timeout_s} s")
    return reply(r, request_id)


def test_stream_deleted_under_a_running_worker_is_recreated(r, settings, production):
    worker = Worker(settings, MODEL)
    with ThreadedWorker(worker):
        send(r, "before")
        assert wait_for_reply(r, "before")["ok"]
        r.delete(keys.request_stream(MODEL))  # the blocked read fails: UNBLOCKED / NOGROUP
        # Nothing else writes the stream: it exists again once the worker has recreated its group.
        stream = keys.request_stream(MODEL)
        wait_until(lambda: r.exists(stream) and r.xinfo_groups(stream), 5,
                   message="the worker did not recreate the stream and its group")
        send(r, "after")
        assert wait_for_reply(r, "after")["ok"]


# max_batch 1: every batch is full, so every reply transaction also reads the next entries (prefetch).
# Waits: the server's start 5 s, twice, and stop 5 s, twice; the worker's 10 s; three of 5 s: 45 s.
@pytest.mark.timeout(60)
@pytest.mark.parametrize("max_batch", [32, 1])
def test_worker_survives_a_redis_restart(registry, production, caplog, max_batch):
    caplog.set_level(logging.WARNING, logger="worker.worker")
    server = EmbeddedRedis().start(timeout_s=5)
    settings = Settings(redis_url=server.url, artifact_dir=registry.artifact_dir, block_ms=50,
                        max_batch=max_batch)
    client = redis.Redis.from_url(server.url)
    copy_registry(registry.redis, client)
    try:
        with ThreadedWorker(Worker(settings, MODEL)):
            send(client, "first")
            assert wait_for_reply(client, "first")["ok"]
            server.stop()
            # The worker meets connection errors and keeps retrying.
            wait_until(lambda: any("Redis unavailable" in m for m in caplog.messages), 5,
                       message="the worker did not notice the outage")
            server = EmbeddedRedis(port=server.port).start(timeout_s=5)
            copy_registry(registry.redis, client)
            send(client, "after-restart")
            assert wait_for_reply(client, "after-restart")["ok"]
    finally:
        client.close()
        server.stop()


def test_worker_and_bot_talk_over_a_unix_socket(registry, production, tmp_path):
    """Same host: ``unix://`` URLs (no TCP keepalive option there; the worker used to refuse it)."""
    from producer import Client

    sock = tmp_path / "redis.sock"
    server = EmbeddedRedis(extra_args=("--unixsocket", str(sock), "--unixsocketperm", "700"))
    server.start(timeout_s=5)
    url = f"unix://{sock}?db=0"
    client = redis.Redis.from_url(url)
    copy_registry(registry.redis, client)
    try:
        settings = Settings(redis_url=url, artifact_dir=registry.artifact_dir)
        with ThreadedWorker(Worker(settings, MODEL)), Client.from_url(url, timeout_s=5) as bot:
            assert bot.predict(MODEL, X).model_version == production.version
    finally:
        client.close()
        server.stop()


def copy_registry(source, target):
    for key in (keys.model_hash(MODEL), keys.version_hash(MODEL, 1)):
        target.hset(key, mapping=source.hgetall(key))


@pytest.mark.timeout(60)  # waits: the worker's 10 s, three calls of 5 s, 5 s
def test_low_latency_mode_polls_and_still_answers_and_sleeps_when_idle(r, settings, production):
    """Worker and client poll their sockets for a while after each call; answers are unchanged."""
    from producer import Client

    worker = Worker(settings.with_overrides(spin_ms=100.0), MODEL)
    spun, real = [], worker.consumer._xread_spinning
    worker.consumer._xread_spinning = lambda *args: spun.append(1) or real(*args)
    with ThreadedWorker(worker), Client.from_url(settings.redis_url, timeout_s=5.0, spin_ms=20.0) as client:
        first = client.predict(MODEL, X)
        # Set once the worker has the transaction's answer, which may be after the bot has its reply.
        wait_until(lambda: worker.consumer.spin_until > 0, 5, message="no polling window after the batch")
        # Within the window the worker is polling; the next request is answered all the same.
        assert client.predict(MODEL, X).model_version == first.model_version == 1
        assert spun, "no read polled"
        time.sleep(0.15)  # past the window: the worker's read blocks in the kernel again
        assert time.monotonic() > worker.consumer.spin_until
        assert client.predict(MODEL, X).model_version == 1
