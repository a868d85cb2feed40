"""Workers serving both arms of an experiment: split and shadow, per-arm accounting."""

import time

import models
import numpy as np
import pytest
from conftest import MODEL

from experiments.store import ExperimentStore
from protocol import codec, keys, messages
from worker.worker import Worker

X = np.random.default_rng(21).standard_normal((60, 110)).astype(np.float32)


@pytest.fixture
def two_versions(registry, tmp_path, production, model_path):
    path2 = models.linear_softmax(tmp_path / "v2.onnx", seed=2)
    v2 = registry.register(MODEL, path2, input_spec=models.SPEC, output_names=["probs"], labels=models.LABELS)
    return {production.version: model_path, v2.version: path2}


def send(r, request_id, route=""):
    fields = messages.encode_request(request_id, {"features": X[None]}, route=route,
                                     deadline_ms=int(time.time() * 1000) + 60_000)
    r.xadd(keys.request_stream(MODEL), fields)


def replies(r, ids):
    return {i: codec.unpack(r.lpop(keys.reply_key(MODEL, i)), max_bytes=1 << 24) for i in ids}


def test_split_answers_each_request_from_its_arm_and_accounts_per_arm(r, settings, registry, two_versions):
    exp = ExperimentStore(r, registry).create(MODEL, 1, 2, treatment_share=0.5, unit="request_id")
    ids = [f"q{i}" for i in range(60)]
    for i in ids:
        send(r, i)
    Worker(settings, MODEL, burst=True).run()
    got = replies(r, ids)
    arms = {i: exp.arm("", i) for i in ids}
    assert {g["variant"] for g in got.values()} == {"control", "treatment"}
    for i, reply in got.items():
        assert reply["variant"] == arms[i]
        assert reply["version"] == (1 if arms[i] == "control" else 2)
        probs = codec.decode_tensor(reply["outputs"]["probs"], max_bytes=1 << 20)
        np.testing.assert_allclose(probs, models.reference_outputs(two_versions[reply["version"]], X[None]),
                                   rtol=1e-4, atol=1e-6)
    counts = {k.decode(): int(v) for k, v in r.hgetall(keys.experiment_counts(MODEL, exp.id)).items()}
    n_treatment = sum(a == "treatment" for a in arms.values())
    assert counts == {"control:requests": 60 - n_treatment, "treatment:requests": n_treatment}
    journal = r.xrange(keys.experiment_journal(MODEL, exp.id))
    assert len(journal) == 60 and {e[1][b"arm"].decode() for e in journal} == {"control", "treatment"}
    assert not r.keys(f"*{exp.id}:latency*"), "no per-arm latency lists: the journal has each latency"


def test_journal_has_route_latency_and_label_of_each_answer(r, settings, registry, two_versions):
    exp = ExperimentStore(r, registry).create(MODEL, 1, 2, treatment_share=0.5, unit="request_id")
    sent_ms = time.time() * 1000
    for i in range(8):
        send(r, f"j{i}", route=f"SYM{i % 2}" if i else "")
    Worker(settings, MODEL, burst=True).run()
    after_ms = time.time() * 1000
    got = replies(r, [f"j{i}" for i in range(8)])
    journal = {f[b"id"].decode(): f for _, f in r.xrange(keys.experiment_journal(MODEL, exp.id))}
    assert set(journal) == set(got)
    for i, (request_id, entry) in enumerate(sorted(journal.items())):
        reply = got[request_id]
        assert entry[b"arm"].decode() == reply["variant"] and int(entry[b"version"]) == reply["version"]
        assert entry[b"route"] == (f"SYM{i % 2}".encode() if i else b"")
        assert entry[b"label"].decode() == reply["label"][0] and b"error" not in entry
        latency = entry[b"latency_ms"].decode()
        assert len(latency.split(".")[1]) == 3, "3 decimals"
        timings = reply["timings"]
        assert float(latency) == pytest.approx(timings["queue_ms"] + timings["infer_ms"], abs=1e-3)
        assert 0 < float(latency) <= after_ms - sent_ms + 1  # entry ids are whole ms


def test_route_is_sticky_across_requests(r, settings, registry, two_versions):
    exp = ExperimentStore(r, registry).create(MODEL, 1, 2, treatment_share=0.5)
    ids = [f"s{i}" for i in range(20)]
    for i in ids:
        send(r, i, route="BTCUSDT")
    Worker(settings, MODEL, burst=True).run()
    assert {g["variant"] for g in replies(r, ids).values()} == {exp.arm("BTCUSDT", "any")}


