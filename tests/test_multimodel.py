"""One worker process serving several models: one read, per-model batches, fair turns, an LRU cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import models
import numpy as np
import pytest
from conftest import FAST_ENV, ThreadedWorker, wait_until

from experiments.store import ExperimentStore
from producer import Client
from producer.health import read_health
from protocol import codec, connection, keys, messages, presence
from protocol.errors import ConfigError
from protocol.settings import Settings
from protocol.values import text as codec_text
from registry import Registry
from registry.rollout import publish_reload, wait_for_fleet
from worker.consumer import Entry
from worker.selection import ModelSelector
from worker.worker import Worker

X = np.random.default_rng(23).standard_normal((60, 110)).astype(np.float32)
A, B, C = "mm_a", "mm_b", "mm_c"


def promote(registry, tmp_path, model: str, seed: int):
    path = models.linear_softmax(tmp_path / f"{model}_{seed}.onnx", seed=seed)
    mv = registry.register(model, path, input_spec=models.SPEC, output_names=["probs"], labels=models.LABELS)
    registry.promote(model, mv.version)
    return path


@pytest.fixture
def three(registry, tmp_path):
    """Three models, each its own weights, in Production: name → artifact path."""
    return {m: promote(registry, tmp_path, m, seed) for m, seed in ((A, 1), (B, 2), (C, 3))}


def send(r, model, request_id, *, lane="live", deadline_ms=None):
    fields = messages.encode_request(request_id, {"features": X[None]},
                                     deadline_ms=deadline_ms or int(time.time() * 1000) + 60_000)
    return r.xadd(keys.request_stream(model, lane=lane), fields)


def reply(r, model, request_id, timeout_s=0):
    if timeout_s:
        raw = r.brpop(keys.reply_key(model, request_id), timeout=timeout_s)
        assert raw is not None, f"no reply for {model}/{request_id}"
        raw = raw[1]
    else:
        raw = r.lpop(keys.reply_key(model, request_id))
        assert raw is not None, f"no reply for {model}/{request_id}"
    return codec.unpack(raw, max_bytes=1 << 24)


def probs(answer):
    return codec.decode_tensor(answer["outputs"]["probs"], max_bytes=1 << 20)


def batches_of(worker) -> list[tuple[str, int]]:
    """Record (model, entries) of every batch the worker answers."""
    seen: list[tuple[str, int]] = []
    real = worker.process

    def process(entries, dead_letter=(), consumer=None, prefetch=0):
        seen.append((consumer.model, len(entries)))
        return real(entries, dead_letter, consumer, prefetch)

    worker.process = process
    return seen


def test_the_selector_takes_names_patterns_and_all_models(r, three):
    assert ModelSelector.parse("mm_a, mm_b,mm_a").names == (A, B)
    assert ModelSelector.parse("mm_[ab]").resolve(r) == [A, B]
    assert ModelSelector.parse("x,mm_*").resolve(r) == ["x", A, B, C]
    registry_set = ModelSelector.parse(None, all_models=True)
    r.hdel(keys.model_hash(C), "production_version")  # retired: no Production version
    assert registry_set.resolve(r) == [A, B]
    for bad in ("", "a{b}", ","):
        with pytest.raises(ConfigError):
            ModelSelector.parse(bad)


def test_each_model_is_answered_by_its_own_version_in_batches_of_one_model(r, settings, three):
    for i in range(20):
        for m in three:
            send(r, m, f"{m}-{i}")
    worker = Worker(settings, ModelSelector.parse("mm_*"), burst=True)
    seen = batches_of(worker)
    worker.run()
    for m, path in three.items():
        expected = models.reference_outputs(path, X[None])
        for i in range(20):
            answer = reply(r, m, f"{m}-{i}")
            assert answer["ok"] and answer["version"] == 1
            np.testing.assert_allclose(probs(answer), expected, rtol=1e-4, atol=1e-6)
        histogram = {int(k): int(v) for k, v in r.hgetall(keys.batch_histogram(m)).items()}
        assert sum(rows * n for rows, n in histogram.items()) == 20, "each model's rows in its own batches"
    assert {m for m, _ in seen} == set(three) and sum(n for _, n in seen) == 60


def test_an_idle_worker_reads_every_models_streams_in_one_command(r, settings, three):
    worker = Worker(settings, ModelSelector.parse(f"{A},{B},{C}"))
    reads: list[tuple] = []
    real = worker.redis.execute_command

    def execute_command(*args, **options):
        if args[0] == "XREADGROUP":
            reads.append(args)
        return real(*args, **options)

    worker.redis.execute_command = execute_command
    with ThreadedWorker(worker):
        time.sleep(0.3)  # idle: several blocking reads go out
        send(r, B, "b1")
        assert reply(r, B, "b1", timeout_s=5)["ok"]
    reads = [tuple(codec_text(a) for a in args) for args in reads]
    blocking = [a for a in reads if "BLOCK" in a]
    assert blocking, "the idle worker blocked in XREADGROUP"
    every_stream = {keys.request_stream(m, lane=lane) for m in three for lane in keys.LANES}
    for args in blocking:
        assert set(args[args.index("STREAMS") + 1:]) >= every_stream, args


def test_a_flooded_model_does_not_hold_a_trickle_back(r, settings, three):
    for i in range(200):
        send(r, A, f"flood{i}")
    send(r, B, "trickle")
    worker = Worker(settings, ModelSelector.parse(f"{A},{B}"), burst=True)
    seen = batches_of(worker)
    worker.run()
    assert seen.index((B, 1)) <= 1, f"the trickle waited behind {seen.index((B, 1))} flood batches: {seen}"
    assert reply(r, B, "trickle")["ok"] and sum(n for m, n in seen if m == A) == 200


def test_live_requests_of_one_model_go_before_backfill_of_another(r, settings, three):
    for i in range(64):
        send(r, A, f"back{i}", lane="backfill")
    send(r, B, "live")
    worker = Worker(settings, ModelSelector.parse(f"{A},{B}"), burst=True)
    seen = batches_of(worker)
    worker.run()
    assert seen[0] == (B, 1), seen
    assert reply(r, B, "live")["ok"]


def loaded(worker) -> set[str]:
    return {m for m, s in worker.served.items() if s.slot.loaded is not None}


def test_the_least_recently_used_model_is_evicted_beyond_the_cache_and_loads_again(r, settings, three):
    worker = Worker(settings.with_overrides(max_loaded_models=2), ModelSelector.parse("mm_*"))
    with ThreadedWorker(worker), Client.from_url(settings.redis_url, timeout_s=10) as client:
        assert not loaded(worker), "nothing loads before a request"
        for m in (A, B, A, C):  # A is used after B: B is the least recently used when C comes
            assert client.predict(m, X).model_version == 1
        assert loaded(worker) == {A, C}
        wait_until(lambda: read_health(r, B).workers[0].cache == "evicted", 5)
        health = read_health(r, B)
        assert health.ok and not health.loaded_workers, "an evicted model still counts as served"
        assert worker.cache.entry(C).size_bytes > 0 and worker.cache.entry(C).load_ms > 0
        assert client.predict(B, X).model_version == 1, "an evicted model loads again on request"
        assert loaded(worker) == {B, C}


def test_a_pinned_model_is_loaded_at_start_and_never_evicted(r, settings, three):
    worker = Worker(settings.with_overrides(max_loaded_models=1), ModelSelector.parse("mm_*"), pins=[A])
    with ThreadedWorker(worker), Client.from_url(settings.redis_url, timeout_s=10) as client:
        assert loaded(worker) == {A}
        for m in (B, C):
            assert client.predict(m, X).model_version == 1
        assert loaded(worker) == {A, C}, "the pin stays; the unpinned one before C was evicted"
        beat = presence.Heartbeat.from_hash(r.hgetall(keys.worker_hash(A, worker.worker_id)))
        assert beat.pinned and beat.cache == "loaded" and beat.models == 3


def test_a_request_that_cannot_wait_for_the_load_is_answered_overloaded_at_once(r, settings, three):
    worker = Worker(settings, ModelSelector.parse(f"{A},{B}"))
    with ThreadedWorker(worker):
        now_ms = int(time.time() * 1000)
        send(r, A, "short", deadline_ms=now_ms + 300)  # below the first load's expected second
        answer = reply(r, A, "short", timeout_s=5)
        assert answer["error"]["code"] == "OVERLOADED" and "loading" in answer["error"]["message"]
        assert time.time() * 1000 < now_ms + 300, "answered before its deadline"
        send(r, A, "patient")
        assert reply(r, A, "patient", timeout_s=10)["ok"], "a request with time waits for the load"


def test_a_model_that_cannot_load_fails_alone(r, settings, registry, three):
    target = settings.artifact_dir / registry.production(B).artifact
    target.chmod(0o644)
    target.write_bytes(target.read_bytes()[:-10] + b"0123456789")  # its sha256 no longer matches
    worker = Worker(settings, ModelSelector.parse(f"{A},{B}"))
    with ThreadedWorker(worker), Client.from_url(settings.redis_url, timeout_s=10) as client:
        send(r, B, "bad")
        assert reply(r, B, "bad", timeout_s=10)["error"]["code"] == "MODEL_NOT_FOUND"
        assert client.predict(A, X).model_version == 1
        wait_until(lambda: read_health(r, B).workers[0].cache == "failed", 5)


def test_one_model_reloads_while_the_others_serve(r, settings, registry, tmp_path, three):
    worker = Worker(settings, ModelSelector.parse(f"{A},{B}"))
    with ThreadedWorker(worker), Client.from_url(settings.redis_url, timeout_s=10) as client:
        assert client.predict(B, X).model_version == 1
        promote(registry, tmp_path, B, seed=9)
        answers = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answers.append(client.predict(A, X).model_version)
            if client.predict(B, X).model_version == 2:
                break
        else:
            pytest.fail("B never switched to v2")
        assert set(answers) == {1}, "A kept its version and never failed"


def test_an_experiment_runs_on_one_model_of_a_multi_model_worker(r, settings, registry, tmp_path, three):
    path2 = models.linear_softmax(tmp_path / "b2.onnx", seed=7)
    registry.register(B, path2, input_spec=models.SPEC, output_names=["probs"], labels=models.LABELS)
    exp = ExperimentStore(r, registry).create(B, 1, 2, treatment_share=0.5, unit="request_id")
    for i in range(40):
        send(r, A, f"a{i}")
        send(r, B, f"b{i}")
    Worker(settings, ModelSelector.parse(f"{A},{B}"), burst=True).run()
    b = [reply(r, B, f"b{i}") for i in range(40)]
    assert {x["variant"] for x in b} == {"control", "treatment"}
    assert all(x["version"] == (1 if x["variant"] == "control" else 2) for x in b)
    assert {reply(r, A, f"a{i}")["version"] for i in range(40)} == {1}
    assert len(r.xrange(keys.experiment_journal(B, exp.id))) == 40, "B's journal, in B's keys"


def start_multi(settings, tmp_path, name, *args):
    cmd = [sys.executable, "-m", "streamserve", "--redis-url", settings.redis_url, "--artifact-dir",
           str(settings.artifact_dir), "worker", "--models", "mm_*", *args]
    with open(tmp_path / f"{name}.log", "wb") as log:
        return subprocess.Popen(cmd, env={**os.environ, **FAST_ENV}, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.timeout(120)
def test_a_killed_multi_model_worker_loses_nothing_of_any_model(r, settings, registry, tmp_path):
    """SIGKILL a worker with entries of every model in hand: the other takes them all over."""
    slow = {m: models.linear_softmax(tmp_path / f"{m}.onnx", slow_width=768) for m in (A, B, C)}
    for m, path in slow.items():
        registry.promote(m, registry.register(m, path, input_spec=models.SPEC, output_names=["probs"],
                                              labels=models.LABELS).version)
    victim = start_multi(settings, tmp_path, "victim", "--max-batch", "4")
    try:
        wait_until(lambda: all(len(read_health(r, m).serving_workers) == 1 for m in slow), 30)
        ids = {m: [f"{m}-{i}" for i in range(12)] for m in slow}
        for m in slow:
            for i in ids[m]:
                send(r, m, i)
        group = keys.consumer_group(A)
        wait_until(lambda: all(r.xpending(keys.request_stream(m), group)["pending"] for m in slow), 30,
                   message="the victim never held entries of every model")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        survivor = start_multi(settings, tmp_path, "survivor")
        for m in slow:
            for i in ids[m]:
                assert reply(r, m, i, timeout_s=60)["ok"], f"{m}/{i} lost"
        survivor.terminate()
        survivor.wait(20)
    finally:
        for p in (victim,):
            if p.poll() is None:
                p.kill()


def test_a_model_promoted_later_is_served_by_a_pattern_worker(r, settings, registry, tmp_path, three):
    worker = Worker(settings, ModelSelector.parse("mm_*"))
    with ThreadedWorker(worker), Client.from_url(settings.redis_url, timeout_s=10) as client:
        assert set(worker.served) == set(three)
        promote(registry, tmp_path, "mm_new", seed=4)
        wait_until(lambda: read_health(r, "mm_new").ok, 10, message="the new model was not picked up")
        assert client.predict("mm_new", X).model_version == 1
        r.hdel(keys.model_hash(C), "production_version")  # retired
        publish_reload(r, C, 1)
        wait_until(lambda: C not in worker.served, 10, message="the retired model is still served")


def test_the_cli_refuses_model_and_models_together(capsys):
    from streamserve.cli import main
    with pytest.raises(SystemExit):
        main(["worker", "--model", A, "--models", B])
    assert "not allowed with argument" in capsys.readouterr().err


def test_entries_of_an_unloaded_model_stay_pending_when_the_worker_stops(r, settings, three):
    """A stopping worker answers what it holds for loaded models; the rest is left to the fleet."""
    worker = Worker(settings, ModelSelector.parse(f"{A},{B}"))
    served = worker.served[B]
    entry_id = send(r, B, "held")
    served.consumer.ensure_group()
    served.consumer.deliver([Entry(entry_id.decode(), r.xrange(keys.request_stream(B))[0][1])])
    worker._answer_held()
    assert r.llen(keys.reply_key(B, "held")) == 0


def test_a_promotion_does_not_wait_for_workers_that_do_not_hold_the_model(r, settings, registry, tmp_path,
                                                                           three):
    worker = Worker(settings, ModelSelector.parse(f"{A},{B}"))
    with ThreadedWorker(worker), Client.from_url(settings.redis_url, timeout_s=10) as client:
        assert client.predict(A, X).model_version == 1  # A loaded here, B not
        promote(registry, tmp_path, B, seed=5)
        report = wait_for_fleet(r, B, 2, timeout_s=5)
        assert report.ok and report.unloaded == [worker.worker_id] and not report.pending
        assert report.elapsed_s < 2, "not waited for"
        promote(registry, tmp_path, A, seed=6)
        report = wait_for_fleet(r, A, 2, timeout_s=10)
        assert report.ok and report.switched == [worker.worker_id] and not report.unloaded
        assert client.predict(B, X).model_version == 2, "B loads its new Production version on request"


def test_a_multi_model_worker_serves_models_on_every_node_of_a_cluster(redis_cluster, tmp_path):
    client = connection.connect(redis_cluster.url)
    client.flushall()
    settings = Settings(redis_url=redis_cluster.url, artifact_dir=tmp_path / "artifacts",
                        heartbeat_interval_s=0.2, heartbeat_ttl_s=1.0, block_ms=50, reconcile_interval_s=0.5)
    registry = Registry(client, settings.artifact_dir)
    names = [f"mm_{i}" for i in range(6)]
    for i, m in enumerate(names):
        promote(registry, tmp_path, m, seed=i)
    nodes = {client.get_node_from_key(keys.request_stream(m)).name for m in names}
    assert len(nodes) > 1, "the models' slots fall on several nodes"
    with ThreadedWorker(Worker(settings, ModelSelector.parse("mm_*"))), \
            Client.from_url(redis_cluster.url, timeout_s=10) as bot:
        for _ in range(2):
            for m in names:
                assert bot.predict(m, X).model_version == 1
    client.close()


def test_an_evicted_experiment_model_brings_both_arms_back(r, settings, registry, tmp_path, three):
    path2 = models.linear_softmax(tmp_path / "b2.onnx", seed=8)
    registry.register(B, path2, input_spec=models.SPEC, output_names=["probs"], labels=models.LABELS)
    ExperimentStore(r, registry).create(B, 1, 2, treatment_share=0.5, unit="request_id")
    worker = Worker(settings.with_overrides(max_loaded_models=1), ModelSelector.parse(f"{A},{B}"))
    arms = worker.served[B].arms
    with ThreadedWorker(worker), Client.from_url(settings.redis_url, timeout_s=10) as client:
        client.predict(B, X)
        wait_until(lambda: arms.treatment is not None, 10, message="the treatment did not load with B")
        client.predict(A, X)
        assert arms.treatment is None and worker.served[B].slot.loaded is None, "both arms evicted"
        client.predict(B, X)
        wait_until(lambda: arms.treatment is not None, 10, message="the treatment did not come back")
        variants = {p.variant for p in client.predict_many(B, [X] * 40)}
        assert variants == {"control", "treatment"}, variants


def test_a_cold_models_entries_taken_over_from_a_dead_worker_load_it_and_are_answered(r, settings, three):
    """No new traffic: what the take-over brings is enough to start the load."""
    for i in range(3):
        send(r, A, f"a{i}")
    group = keys.consumer_group(A)
    r.xgroup_create(keys.request_stream(A), group, id="0")
    r.xreadgroup(group, "dead-worker", {keys.request_stream(A): ">"}, count=10)  # it never heartbeats
    with ThreadedWorker(Worker(settings, ModelSelector.parse(f"{A},{B}"))):
        assert all(reply(r, A, f"a{i}", timeout_s=10)["ok"] for i in range(3))


def test_a_pattern_that_selects_one_model_loads_it_on_request(r, settings, registry, tmp_path):
    promote(registry, tmp_path, A, 1)
    with ThreadedWorker(Worker(settings, ModelSelector.parse("mm_*"))):
        send(r, A, "only")
        assert reply(r, A, "only", timeout_s=10)["ok"]


def test_a_pinned_model_that_cannot_load_is_not_reported_servable(r, settings, registry, three):
    target = settings.artifact_dir / registry.production(A).artifact
    target.chmod(0o644)
    target.write_bytes(target.read_bytes()[:-10] + b"0123456789")
    for worker in (Worker(settings, A), Worker(settings, ModelSelector.parse(f"{A},{B}"), pins=[A])):
        assert worker._start_up()
        worker.reconcile()
        beat = worker.presence(worker.served[A])
        assert beat.cache == "failed" and not beat.can_serve, beat


def test_a_burst_worker_answers_a_model_whose_load_fails(r, settings, registry, three):
    target = settings.artifact_dir / registry.production(B).artifact
    target.chmod(0o644)
    target.write_bytes(target.read_bytes()[:-10] + b"0123456789")
    send(r, B, "b0")
    send(r, A, "a0")
    Worker(settings, ModelSelector.parse(f"{A},{B}"), burst=True).run()
    assert reply(r, B, "b0")["error"]["code"] == "MODEL_NOT_FOUND" and reply(r, A, "a0")["ok"]


def test_pins_beyond_the_budget_are_loaded_and_reported(r, settings, three):
    worker = Worker(settings.with_overrides(max_loaded_models=1), ModelSelector.parse("mm_*"), pins=[A, B])
    assert worker._start_up()
    worker.reconcile()
    assert loaded(worker) == {A, B}, "a pin is loaded whatever the budget"
    assert "cache: 2 models loaded, over the limit of 1" in worker.problem(worker.served[A])


def test_the_cli_refuses_a_pattern_for_model_in_one_line(capsys):
    from streamserve.cli import main
    assert main(["worker", "--model", "fx_*"]) != 0
    err = capsys.readouterr().err
    assert "use --models" in err and "Traceback" not in err


def test_one_models_stream_refused_by_the_server_does_not_stop_the_others(r, settings, three):
    """A's request stream made a string: the one read for both models fails with WRONGTYPE, so each
    is read on its own: B's entry comes, A's shard backs off."""
    worker = Worker(settings, ModelSelector.parse(f"{A},{B}"))
    assert worker._start_up()
    r.delete(keys.request_stream(A))
    r.set(keys.request_stream(A), "not a stream")
    send(r, B, "b1")
    assert worker._read_fresh(worker._up_consumers(), 0) == 1
    assert len(worker.served[B].consumer.buffered) == 1
    assert not worker._up(worker.served[A].consumer) and "shard 0: " in worker.problem(worker.served[A])
