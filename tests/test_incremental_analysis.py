"""The live analysis reads the journal and outcomes incrementally: the same data and decisions as a
full re-read, and an analysis after N new entries reads only those N."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import MODEL

from experiments import analysis, runner
from protocol import keys, sharding


@pytest.fixture
def make_experiment(make_experiment, r):
    """conftest's experiment of v1 vs v2 started an hour ago, here on two shards, 30 s label horizon."""
    sharding.write_layout(r, MODEL, sharding.ShardLayout(2, 2, 2))
    return lambda **options: make_experiment(**{"label_horizon_s": 30.0, **options})


class Counting:
    """A client that counts the stream entries XRANGE returned (everything else passes through)."""

    def __init__(self, client) -> None:
        self.client, self.entries = client, 0

    def xrange(self, *args, **kwargs):
        page = self.client.xrange(*args, **kwargs)
        self.entries += len(page)
        return page

    def __getattr__(self, name):
        return getattr(self.client, name)


def write_batch(r, e, rng, batch: int, start_ms: int, *, n: int = 300) -> None:
    """``n`` requests over two shards at 10 ms steps with outcomes: most on time, some late, some before
    their journal entry is written, repeats, malformed ones, and some that never arrive."""
    pipe = r.pipeline(transaction=False)
    base = start_ms + batch * 60_000  # a batch's outcomes all arrive before the next batch starts
    for i in range(n):
        request_id, route = f"b{batch}r{i}", f"SYM{rng.integers(40)}"
        fields = {"id": request_id, "arm": e.arm(route, request_id), "version": "1", "route": route,
                  "latency_ms": f"{rng.gamma(4, 1):.3f}"}
        fields |= {"error": "INTERNAL"} if rng.random() < 0.02 else {"label": str(rng.choice(["up", "down"]))}
        if e.mode == "shadow":
            fields |= {"arm": "control", "shadow_version": "2", "shadow_label": "up"}
        pipe.xadd(keys.experiment_journal(MODEL, e.id, i % 2), fields, id=f"{base + i * 10}-*")
    outcomes = []
    for i in rng.permutation(n)[: int(n * 0.9)]:
        delay_ms = int(rng.choice([5_000, 20_000, 45_000]))  # on time, on time, late (horizon 30 s)
        outcomes.append((base + int(i) * 10 + delay_ms, {
            "id": f"b{batch}r{i}", "at_ms": "1", "label": str(rng.choice(["up", "down"])),
            "pnl": f"{rng.standard_t(3):.4f}"}))
    outcomes += [(base + 55_000, {"id": f"b{batch}r0", "at_ms": "1", "label": "down"}),  # a repeat
                 (base + 55_001, {"id": "x", "at_ms": "1", "correct": "7"}),  # malformed
                 # the outcome of a request journaled in the next batch: read before its journal entry
                 (base + 55_002, {"id": f"b{batch + 1}r5", "at_ms": "1", "label": "up"})]
    for at_ms, fields in sorted(outcomes, key=lambda o: o[0]):
        pipe.xadd(keys.outcomes_stream(MODEL), fields, id=f"{at_ms}-*")
    pipe.execute()


