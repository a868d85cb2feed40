"""Requests sent outside the experiment (``experiment=False``, entry field ``experiment`` = ``off``):
the control answers them, nothing journals them, the reply's variant says ``none``."""

import json
import time

import models
import numpy as np
import pytest
from conftest import MODEL, ThreadedWorker, wait_until

from experiments.store import ExperimentStore
from protocol import codec, keys, messages
from protocol.errors import InvalidInput
from worker.worker import Worker

X = np.random.default_rng(7).standard_normal((60, 110)).astype(np.float32)


@pytest.fixture
def two_versions(registry, tmp_path, production, model_path):
    path2 = models.linear_softmax(tmp_path / "v2.onnx", seed=2)
    v2 = registry.register(MODEL, path2, input_spec=models.SPEC, output_names=["probs"], labels=models.LABELS)
    return {production.version: model_path, v2.version: path2}


def send(r, request_id, **extra):
    fields = messages.encode_request(request_id, {"features": X[None]},
                                     deadline_ms=int(time.time() * 1000) + 60_000)
    r.xadd(keys.request_stream(MODEL), {**fields, **extra})


def replies(r, ids):
    return {i: codec.unpack(r.lpop(keys.reply_key(MODEL, i)), max_bytes=1 << 24) for i in ids}


def exposures(r, exp_id):
    journal = {f[b"id"].decode(): f for _, f in r.xrange(keys.experiment_journal(MODEL, exp_id))}
    replay = {f[b"id"].decode() for _, f in r.xrange(keys.experiment_replay(MODEL, exp_id))}
    counts = {k.decode(): int(v) for k, v in r.hgetall(keys.experiment_counts(MODEL, exp_id)).items()}
    return journal, replay, counts


def test_the_field_round_trips_and_only_off_is_accepted():
    inside = messages.encode_request("a", {"features": X[None]}, deadline_ms=0)
    outside = messages.encode_request("a", {"features": X[None]}, deadline_ms=0, experiment=False)
    assert "experiment" not in inside and outside["experiment"] == "off"

    def decode(fields):
        raw = {k.encode(): (v if isinstance(v, bytes) else str(v).encode()) for k, v in fields.items()}
        return messages.decode_request("1-0", raw, max_bytes=1 << 24)

    assert decode(inside).experiment and not decode(outside).experiment
    for bad in ("on", "OFF", "", "0", "off ", b"\xff", "x" * 5000):
        with pytest.raises(InvalidInput, match="'experiment'") as e:
            decode({**outside, "experiment": bad})
        assert e.value.request_id == "a"


def test_outside_requests_are_answered_by_the_control_and_journaled_nowhere(
        r, settings, registry, two_versions, call):
    exp = ExperimentStore(r, registry).create(MODEL, 1, 2, treatment_share=0.5, unit="request_id")
    inside = [f"in{i}" for i in range(30)]
    for i in inside:  # an old client's entries: no field
        send(r, i)
    batch = [X] * 40
    future = call(settings.redis_url, "predict_many", MODEL, batch, experiment=False)
    wait_until(lambda: r.xlen(keys.request_stream(MODEL)) == len(inside) + len(batch), 5)
    Worker(settings, MODEL, burst=True).run()
    outside = future.result(timeout=15)

    expected = models.reference_outputs(two_versions[1], X[None])
    for p in outside:
        assert (p.model_version, p.variant, p.in_experiment) == (1, "none", False)
        np.testing.assert_allclose(p.outputs["probs"], expected[0], rtol=1e-4, atol=1e-6)
    got = replies(r, inside)
    assert {g["variant"] for g in got.values()} == {"control", "treatment"}, "the others still split"
    assert all(g["variant"] == exp.arm("", i) for i, g in got.items())

    journal, replay, counts = exposures(r, exp.id)
    assert set(journal) == set(inside) and replay == set(inside)
    n_treatment = sum(exp.arm("", i) == "treatment" for i in inside)
    assert counts == {"control:requests": len(inside) - n_treatment, "treatment:requests": n_treatment}


