"""``streamserve status --json``: the document, its exit status, and the human output beside it."""

from __future__ import annotations

import json
import os
import socket

import models
import numpy as np
import pytest
from conftest import MODEL, ThreadedWorker, wait_for_workers

from experiments.store import ExperimentStore
from protocol import keys
from streamserve.cli import main
from worker.worker import Worker

X = np.random.default_rng(4).standard_normal((60, 110)).astype(np.float32)
WORKER_KEYS = {"worker_id", "version", "target_version", "failed_version", "variant", "backend", "fallback",
               "state", "pid", "host", "heartbeat_age_ms", "error", "batches", "requests",
               "cache", "loaded_at_ms", "load_ms", "size_mb", "load_error", "models", "pinned"}


@pytest.fixture
def status(settings, capsys):
    """Run ``streamserve status [args]``: (exit status, stdout)."""
    def run(*args: str) -> tuple[int, str]:
        code = main(["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir),
                     "status", *args])
        return code, capsys.readouterr().out

    return run


def test_a_served_model_in_json(settings, client, production, status):
    with ThreadedWorker(Worker(settings, MODEL)) as worker:
        wait_for_workers(client, 1, 5)
        client.predict(MODEL, X)
        code, out = status("--json")
    doc = json.loads(out)
    assert code == 0 and doc["schema_version"] == 1 and doc["ok"] is True
    assert set(doc["models"]) == {MODEL}
    model = doc["models"][MODEL]
    assert set(model) == {"ok", "serving_workers", "loaded_workers", "production_version", "dead_letters",
                          "streams", "workers", "experiment"}
    assert model["ok"] is True and model["production_version"] == production.version
    assert (model["serving_workers"], model["loaded_workers"]) == (1, 1)
    assert model["experiment"] is None, "no experiment: null"
    assert model["dead_letters"] == 0
    stream, backfill = model["streams"]
    backfill_key = keys.request_stream(MODEL, 0, "backfill")
    assert (backfill["lane"], backfill["length"], backfill["key"]) == ("backfill", 0, backfill_key)
    assert stream["lag"] in (0, None), "the server may not tell once answered entries are deleted"
    assert {k: v for k, v in stream.items() if k != "lag"} == {
        "shard": 0, "lane": "live", "key": keys.request_stream(MODEL), "length": 0, "pending": 0}
    [w] = model["workers"]
    assert set(w) == WORKER_KEYS
    assert (w["worker_id"], w["version"], w["state"]) == (worker.worker_id, production.version, "serving")
    assert (w["pid"], w["host"], w["error"], w["failed_version"]) == (os.getpid(), socket.gethostname(), "",
                                                                     None)
    assert w["variant"] and w["backend"] and isinstance(w["requests"], int) and isinstance(w["batches"], int)
    assert 0 <= w["heartbeat_age_ms"] < settings.heartbeat_ttl_s * 1000


def test_without_a_live_worker_it_exits_1_and_shows_the_backlog(r, production, status):
    stream = keys.request_stream(MODEL)
    for i in range(3):
        r.xadd(stream, {"n": i})
    code, out = status("--json", MODEL)
    model = json.loads(out)["models"][MODEL]
    assert code == 1 and model["ok"] is False and model["workers"] == []
    assert model["streams"][0] | {"key": None} == {"shard": 0, "lane": "live", "key": None, "length": 3,
                                                   "lag": 3, "pending": 0}, "no group yet: all unread"
    r.xgroup_create(stream, keys.consumer_group(MODEL), id="0")
    r.xreadgroup(keys.consumer_group(MODEL), "someone", {stream: ">"}, count=1)
    r.xadd(keys.dead_letter_stream(MODEL), {"reason": "test"})
    model = json.loads(status("--json")[1])["models"][MODEL]
    assert (model["streams"][0]["pending"], model["streams"][0]["lag"], model["dead_letters"]) == (1, 2, 1)


def test_a_model_without_production_is_null_and_not_ok(registry, status):
    code, out = status("--json", "unregistered")
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False
    assert doc["models"]["unregistered"]["production_version"] is None


def test_human_output_is_kept_and_has_the_same_exit_status(settings, client, production, status):
    code, out = status()
    assert code == 1 and out.startswith(f"{MODEL}: Production v{production.version}; stream length 0, "
                                        "pending 0, lag 0, dead letters 0")
    with ThreadedWorker(Worker(settings, MODEL)) as worker:
        wait_for_workers(client, 1, 5)
        code, out = status()
    assert code == 0 and worker.worker_id in out and f"pid {os.getpid()}" in out


def test_help_documents_the_document_and_the_exit_status(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["status", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "--json" in out and '"schema_version": 1' in out and '"heartbeat_age_ms"' in out
    assert '"cache": "loaded"' in out and '"pinned": false' in out and '"loaded_workers": 1' in out
    assert '"experiment": {' in out and '"treatment": {"version": 4, "share": 0.1}' in out
    assert "Exit status" in out


def test_a_running_experiment_is_named_with_its_arms_and_nothing_once_stopped(r, registry, production,
                                                                               tmp_path, status):
    registry.register(MODEL, models.linear_softmax(tmp_path / "v2.onnx", seed=2), input_spec=models.SPEC,
                      output_names=["probs"], labels=models.LABELS)
    store = ExperimentStore(r, registry)
    e = store.create(MODEL, 1, 2, treatment_share=0.1)
    assert json.loads(status("--json")[1])["models"][MODEL]["experiment"] == {
        "id": e.id, "status": "running", "mode": "split", "unit": "route",
        "control": {"version": 1, "share": 0.9}, "treatment": {"version": 2, "share": 0.1}}
    line = f"  experiment {e.id} [running] split by route: control v1 90%, treatment v2 10%"
    assert line in status()[1].splitlines()

    store.set_status(MODEL, "paused")
    assert json.loads(status("--json")[1])["models"][MODEL]["experiment"]["status"] == "paused"
    assert f"experiment {e.id} [paused]" in status()[1]

    store.set_status(MODEL, "stopped")
    assert json.loads(status("--json")[1])["models"][MODEL]["experiment"] is None
    assert "experiment" not in status()[1]

    shadow = store.create(MODEL, 1, 2, mode="shadow")
    doc = json.loads(status("--json")[1])["models"][MODEL]["experiment"]
    shares = (doc["control"]["share"], doc["treatment"]["share"])
    assert (doc["id"], doc["mode"], shares) == (shadow.id, "shadow", (1.0, 1.0))
    assert "control v1 answers every request, treatment v2 scores each beside it" in status()[1]


def test_an_unreadable_experiment_hash_is_no_experiment_not_a_crash(r, production, status):
    r.hset(keys.experiment_hash(MODEL), mapping={"id": "x", "mode": "canary"})
    code, out = status("--json")
    assert code == 1 and json.loads(out)["models"][MODEL]["experiment"] is None
