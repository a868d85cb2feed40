"""Outcomes are untrusted: first outcome per request wins, malformed entries are skipped and counted."""

import numpy as np
import pytest
from conftest import MODEL

from experiments import runner
from experiments.outcomes import Outcome, parse
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


def start_ms(e):
    return int(e.created_at * 1000)


def journal(r, e, at_ms, **fields):
    """What a worker journals for one request, at ``at_ms`` on the Redis clock."""
    r.xadd(keys.experiment_journal(MODEL, e.id), fields, id=f"{at_ms}-*")


def outcome(r, at_ms, **fields):
    r.xadd(keys.outcomes_stream(MODEL), {"at_ms": "1", **fields}, id=f"{at_ms}-*")


def columns(obs):
    names = np.array(obs.unit_names)[obs.unit].tolist()
    return {"unit": names, "arm": obs.arm.tolist(), "error": obs.error.tolist(), "latency_ms": obs.latency_ms,
            "outcome_t_s": obs.outcome_t_s, "correct": obs.correct, "pnl": obs.pnl}


def test_observations_one_row_per_request_with_its_outcome_and_garbage_counted(r, make_experiment):
    e = make_experiment()
    t = start_ms(e) + 1000
    journal(r, e, t, id="a1", arm="control", version="1", route="BTC", latency_ms="1.500", label="up,down")
    journal(r, e, t + 10, id="a2", arm="treatment", version="2", route="ETH", latency_ms="2.25", label="down")
    journal(r, e, t + 20, id="a3", arm="control", version="1", route="", latency_ms="3.000", label="up")
    journal(r, e, t + 30, id="a4", arm="treatment", version="2", route="ETH", latency_ms="9", error="OOPS")
    journal(r, e, t + 40, id="a5", arm="control", version="1", route="BTC", latency_ms="4.000", label="up",
            shadow_label="down", shadow_version="2")  # shadow fields in a split experiment: not a row
    for bad in ({"id": "b1", "arm": "nobody"}, {"id": "b 2", "arm": "control"}, {"arm": "control"},
                {"id": "b3", "arm": "control", "latency_ms": "fast"}, {"id": b"\xff", "arm": "control"},
                {"id": "b4", "arm": "control", "latency_ms": "-1"},
                {"id": "b5", "arm": "treatment", "latency_ms": "inf"}):
        journal(r, e, t + 50, **bad)
    journal(r, e, t + 60, id="a1", arm="treatment", version="2", route="BTC", latency_ms="1.0", label="down")
    outcome(r, t + 500, id="a1", label="up", pnl="2.5")  # label against the request's first label
    outcome(r, t + 600, id="a1", label="down")  # repeated: the first counts
    outcome(r, t + 700, id="a2", correct="1", pnl="-1")
    outcome(r, t + 800, id="a3", label="down")
    outcome(r, t + 900, id="a4", correct="1")  # a failed request made no prediction
    outcome(r, t + 900, id="zz", correct="1")  # not in the journal
    outcome(r, t + 950, id="a5", correct="2")  # malformed

    obs, read = runner.observations(r, e)
    assert obs.t_s.tolist() == [(t + dt) / 1000 for dt in (0, 10, 20, 30, 40)] and obs.start_s == e.created_at
    got = columns(obs)
    assert got["unit"] == ["BTC", "ETH", "a3", "ETH", "BTC"], "the route, else the request id"
    assert got["arm"] == [0, 1, 0, 1, 0] and got["error"] == [False, False, False, True, False]
    np.testing.assert_array_equal(got["latency_ms"], [1.5, 2.25, 3.0, np.nan, 4.0])
    np.testing.assert_array_equal(got["outcome_t_s"], [(t + 500) / 1000, (t + 700) / 1000, (t + 800) / 1000,
                                                       np.nan, np.nan])
    np.testing.assert_array_equal(got["correct"], [1, 1, 0, np.nan, np.nan])
    np.testing.assert_array_equal(got["pnl"], [2.5, -1, np.nan, np.nan, np.nan])
    assert read == runner.ReadStats(journal_entries=5, journal_malformed=7, journal_duplicate=1,
                                    outcomes_malformed=1, outcomes_duplicate=1, outcomes_unmatched=1)


def test_the_request_is_the_unit_when_the_experiment_assigns_by_request(r, make_experiment):
    e = make_experiment(unit="request_id")
    t = start_ms(e) + 1000
    for i, route in enumerate(["BTC", "BTC", ""]):
        journal(r, e, t + i, id=f"q{i}", arm=e.arm(route, f"q{i}"), route=route, latency_ms="1", label="up")
    obs, _ = runner.observations(r, e)
    assert columns(obs)["unit"] == ["q0", "q1", "q2"]
    assert obs.arm.tolist() == [int(e.arm("", f"q{i}") == "treatment") for i in range(3)]