def test_shadow_answers_from_control_and_journals_both(r, settings, registry, two_versions):
    exp = ExperimentStore(r, registry).create(MODEL, 1, 2, mode="shadow")
    ids = [f"h{i}" for i in range(10)]
    for i in ids:
        send(r, i)
    Worker(settings, MODEL, burst=True).run()
    assert all(g["version"] == 1 and g["variant"] == "control" for g in replies(r, ids).values())
    journal = [e[1] for e in r.xrange(keys.experiment_journal(MODEL, exp.id))]
    assert len(journal) == 10 and all(e[b"shadow_version"] == b"2" and e[b"shadow_label"] for e in journal)
    assert all(e[b"arm"] == b"control" and float(e[b"latency_ms"]) > 0 and b"shadow_error" not in e
               for e in journal)
    counts = r.hgetall(keys.experiment_counts(MODEL, exp.id))
    assert counts == {b"control:requests": b"10", b"treatment:requests": b"10"}


def test_failing_treatment_fails_only_its_arm(r, settings, registry, two_versions, monkeypatch):
    exp = ExperimentStore(r, registry).create(MODEL, 1, 2, treatment_share=0.5, unit="request_id")
    ids = [f"f{i}" for i in range(30)]
    for i in ids:
        send(r, i)
    worker = Worker(settings, MODEL, burst=True)
    worker.reconcile()

    def explode(inputs):
        raise RuntimeError("treatment broke")

    monkeypatch.setattr(worker.arms.treatment.backend, "run", explode)
    worker.run()
    for i, reply in replies(r, ids).items():
        assert reply["ok"] == (exp.arm("", i) == "control")
    counts = r.hgetall(keys.experiment_counts(MODEL, exp.id))
    assert int(counts[b"treatment:errors:INTERNAL"]) == sum(exp.arm("", i) == "treatment" for i in ids)
    journal = {f[b"id"].decode(): f for _, f in r.xrange(keys.experiment_journal(MODEL, exp.id))}
    assert set(journal) == set(ids), "a failed request is journaled too"
    for i, entry in journal.items():
        failed = exp.arm("", i) == "treatment"
        assert entry[b"arm"].decode() == exp.arm("", i)
        assert entry.get(b"error") == (b"INTERNAL" if failed else None)
        assert (b"label" in entry) != failed and float(entry[b"latency_ms"]) > 0 and entry[b"route"] == b""


def test_failing_shadow_is_journaled_as_the_treatments_error(r, settings, registry, two_versions,
                                                             monkeypatch):
    exp = ExperimentStore(r, registry).create(MODEL, 1, 2, mode="shadow")
    ids = [f"g{i}" for i in range(6)]
    for i in ids:
        send(r, i, route="ETHUSDT")
    worker = Worker(settings, MODEL, burst=True)
    worker.reconcile()

    def explode(inputs):
        raise RuntimeError("shadow broke")

    monkeypatch.setattr(worker.arms.treatment.backend, "run", explode)
    worker.run()
    assert all(g["ok"] and g["variant"] == "control" for g in replies(r, ids).values())
    journal = [f for _, f in r.xrange(keys.experiment_journal(MODEL, exp.id))]
    assert len(journal) == 6
    assert all(e[b"shadow_error"] == b"INTERNAL" and e[b"shadow_version"] == b"2" and b"shadow_label" not in e
               and e[b"label"] and e[b"route"] == b"ETHUSDT" for e in journal)
    counts = r.hgetall(keys.experiment_counts(MODEL, exp.id))
    assert counts == {b"control:requests": b"6", b"treatment:requests": b"6",
                      b"treatment:errors:INTERNAL": b"6"}


def test_stopped_experiment_serves_production_untagged(r, settings, registry, two_versions):
    store = ExperimentStore(r, registry)
    store.create(MODEL, 1, 2, treatment_share=0.5, unit="request_id")
    store.set_status(MODEL, "stopped", reason="done")
    for i in ("a", "b", "c"):
        send(r, i)
    Worker(settings, MODEL, burst=True).run()
    assert all(g["version"] == 1 and "variant" not in g for g in replies(r, ["a", "b", "c"]).values())


def test_replay_runs_a_version_on_what_production_saw(r, settings, registry, two_versions, capsys):
    from streamserve.cli import main

    ExperimentStore(r, registry).create(MODEL, 1, 2, treatment_share=0.5, unit="request_id")
    for i in range(16):
        send(r, f"p{i}")
    Worker(settings, MODEL, burst=True).run()
    assert r.xlen(keys.experiment_replay(MODEL, ExperimentStore(r, registry).get(MODEL).id)) == 16
    base = ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir)]
    assert main([*base, "replay", MODEL, "2"]) == 0
    out = capsys.readouterr().out
    assert "v2 vs what treatment answered: 100.00%" in out
