"""``experiment status``: per arm, outcomes never above exposures, the missing share and the arrival check."""

from __future__ import annotations

import numpy as np
from conftest import MODEL

from experiments import runner
from experiments.assignment import CONTROL, TREATMENT
from protocol import keys
from protocol.messages import Request
from worker.arms import ExperimentLog


def serve(r, e, arm: str, request_ids: list[str], shard: int = 0) -> None:
    """What a worker writes for requests ``arm`` answered: journal entries and counters, in one MULTI/EXEC."""
    log = ExperimentLog(e.id)
    version = e.control_version if arm == CONTROL else e.treatment_version
    for request_id in request_ids:
        request = Request("0-1", request_id, request_id, 0, f"R{request_id}", {"x": np.zeros((1, 1))})
        log.served(arm, request, version, ["up"], 1.0)
    pipe = r.pipeline(transaction=True)
    log.queue(pipe, MODEL, shard)
    pipe.execute()


def report(r, request_ids: list[str], **fields: str) -> None:
    """What a bot writes: one outcome per request."""
    for request_id in request_ids:
        r.xadd(keys.outcomes_stream(MODEL), {"id": request_id, "at_ms": "1", **(fields or {"correct": "1"})})


def test_outcomes_never_exceed_exposures_when_traffic_arrives_during_the_read(r, make_experiment,
                                                                              monkeypatch):
    """The cause of outcomes > exposures: the counters were read before the journal and the outcomes, so
    requests answered (and their outcomes reported) while ``status`` read counted as outcomes but not as
    exposures. Workers keep answering and bots keep reporting while it reads; here, deterministically."""
    e = make_experiment()
    before = [f"a{i}" for i in range(20)]
    serve(r, e, CONTROL, before)
    report(r, before)
    read_outcomes = runner._read_outcomes

    def traffic_meanwhile(client, experiment, read):
        during = [f"b{i}" for i in range(10)]
        serve(r, e, CONTROL, during)
        report(r, during)
        return read_outcomes(client, experiment, read)

    monkeypatch.setattr(runner, "_read_outcomes", traffic_meanwhile)
    data = runner.snapshot(r, e)
    control = data.control
    assert control.outcomes <= control.exposures, (control.outcomes, control.exposures)
    assert control.received <= control.exposures == 30, "the counters are read last: they have every request"
    assert control.received >= 20 and control.missing_share != control.missing_share, "none due yet: NaN"


def test_repeated_unknown_and_trimmed_outcomes_and_shards_never_add_outcomes(r, make_experiment):
    """The other ways outcomes could outnumber exposures, each ruled out: a request reported 5 times,
    outcomes for ids no arm answered, outcomes of requests trimmed from the capped journal, and
    requests journaled on several shards (one outcomes stream joined to every shard's journal)."""
    from protocol import sharding

    e = make_experiment()
    sharding.write_layout(r, MODEL, sharding.ShardLayout(2, 2, 2))
    answered = [f"q{i}" for i in range(10)]
    serve(r, e, TREATMENT, answered)
    serve(r, e, TREATMENT, ["s1", "s2"], shard=1)  # the same kind of entries in shard 1's own keys
    for _ in range(5):
        report(r, [*answered, "s1", "s2"])
    report(r, [f"unknown{i}" for i in range(7)])
    # The cap dropped shard 0's 6 oldest exposures.
    r.xtrim(keys.experiment_journal(MODEL, e.id), maxlen=4, approximate=False)

    data = runner.snapshot(r, e)
    assert data.treatment.exposures == 12, "the counters keep every exposure"
    assert data.treatment.outcomes == 6, "outcomes are joined only to the journal entries kept"
    assert data.read.outcomes_duplicate == 4 * 12 and data.read.outcomes_unmatched == 7 + 6


def journal_rows(r, e, rows: list[tuple[int, str, str]]) -> None:
    """Journal entries at set times (entry id = the Redis clock): (at_ms, request id, arm)."""
    pipe = r.pipeline(transaction=False)
    for at_ms, request_id, arm in rows:
        pipe.xadd(keys.experiment_journal(MODEL, e.id), {"id": request_id, "arm": arm, "version": "1",
                                                          "route": f"R{request_id}", "latency_ms": "1.0",
                                                          "label": "up"}, id=f"{at_ms}-*")
    pipe.execute()