def same_columns(a, b) -> None:
    for name in ("t_s", "unit", "arm", "error", "latency_ms", "outcome_t_s", "correct", "pnl"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.unit_names == b.unit_names and a.start_s == b.start_s


@pytest.mark.timeout(60)
@pytest.mark.parametrize("design", [{}, {"mode": "shadow"}, {"unit": "request_id"}])
def test_incremental_reads_give_the_columns_and_decisions_of_a_full_read(r, make_experiment, design):
    e = make_experiment(**design)
    rng = np.random.default_rng(7)
    reader = runner.Reader(e)
    history: list[dict] = []
    for batch in range(6):
        write_batch(r, e, rng, batch, int(e.created_at * 1000) + 1000)
        now_s = e.created_at + 1 + batch * 60 + 40
        incremental, read = runner.observations(r, e, reader)
        full, full_read = runner.observations(r, e)
        assert read == full_read
        if e.unit == "route":
            same_columns(incremental, full)
        else:  # request codes are numbered in reading order; every column but the code is the same
            order = np.lexsort((full.arm, np.array(full.unit_names)[full.unit]))
            mine = np.lexsort((incremental.arm, np.array(incremental.unit_names)[incremental.unit]))
            for name in ("t_s", "arm", "error", "latency_ms", "outcome_t_s", "correct", "pnl"):
                np.testing.assert_array_equal(getattr(incremental, name)[mine], getattr(full, name)[order])
        a = analysis.evaluate(e, incremental, now_s, history).to_dict()
        b = analysis.evaluate(e, full, now_s, history).to_dict()
        a.pop("at"), b.pop("at")  # the wall clock of each call
        assert json_equal(a, b)
        history.append(a)
    assert read.journal_entries == 6 * 300 and read.outcomes_duplicate > 0 and read.outcomes_malformed == 6
    assert read.outcomes_unmatched == 1, "the last batch's early outcome waits for its journal entry"


def json_equal(a, b) -> bool:
    """Equal, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_an_analysis_after_n_new_entries_reads_only_those(r, registry, make_experiment):
    e = make_experiment()
    rng = np.random.default_rng(3)
    start_ms = int(e.created_at * 1000) + 1000
    for batch in range(4):
        write_batch(r, e, rng, batch, start_ms)
    readers: dict[str, runner.Reader] = {}
    client = Counting(r)
    runner.run_analysis(client, registry, MODEL, readers=readers)
    first = client.entries
    assert first >= 4 * 300 + 4 * 273, "the first analysis reads everything"

    write_batch(r, e, rng, 4, start_ms)
    new = 300 + 270 + 3 + 1  # journal entries, outcomes, repeat / malformed / early, the last decision
    client.entries = 0
    incremental = runner.run_analysis(client, registry, MODEL, readers=readers)
    assert client.entries == new, "an analysis reads only what was written since the last one"

    client.entries = 0
    full = runner.run_analysis(client, registry, MODEL)
    assert client.entries > first + new, "without a kept reader everything is read again"
    assert (incremental.decision, incremental.look) == (full.decision, full.look)


def test_watch_keeps_its_reader_between_analyses(r, settings, registry, make_experiment, monkeypatch, capsys):
    """``experiment watch`` passes the same readers to every analysis."""
    from experiments import cli

    e = make_experiment()
    seen: list[dict] = []

    def analyse(client, registry, model, *, apply=False, readers=None):
        seen.append(readers)
        return analysis.Decision("CONTINUE" if len(seen) < 2 else "KEEP", "test", 1, [], 0.0)

    monkeypatch.setattr(runner, "run_analysis", analyse)
    args = type("Args", (), {"model": MODEL, "apply": False, "interval_s": 0.0})
    assert cli._watch(args, settings) == 0
    assert len(seen) == 2 and seen[0] is seen[1] is not None
    assert e.id


def test_a_reader_holding_more_than_a_full_read_could_starts_over(r, registry, make_experiment, monkeypatch):
    """The streams are capped, a kept reader is not: past what a full read could hold, `watch` reads
    everything once more instead of holding every request of a long experiment."""
    e = make_experiment()
    rng = np.random.default_rng(4)
    start_ms = int(e.created_at * 1000) + 1000
    write_batch(r, e, rng, 0, start_ms)
    readers: dict[str, runner.Reader] = {}
    runner.run_analysis(r, registry, MODEL, readers=readers)
    kept = readers[e.id]
    runner.run_analysis(r, registry, MODEL, readers=readers)
    assert readers[e.id] is kept, "within the bound the reader is kept"
    monkeypatch.setattr(runner, "READER_MAX_ENTRIES_PER_STREAM", 100)
    write_batch(r, e, rng, 1, start_ms)
    runner.run_analysis(r, registry, MODEL, readers=readers)
    assert readers[e.id] is not kept and list(readers) == [e.id]