def test_shadow_makes_a_row_per_arm_from_the_control_answer_and_the_shadow_label(r, make_experiment):
    e = make_experiment(mode="shadow")
    t = start_ms(e) + 1000
    common = {"arm": "control", "version": "1", "route": "BTC", "latency_ms": "2.0"}
    journal(r, e, t, id="s1", label="up", shadow_version="2", shadow_label="down", **common)
    journal(r, e, t + 1, id="s2", label="up", shadow_version="2", shadow_error="INTERNAL", **common)
    journal(r, e, t + 2, id="s3", label="up", shadow_version="2", shadow_label="up", **common)
    journal(r, e, t + 3, id="s4", error="INTERNAL", shadow_version="2", shadow_label="down", **common)
    outcome(r, t + 100, id="s1", label="up", pnl="3")
    outcome(r, t + 101, id="s2", correct="0")
    outcome(r, t + 102, id="s3", correct="1")  # says nothing about the treatment's label
    outcome(r, t + 103, id="s4", label="down")

    obs, read = runner.observations(r, e)
    assert len(obs) == 8 and read.journal_entries == 4
    rows = {(round(ts * 1000) - t, arm): i for i, (ts, arm) in enumerate(zip(obs.t_s, obs.arm, strict=True))}
    control = [rows[(k, 0)] for k in range(4)]
    treatment = [rows[(k, 1)] for k in range(4)]
    assert set(obs.unit_names[u] for u in obs.unit) == {"BTC"}
    np.testing.assert_array_equal(obs.correct[control], [1, 0, 1, np.nan])
    np.testing.assert_array_equal(obs.correct[treatment], [0, np.nan, np.nan, 1])
    assert obs.error[control].tolist() == [False, False, False, True]
    assert obs.error[treatment].tolist() == [False, True, False, False]
    np.testing.assert_array_equal(obs.latency_ms[control], [2, 2, 2, np.nan])
    assert np.isnan(obs.latency_ms[treatment]).all() and np.isnan(obs.pnl[treatment]).all()
    assert obs.pnl[control][0] == 3
    np.testing.assert_array_equal(obs.outcome_t_s[treatment], [(t + 100) / 1000, np.nan, (t + 102) / 1000,
                                                               (t + 103) / 1000])


def test_long_streams_are_read_page_by_page(r, make_experiment, monkeypatch):
    monkeypatch.setattr(runner, "STREAM_PAGE", 3)
    e = make_experiment(unit="request_id")
    t = start_ms(e) + 1000
    for i in range(10):
        journal(r, e, t + i, id=f"p{i}", arm="control", latency_ms="1", label="up")
        outcome(r, t + 100 + i, id=f"p{i}", correct=str(i % 2))
    obs, read = runner.observations(r, e)
    assert len(obs) == read.journal_entries == 10 and obs.correct.tolist() == [i % 2 for i in range(10)]


def test_run_analysis_appends_the_decision_record_and_applies_it(r, registry, make_experiment):
    e = make_experiment()  # 50/50 by route, but every symbol went to the control: the split is broken
    t = start_ms(e) + 1000
    for i in range(200):
        journal(r, e, t + i, id=f"h{i}", arm="control", route=f"SYM{i % 100}", latency_ms="1", label="up")
    before_s = runner.redis_now_s(r)
    decision = runner.run_analysis(r, registry, MODEL, apply=True)
    assert decision.decision == "HALT" and "sample-ratio" in decision.reason
    [record] = runner.decisions(r, e)
    assert record["applied"] is True and record["decision"] == "HALT"
    assert before_s <= record["now_s"] <= runner.redis_now_s(r)
    assert record["exposures"] == [200, 0] and record["units"] == [100, 0]
    srm = next(test for test in record["tests"] if test["metric"] == "srm")
    assert srm["role"] == "check" and srm["threshold"] > 0
    assert {"look", "info_fraction", "planned", "boundary_tested", "at"} <= set(record)
    stopped = ExperimentStore(r, registry).get(MODEL)
    assert stopped.status == "stopped" and stopped.stopped_reason.startswith("HALT")


def test_snapshot_counts_each_request_once_and_survives_garbage(r, settings, make_experiment, capsys):
    e = make_experiment()
    t = start_ms(e) + 1000
    for i, arm in enumerate(["control", "treatment"] * 5):  # what workers journal per answered request
        journal(r, e, t + i, id=f"q{i}", arm=arm, version="1", route="", latency_ms=f"{i}.5", label="up")
    stream = keys.outcomes_stream(MODEL)
    outcome(r, t + 100, id="q0", label="up")  # right, and first
    for _ in range(49):
        r.xadd(stream, {"id": "q0", "at_ms": "2", "label": "down"})  # the same request, 49 more times
    for fields in ({"id": "q1", "at_ms": "1", "pnl": "abc"}, {"id": "q1", "at_ms": "1.5", "correct": "1"},
                   {"id": b"\xff\xfe", "at_ms": "1", "correct": "1"}, {"garbage": "1"},
                   {"id": "q2", "at_ms": "1", "correct": "7"}):
        r.xadd(stream, fields)
    r.xadd(stream, {"id": "q1", "at_ms": "3", "label": "down"})  # treatment, wrong
    counts = {"control:requests": "lots", "treatment:requests": "5", "treatment:errors:INTERNAL": "2"}
    r.hset(keys.experiment_counts(MODEL, e.id), mapping=counts)
    r.xadd(keys.experiment_journal(MODEL, e.id), {"id": "q99", "arm": "nobody"})
    r.xadd(stream, {"id": "q99", "at_ms": "3", "correct": "1"})

    data = runner.snapshot(r, e)
    assert (data.control.outcomes, data.control.correct, data.control.hit_rate) == (1, 1, 1.0)
    assert (data.treatment.outcomes, data.treatment.correct) == (1, 0)
    # The control's counter is malformed (left out and counted): its 5 journaled requests are its exposures.
    assert (data.treatment.exposures, data.treatment.errors, data.control.exposures) == (5, 2, 5)
    assert (data.outcomes_duplicate, data.outcomes_malformed) == (49, 5)
    assert data.records_malformed == 2  # the counter, the journal entry of no arm
    assert data.control.latencies_ms.tolist() == [0.5, 2.5, 4.5, 6.5, 8.5]

    assert main(["--redis-url", settings.redis_url, "experiment", "status", MODEL]) == 0
    out = capsys.readouterr().out
    assert "5 malformed outcomes, 49 repeated outcomes" in out and "latency samples" in out
    assert "1 outcomes of requests not in the journal" in out and "nan" not in out