def test_a_single_outside_predict_with_no_experiment_says_none(r, settings, production, call):
    future = call(settings.redis_url, "predict", MODEL, X, experiment=False)
    wait_until(lambda: r.xlen(keys.request_stream(MODEL)) == 1, 5)
    Worker(settings, MODEL, burst=True).run()
    p = future.result(timeout=15)
    assert (p.model_version, p.variant, p.in_experiment) == (production.version, "none", False)


def test_shadow_neither_scores_nor_journals_outside_requests(r, settings, registry, two_versions):
    exp = ExperimentStore(r, registry).create(MODEL, 1, 2, mode="shadow")
    for i in range(4):
        send(r, f"in{i}")
        send(r, f"out{i}", experiment="off")
    Worker(settings, MODEL, burst=True).run()
    got = replies(r, [f"{k}{i}" for k in ("in", "out") for i in range(4)])
    assert all(g["version"] == 1 and g["variant"] == ("none" if i.startswith("out") else "control")
               for i, g in got.items())
    journal, replay, counts = exposures(r, exp.id)
    assert set(journal) == {f"in{i}" for i in range(4)} and len(replay) == 4
    assert all(e[b"shadow_version"] == b"2" for e in journal.values())
    assert counts == {"control:requests": 4, "treatment:requests": 4}


def test_a_failing_control_journals_only_its_exposures(r, settings, registry, two_versions, monkeypatch):
    exp = ExperimentStore(r, registry).create(MODEL, 1, 2, treatment_share=0.5, unit="request_id")
    inside = [f"in{i}" for i in range(20)]
    for i in inside:
        send(r, i)
        send(r, f"out{i}", experiment="off")
    worker = Worker(settings, MODEL, burst=True)
    worker.reconcile()

    def explode(inputs):
        raise RuntimeError("control broke")

    monkeypatch.setattr(worker.slot.loaded.backend, "run", explode)
    worker.run()
    got = replies(r, [f"out{i}" for i in inside])
    assert all(g["error"]["code"] == "INTERNAL" for g in got.values())
    journal, _, counts = exposures(r, exp.id)
    in_control = {i for i in inside if exp.arm("", i) == "control"}
    assert {i for i, e in journal.items() if e.get(b"error")} == in_control
    assert counts["control:errors:INTERNAL"] == counts["control:requests"] == len(in_control)


def test_a_malformed_value_gets_invalid_input_and_the_worker_goes_on(r, settings, registry, two_versions):
    exp = ExperimentStore(r, registry).create(MODEL, 1, 2, treatment_share=0.5, unit="request_id")
    bad = {"b0": "on", "b1": "OFF", "b2": "", "b3": b"\xff\xfe", "b4": "1"}
    for request_id, value in bad.items():
        send(r, request_id, experiment=value)
    send(r, "good", experiment="off")
    Worker(settings, MODEL, burst=True).run()
    got = replies(r, [*bad, "good"])
    for request_id in bad:
        assert got[request_id]["error"]["code"] == "INVALID_INPUT"
        assert "'experiment'" in got[request_id]["error"]["message"]
    assert got["good"]["ok"] and got["good"]["variant"] == "none"
    assert exposures(r, exp.id) == ({}, set(), {})


@pytest.mark.timeout(60)
def test_cli_predict_stays_outside_unless_asked_in(r, settings, registry, two_versions, capsys, tmp_path):
    from streamserve.cli import main

    exp = ExperimentStore(r, registry).create(MODEL, 1, 2, treatment_share=0.5, unit="request_id")
    np.save(tmp_path / "x.npy", X)
    base = ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir),
            "predict", MODEL, "--npy", str(tmp_path / "x.npy"), "--timeout-s", "10"]
    with ThreadedWorker(Worker(settings, MODEL)):
        for _ in range(3):
            assert main(base) == 0
            captured = capsys.readouterr()
            reply = json.loads(captured.out)
            assert (reply["version"], reply["variant"]) == (1, "none")
            assert "answered by testmodel v1, arm: none (sent outside any experiment)" in captured.err
        assert main([*base, "--in-experiment"]) == 0
        captured = capsys.readouterr()
        reply = json.loads(captured.out)
        assert reply["variant"] in ("control", "treatment")
        assert f"arm: {reply['variant']} (journaled as an exposure" in captured.err
        journal = wait_until(lambda: exposures(r, exp.id)[0], 10)
    assert len(journal) == 1, "only the --in-experiment call is an exposure"