def outcomes_at(r, rows: list[tuple[int, str]]) -> None:
    """Outcomes arriving at set times: (at_ms, request id)."""
    pipe = r.pipeline(transaction=False)
    for at_ms, request_id in rows:
        pipe.xadd(keys.outcomes_stream(MODEL), {"id": request_id, "at_ms": "1", "correct": "1"},
                  id=f"{at_ms}-*")
    pipe.execute()


def traffic(r, e, arms: dict[str, tuple[int, int, int, int]]) -> None:
    """Per arm (n, on_time, late, pending): ``n`` requests of an hour ago (``on_time`` reported within
    the 60 s horizon, ``late`` after it, the rest never) and ``pending`` of the last second, reported
    and not yet due; each arm's counter as a worker keeps it. Streams are written in time order."""
    start_ms = int(e.created_at * 1000) + 1000
    now_ms = int(runner.redis_now_s(r) * 1000)
    journal, outcomes = [], []
    for arm, (n, on_time, late, pending) in arms.items():
        ids = [f"{arm[0]}{i}" for i in range(n + pending)]
        journal += [(start_ms + i, request_id, arm) for i, request_id in enumerate(ids[:n])]
        journal += [(now_ms - 1000, request_id, arm) for request_id in ids[n:]]
        outcomes += [(start_ms + 10_000 + i, ids[i]) for i in range(on_time)]
        outcomes += [(start_ms + 120_000 + i, ids[i]) for i in range(on_time, on_time + late)]
        outcomes += [(now_ms - 500, request_id) for request_id in ids[n:]]
        r.hset(keys.experiment_counts(MODEL, e.id), f"{arm}:requests", n + pending)
    journal_rows(r, e, sorted(journal))
    outcomes_at(r, sorted(outcomes))


def test_status_shows_per_arm_due_on_time_missing_received_and_the_arrival_check(r, settings, make_experiment,
                                                                                  capsys):
    from streamserve.cli import main

    e = make_experiment()
    traffic(r, e, {CONTROL: (2000, 1980, 10, 3), TREATMENT: (2000, 1900, 0, 0)})

    data = runner.snapshot(r, e)
    c, t = data.control, data.treatment
    assert (c.exposures, c.due, c.on_time, c.received) == (2003, 2000, 1980, 1993)
    assert (t.exposures, t.due, t.on_time, t.received) == (2000, 2000, 1900, 1900)
    assert (c.missing_share, t.missing_share) == (0.01, 0.05), "late outcomes count as missing"
    check = data.arrival
    assert check.applies and check.halts and check.gap_pp > check.tolerance_pp == 0.5
    assert check.halt_below is not None and t.on_time / t.due < check.halt_below < c.on_time / c.due

    assert main(["--redis-url", settings.redis_url, "experiment", "status", MODEL]) == 0
    out = capsys.readouterr().out
    print(out)
    control_row = next(line for line in out.splitlines() if line.startswith("  control"))
    assert control_row.split() == ["control", "v1", "2003", "0", "2000", "1980", "1.00%", "1993", "1.0000",
                                   "2003"]
    assert "split by route: control v1 50%, treatment v2 50%" in out
    assert "arrival check: will HALT at the next analysis: control 99.00%, treatment 95.00% on time" in out
    assert "nan" not in out and "np." not in out


def test_the_arrival_check_says_which_treatment_share_would_halt_as_the_analysis_decides():
    """The shares status shows are where :func:`analysis.decide` starts to HALT (no Redis: a summary)."""
    from experiments import analysis
    from experiments.store import Experiment
    from experiments.summary import Summary

    e = Experiment("x", MODEL, 1, 2, treatment_share=0.5)

    def summary(arrived_t: int) -> Summary:
        zeros = np.zeros((1, 2))
        return Summary(0.0, np.array([4000, 4000]), np.zeros(2, np.int64), np.array([400, 400]),
                       matured=np.array([[4000.0, 4000.0]]), arrived=np.array([[3960.0, float(arrived_t)]]),
                       late=np.zeros(2, np.int64), hit_sum=zeros, hit_n=zeros, pnl_sum=zeros, pnl_sq=zeros,
                       pnl_n=zeros, pnl_bounds=None, latency_n=0, latency_above=0, latency_windows=0)

    check = runner.arrival_check(e, summary(3960))
    assert not check.halts and check.halt_below is not None and check.halt_above is None
    first_ok = round(check.halt_below * 4000)
    assert analysis.decide(e, summary(first_ok - 1)).decision == "HALT"
    assert "outcomes arrive" in analysis.decide(e, summary(first_ok - 1)).reason
    assert analysis.decide(e, summary(first_ok)).decision != "HALT"
    assert runner.arrival_check(e, summary(first_ok - 1)).halts
    assert not runner.arrival_check(e, summary(first_ok)).halts

    shadow = runner.arrival_check(Experiment("x", MODEL, 1, 2, mode="shadow"), summary(10))
    assert not shadow.applies and not shadow.halts


