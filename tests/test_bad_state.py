"""Workers never crash-loop on bad state: malformed registry and experiment hashes, Redis write errors.

Each case checks the three promises: the worker stays up, it says what is wrong
(``problem()`` is what its heartbeat carries), and the last good version keeps
serving.
"""

import threading
import time

import models
import numpy as np
import pytest
import redis
from conftest import MODEL, ThreadedWorker, wait_until

from experiments.store import ExperimentStore
from producer import Client
from protocol import codec, control, keys, messages
from protocol.errors import ConfigError, InvalidInput, ModelNotFound, RegistryError
from registry import ModelVersion
from worker.inputs import InputSpec
from worker.worker import Worker

X = np.random.default_rng(5).standard_normal((60, 110)).astype(np.float32)


def send(r, request_id):
    fields = messages.encode_request(request_id, {"features": X[None]},
                                     deadline_ms=int(time.time() * 1000) + 60_000)
    r.xadd(keys.request_stream(MODEL), fields)


@pytest.mark.parametrize("field, value", [
    ("input_spec", "{bad"), ("version", "three"), ("output_names", '"probs"'),
    ("alternates", '{"x": 1}'), ("labels", "[1, 2]"), ("size_bytes", "\xff"),
])
def test_malformed_version_hash_is_a_registry_error(r, registry, production, field, value):
    r.hset(keys.version_hash(MODEL, production.version), field, value)
    with pytest.raises(RegistryError, match="malformed"):
        registry.get(MODEL, production.version)


def test_malformed_production_pointer_is_a_registry_error(r, registry, production):
    r.hset(keys.model_hash(MODEL), "production_version", "1.5")
    with pytest.raises(RegistryError, match="not a number"):
        registry.production(MODEL)


@pytest.mark.parametrize("spec", [
    {}, {"features": {"dtype": "object", "shape": [60, 110]}}, {"features": {"dtype": "<f4", "shape": [-1]}},
    {"features": {"dtype": "<f4", "shape": [1] * 9}}, {"features": {"dtype": "<f4"}},
    {"features": {"dtype": "<f4", "shape": [60, 110], "extra": 1}}, {"features": "f4"},
])
def test_malformed_input_spec_is_a_config_error(spec):
    with pytest.raises(ConfigError):
        InputSpec(spec)


def test_non_finite_inputs_are_refused_unless_the_spec_allows_them():
    strict = InputSpec({"x": {"dtype": "<f4", "shape": [2]}})
    relaxed = InputSpec({"x": {"dtype": "<f4", "shape": [2], "allow_non_finite": True}})
    for bad in (np.nan, np.inf, -np.inf):
        batch = {"x": np.array([[0.0, bad]], dtype=np.float32)}
        with pytest.raises(InvalidInput, match="NaN or ±Inf"):
            strict.check(batch, max_rows=8)
        relaxed.check(batch, max_rows=8)
    strict.check({"x": np.zeros((3, 2), dtype=np.float32)}, max_rows=8)


def test_nan_request_gets_invalid_input(settings, production):
    with ThreadedWorker(Worker(settings, MODEL)), Client.from_url(settings.redis_url, timeout_s=5) as client:
        assert client.predict(MODEL, X).model_version == production.version
        with pytest.raises(InvalidInput, match="NaN"):
            client.predict(MODEL, np.full((60, 110), np.nan, dtype=np.float32))


@pytest.mark.timeout(60)  # waits: the worker's 10 s, two calls of 5 s, three of 5 s
def test_corrupt_registry_hash_keeps_the_loaded_version_serving(r, settings, production):
    with ThreadedWorker(Worker(settings, MODEL)) as worker, \
            Client.from_url(settings.redis_url, timeout_s=5) as client:
        assert client.predict(MODEL, X).model_version == production.version
        r.hset(keys.version_hash(MODEL, production.version), "input_spec", "{bad")
        worker.reload_requested.set()
        wait_until(lambda: "malformed" in worker.problem(), 5, message="registry problem not reported")
        assert client.predict(MODEL, X).model_version == production.version
        beat = keys.worker_hash(MODEL, worker.worker_id)
        wait_until(lambda: b"malformed" in (r.hget(beat, "error") or b""), 5, message="not in the heartbeat")
        r.hset(keys.version_hash(MODEL, production.version), mapping=production.to_hash())
        worker.reload_requested.set()
        wait_until(lambda: worker.problem() == "", 5, message="problem not cleared once the hash is fixed")


