"""Experiment state, sticky assignment and outcome reporting."""

from collections import Counter

import fakeredis
import models
import pytest

from experiments.assignment import CONTROL, TREATMENT, assign
from experiments.store import ExperimentStore, Margins
from protocol import keys
from protocol.errors import InvalidInput, RegistryError
from registry import Registry


@pytest.fixture
def store(tmp_path):
    client = fakeredis.FakeRedis()
    registry = Registry(client, tmp_path / "store")
    path = models.linear_softmax(tmp_path / "m.onnx")
    for _ in range(2):
        registry.register("m", path, input_spec=models.SPEC, output_names=["probs"])
    return ExperimentStore(client, registry)


def test_assignment_is_sticky_and_tracks_the_split():
    arms = Counter(assign("salt", "exp1", f"SYM{i}", 0.10) for i in range(20_000))
    assert abs(arms[TREATMENT] / 20_000 - 0.10) < 0.01
    assert all(assign("salt", "exp1", "BTCUSDT", 0.10) == assign("salt", "exp1", "BTCUSDT", 0.10)
               for _ in range(10))
    other_salt = [assign("pepper", "exp1", f"SYM{i}", 0.5) for i in range(2000)]
    same_salt = [assign("salt", "exp1", f"SYM{i}", 0.5) for i in range(2000)]
    agreement = sum(a == b for a, b in zip(other_salt, same_salt, strict=True)) / 2000
    assert 0.4 < agreement < 0.6, "a new salt re-randomizes"


def test_create_one_running_experiment_per_model(store):
    exp = store.create("m", 1, 2, treatment_share=0.1, mode="shadow", margins=Margins(latency_p95_ms=3))
    assert store.get("m") == exp and exp.salt and exp.status == "running"
    assert exp.arm("BTCUSDT", "r1") in (CONTROL, TREATMENT)
    assert exp.arm("BTCUSDT", "r1") == exp.arm("BTCUSDT", "r2"), "route is the unit: sticky per symbol"
    with pytest.raises(RegistryError, match="already has experiment"):
        store.create("m", 1, 2)
    store.set_status("m", "paused")
    with pytest.raises(RegistryError, match="already has experiment"):
        store.create("m", 1, 2)
    store.set_status("m", "stopped", reason="done")
    assert store.get("m").stopped_reason == "done"
    with pytest.raises(RegistryError, match="cannot move"):
        store.set_status("m", "running")
    assert store.create("m", 2, 1).control_version == 2
    assert [e.model for e in store.list()] == ["m"]


@pytest.mark.parametrize("options, message", [
    ({"mode": "canary"}, "mode"), ({"unit": "user"}, "unit"), ({"treatment_share": 1.0}, "share"),
    ({"alpha": 0.7}, "alpha"),
])
def test_bad_options_are_refused(store, options, message):
    with pytest.raises(RegistryError, match=message):
        store.create("m", 1, 2, **options)


def test_versions_must_exist_and_differ(store):
    with pytest.raises(RegistryError, match="no version 9"):
        store.create("m", 1, 9)
    with pytest.raises(RegistryError, match="different versions"):
        store.create("m", 1, 1)


def test_record_outcome_writes_the_outcomes_stream(r, redis_server):
    from producer import Client

    with Client.from_url(redis_server.url) as client:
        client.record_outcome("m", "req1", correct=True, pnl=12.5)
        client.record_outcome("m", "req2", label="up")
        with pytest.raises(InvalidInput, match="needs correct, label or pnl"):
            client.record_outcome("m", "req3")
        with pytest.raises(InvalidInput, match="finite"):
            client.record_outcome("m", "req4", pnl=float("nan"))
        ids = client.record_outcomes("m", [("b1", {"correct": False}), ("b2", {"pnl": -1.0})])
        assert len(ids) == 2 and client.record_outcomes("m", []) == []
    rows = [fields for _, fields in r.xrange(keys.outcomes_stream("m"))]
    assert [row[b"id"] for row in rows[2:]] == [b"b1", b"b2"]
    assert rows[0][b"id"] == b"req1" and rows[0][b"correct"] == b"1" and float(rows[0][b"pnl"]) == 12.5
    assert rows[1][b"label"] == b"up" and b"correct" not in rows[1]