def test_status_says_which_treatment_share_would_halt_and_shows_no_nan(r, settings, make_experiment, capsys):
    from streamserve.cli import main

    e = make_experiment()
    traffic(r, e, {CONTROL: (2000, 1980, 0, 0), TREATMENT: (2000, 1975, 0, 0)})
    check = runner.snapshot(r, e).arrival
    assert not check.halts and 0.95 < check.halt_below < 0.99 and check.gap_pp < 0.5

    assert main(["--redis-url", settings.redis_url, "experiment", "status", MODEL]) == 0
    out = capsys.readouterr().out
    assert "arrival check: OK (control 99.00%, treatment 98.75% on time); will HALT at the next analysis " \
           f"if the treatment's share stays below {check.halt_below:.2%}" in out
    assert "nan" not in out


def test_before_any_outcome_is_due_status_says_so_without_nan(r, settings, make_experiment, capsys):
    from streamserve.cli import main

    make_experiment(mode="shadow")
    assert main(["--redis-url", settings.redis_url, "experiment", "status", MODEL]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("  control", "  treatment"))]
    assert rows == [["control", "v1", "0", "0", "0", "0", "-", "0", "-", "0"],
                    ["treatment", "v2", "0", "0", "0", "0", "-", "0", "-", "0"]]
    assert "shadow: control v1 answers every request, treatment v2 scores each beside it" in out
    assert "arrival check: not applied in shadow mode" in out and "nan" not in out.lower()


def test_a_guardrail_without_pnl_says_no_pnl_reported():
    from experiments import analysis
    from experiments.cli import _test_line
    from experiments.data import Observations
    from experiments.store import Experiment
    from experiments.summary import summarize

    e = Experiment("x", MODEL, 1, 2, treatment_share=0.5, unit="request_id")
    n = 400
    obs = Observations.build(t_s=np.arange(n, dtype=float), unit=np.arange(n), arm=np.arange(n) % 2,
                             outcome_t_s=np.arange(n) + 1.0, correct=np.arange(n) // 2 % 2, start_s=0.0)
    decision = analysis.decide(e, summarize(e, obs, n + 3600.0))
    pnl = next(t for t in decision.tests if t["metric"] == "pnl")
    assert np.isnan(pnl["estimate"])  # what used to print as "+nan [-inf, +inf]"
    line = _test_line(pnl)
    assert line.startswith("guardrail pnl         no P&L reported  threshold")
    assert all(word not in line for word in ("nan", "inf", "np."))
    hit_rate = _test_line(next(t for t in decision.tests if t["metric"] == "hit_rate"))
    assert "[" in hit_rate and "nan" not in hit_rate
    latency = _test_line(next(t for t in decision.tests if t["metric"] == "latency_p95"))
    assert "no latency minute yet" in latency, "no latencies: not a count of 0 read as a rate"


def test_status_names_the_standing_decision_and_does_not_promise_a_halt_after_it(r, settings, make_experiment,
                                                                                capsys):
    """Once a decision stands the next analysis repeats it: a failing arrival check must not say HALT."""
    import json

    from streamserve.cli import main

    e = make_experiment()
    traffic(r, e, {CONTROL: (2000, 1980, 10, 3), TREATMENT: (2000, 1900, 0, 0)})
    assert main(["--redis-url", settings.redis_url, "experiment", "status", MODEL]) == 0
    out = capsys.readouterr().out
    assert "decision: none yet" in out and "will HALT at the next analysis" in out
    record = {"decision": "KEEP", "reason": "planned information reached", "look": 40, "info_fraction": 1.0}
    r.xadd(keys.experiment_decisions(MODEL, e.id), {"record": json.dumps(record)})
    assert main(["--redis-url", settings.redis_url, "experiment", "status", MODEL]) == 0
    out = capsys.readouterr().out
    stands = "decision: KEEP stands since look 40, 100% of the planned information: planned information " \
             "reached"
    assert stands in out
    assert "will HALT" not in out and "but a decision already stands" in out