def test_worker_starting_on_a_corrupt_hash_waits_and_then_serves(r, settings, production):
    good = production.to_hash()
    r.hset(keys.version_hash(MODEL, production.version), "input_spec", "{bad")
    with ThreadedWorker(Worker(settings, MODEL)) as worker, \
            Client.from_url(settings.redis_url, timeout_s=5) as client:
        with pytest.raises(ModelNotFound, match="malformed"):
            client.predict(MODEL, X)
        r.hset(keys.version_hash(MODEL, production.version), mapping=good)
        worker.reload_requested.set()
        wait_until(lambda: worker.slot.loaded is not None, 5, message="never loaded once fixed")
        assert client.predict(MODEL, X).model_version == production.version


def test_corrupt_experiment_hash_turns_the_experiment_off(r, settings, registry, production, tmp_path):
    path2 = models.linear_softmax(tmp_path / "v2.onnx", seed=2)
    registry.register(MODEL, path2, input_spec=models.SPEC, output_names=["probs"], labels=models.LABELS)
    ExperimentStore(r, registry).create(MODEL, 1, 2, treatment_share=0.5, unit="request_id")
    with ThreadedWorker(Worker(settings, MODEL)) as worker, \
            Client.from_url(settings.redis_url, timeout_s=5) as client:
        wait_until(lambda: worker.arms.treatment is not None, 5, message="treatment never loaded")
        r.hset(keys.experiment_hash(MODEL), "treatment_share", "lots")
        worker.reload_requested.set()
        wait_until(lambda: "experiment" in worker.problem(), 5, message="experiment problem not reported")
        variants = {client.predict(MODEL, X, request_id=f"e{i}").variant for i in range(20)}
        assert variants == {""}, "a corrupt experiment must send everything to Production"
        assert worker.slot.loaded is not None and worker.slot.loaded.version.version == 1


@pytest.fixture
def loaded_worker(r, settings, production):
    """A worker ready to serve, driven by hand: no thread, no heartbeat loop."""
    worker = Worker(settings, MODEL, burst=True)
    worker.consumer.ensure_group()
    worker.reconcile()
    yield worker
    worker.redis.close()


def _answer_under(r, worker, fault, clear) -> dict:
    """Send one request, break Redis writes, let the worker compute and retry, then heal Redis."""
    send(r, "w1")
    entries = worker.consumer.read(10, 0)
    fault()
    try:
        # With overlap_io the write's answer is read later: settle() is where a failed one is retried.
        thread = threading.Thread(target=lambda: (worker.process(entries), worker.settle()), daemon=True)
        thread.start()
        wait_until(lambda: "redis_write" in worker.problems, 5, message="write failure not reported")
        assert thread.is_alive(), "the worker gave up on the batch"
    finally:
        clear()
    thread.join(15)
    assert not thread.is_alive() and "redis_write" not in worker.problems
    assert r.xpending(keys.request_stream(MODEL), keys.consumer_group(MODEL))["pending"] == 0
    assert r.llen(keys.reply_key(MODEL, "w1")) == 1
    return codec.unpack(r.lpop(keys.reply_key(MODEL, "w1")), max_bytes=1 << 24)


def test_oom_on_the_reply_transaction_is_retried_until_it_lands(r, loaded_worker):
    before = r.config_get("maxmemory")["maxmemory"]
    reply = _answer_under(r, loaded_worker, lambda: r.config_set("maxmemory", 1),
                          lambda: r.config_set("maxmemory", before))
    assert reply["ok"] and reply["id"] == "w1"


