"""Outcomes are untrusted: first outcome per request wins, malformed entries are skipped and counted."""

import models
import pytest
from conftest import MODEL

from experiments import runner
from experiments.outcomes import Outcome, first_per_request, parse
from experiments.store import ExperimentStore
from protocol import keys
from protocol.errors import InvalidInput
from streamserve.cli import main


def test_a_valid_outcome_parses():
    assert parse({"id": "r1", "at_ms": "1700000000000", "label": "up", "pnl": "-1.5", "correct": "1"}) == \
        Outcome("r1", 1700000000000, True, "up", -1.5)


@pytest.mark.parametrize("fields", [
    {"at_ms": "1", "correct": "1"}, {"id": "r1\n", "at_ms": "1", "correct": "1"},
    {"id": "r1", "at_ms": "1.5", "correct": "1"}, {"id": "r1", "correct": "1"},
    {"id": "r1", "at_ms": "1", "correct": "2"}, {"id": "r1", "at_ms": "1", "pnl": "abc"},
    {"id": "r1", "at_ms": "1", "pnl": "nan"}, {"id": "r1", "at_ms": "1", "pnl": "inf"},
    {"id": "r1", "at_ms": "1"}, {"id": "r1", "at_ms": "1", "label": ""},
    {"id": "r1", "at_ms": "1", "label": "x" * 65},
])
def test_malformed_outcomes_are_refused(fields):
    with pytest.raises(InvalidInput):
        parse(fields)


def test_first_outcome_per_request_wins_and_the_rest_are_counted():
    entries = [{"id": "a", "at_ms": "1", "correct": "1"}, {"id": "a", "at_ms": "2", "correct": "0"},
               {"id": "b", "at_ms": "x", "correct": "0"}, {"id": "b", "at_ms": "3", "correct": "0"}]
    got = first_per_request(entries)
    assert got.first == {"a": Outcome("a", 1, True), "b": Outcome("b", 3, False)}
    assert (got.duplicates, got.malformed) == (1, 1)


@pytest.fixture
def experiment(r, registry, production, tmp_path):
    path2 = models.linear_softmax(tmp_path / "v2.onnx", seed=2)
    registry.register(MODEL, path2, input_spec=models.SPEC, output_names=["probs"], labels=models.LABELS)
    e = ExperimentStore(r, registry).create(MODEL, 1, 2, treatment_share=0.5)
    for i, arm in enumerate(["control", "treatment"] * 5):  # what workers journal per answered request
        journal = {"id": f"q{i}", "arm": arm, "version": "1", "label": "up"}
        r.xadd(keys.experiment_journal(MODEL, e.id), journal)
    return e


def test_snapshot_counts_each_request_once_and_survives_garbage(r, settings, experiment, capsys):
    stream = keys.outcomes_stream(MODEL)
    r.xadd(stream, {"id": "q0", "at_ms": "1", "label": "up"})  # right, and first
    for _ in range(49):
        r.xadd(stream, {"id": "q0", "at_ms": "2", "label": "down"})  # the same request, 49 more times
    for fields in ({"id": "q1", "at_ms": "1", "pnl": "abc"}, {"id": "q1", "at_ms": "1.5", "correct": "1"},
                   {"id": b"\xff\xfe", "at_ms": "1", "correct": "1"}, {"garbage": "1"},
                   {"id": "q2", "at_ms": "1", "correct": "7"}):
        r.xadd(stream, fields)
    r.xadd(stream, {"id": "q1", "at_ms": "3", "label": "down"})  # treatment, wrong
    r.hset(keys.experiment_counts(MODEL, experiment.id), "control:requests", "lots")
    r.lpush(keys.experiment_latency(MODEL, experiment.id, "control"), "1.5", "fast", "nan")
    r.xadd(keys.experiment_journal(MODEL, experiment.id), {"id": "q9", "arm": "nobody"})
    r.xadd(stream, {"id": "q9", "at_ms": "3", "correct": "1"})

    data = runner.snapshot(r, experiment)
    assert (data.control.outcomes, data.control.correct) == (1, 1)
    assert (data.treatment.outcomes, data.treatment.correct) == (1, 0)
    assert (data.outcomes_duplicate, data.outcomes_malformed) == (49, 5)
    assert data.records_malformed == 4  # the counter, two latencies, the journal entry of no arm
    assert data.control.latencies_ms == [1.5]

    assert main(["--redis-url", settings.redis_url, "experiment", "status", MODEL]) == 0
    out = capsys.readouterr().out
    assert "5 malformed outcomes, 49 repeated outcomes" in out