def test_readonly_on_the_reply_transaction_is_retried_until_it_lands(r, loaded_worker):
    # Following a master that does not exist keeps the data and refuses writes: READONLY.
    reply = _answer_under(r, loaded_worker, lambda: r.execute_command("REPLICAOF", "127.0.0.1", "1"),
                          lambda: r.execute_command("REPLICAOF", "NO", "ONE"))
    assert reply["ok"] and reply["id"] == "w1"


@pytest.mark.parametrize("method", ["write", "send_write"])  # overlap_io off / on
def test_connection_cut_before_the_reply_transaction_answers_once(r, settings, production, method):
    loaded_worker = Worker(settings.with_overrides(overlap_io=method == "send_write"), MODEL, burst=True)
    loaded_worker.consumer.ensure_group()
    loaded_worker.reconcile()
    send(r, "w0")
    loaded_worker.process(loaded_worker.consumer.read(10, 0))  # the link, if any, has a connection now
    loaded_worker.settle()
    send(r, "w1")
    entries = loaded_worker.consumer.read(10, 0)
    real_write, cuts = getattr(loaded_worker.consumer, method), []

    def cut_then_write(out, *rest):
        for c in r.client_list():
            if c["name"].startswith("ss-worker:"):
                cuts.append(r.client_kill_filter(_id=c["id"]))
        real_write(out, *rest)

    setattr(loaded_worker.consumer, method, cut_then_write)
    loaded_worker.process(entries)
    loaded_worker.settle()
    assert cuts, "the write went another way"
    assert r.llen(keys.reply_key(MODEL, "w1")) == 1
    assert r.xpending(keys.request_stream(MODEL), keys.consumer_group(MODEL))["pending"] == 0
    loaded_worker.redis.close()


def test_start_up_waits_out_an_oom_server(r, settings, production):
    before = r.config_get("maxmemory")["maxmemory"]
    r.delete(keys.request_stream(MODEL))  # so that creating the group has to write
    r.config_set("maxmemory", 1)
    worker = Worker(settings, MODEL)
    try:
        with ThreadedWorker(worker, wait_s=0):  # it cannot heartbeat until Redis takes writes
            wait_until(lambda: "OutOfMemory" in worker.problems.get("redis", ""),
                       message="start-up failure not reported")
            r.config_set("maxmemory", before)
            wait_until(lambda: worker.batches == 0 and worker.slot.loaded is not None,
                       message="worker never started once Redis took writes")
    finally:
        r.config_set("maxmemory", before)


def test_version_hash_round_trips_through_validation(production):
    assert ModelVersion.from_hash(production.to_hash()) == production


def test_a_redis_error_in_a_step_is_reported_not_raised(settings, production, monkeypatch):
    worker = Worker(settings, MODEL)

    def boom(*_a, **_k):
        raise redis.ResponseError("NOGROUP the group was deleted under us")

    monkeypatch.setattr(worker.consumer, "take_over", boom)
    with ThreadedWorker(worker):
        wait_until(lambda: "NOGROUP" in worker.problems.get("redis", ""), 5, message="not reported")
        monkeypatch.undo()
        wait_until(lambda: "redis" not in worker.problems, 5, message="not cleared after recovery")


def test_malformed_control_messages_are_reported_and_the_listener_lives_on(r, settings, production):
    settings = settings.with_overrides(reconcile_interval_s=600)  # only a control message re-reads
    with ThreadedWorker(Worker(settings, MODEL)) as worker:
        wait_until(lambda: worker.listener is not None and r.pubsub_numsub(keys.control_channel())[0][1] > 0,
                   5, message="listener never subscribed")
        r.publish(keys.control_channel(), '{"command": "reload", "model": 123}')
        wait_until(lambda: "control messages rejected: 1 malformed" in worker.problem(), 5,
                   message="rejection not reported")
        worker.slot.target_version = None  # forget, so that only a real reload brings it back
        r.publish(keys.control_channel(), control.reload(MODEL).encode())
        wait_until(lambda: worker.slot.target_version == production.version, 5, message="listener died")
