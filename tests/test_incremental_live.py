"""The live analysis keeps its summary between analyses: at every analysis it equals a full read's
(``summarize`` over every row read), and an analysis costs the rows that arrived and matured since the
last one, not the experiment's age."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
from conftest import MODEL

from experiments import analysis, covariates, runner
from experiments.summary import summarize
from protocol import keys, sharding

SHARDS = 3
HORIZON_S = 30.0
STREAMS = (*range(SHARDS), "outcomes")  # each shard's journal and the outcomes stream
RATES = np.linspace(0.35, 0.75, 10)  # SYM0..SYM9's pre-period hit rates; SYM10 and SYM11 have none


@pytest.fixture
def make_experiment(make_experiment, r):
    """conftest's experiment of v1 vs v2 started an hour ago, here on three shards, 30 s label horizon."""
    sharding.write_layout(r, MODEL, sharding.ShardLayout(SHARDS, SHARDS, SHARDS))
    return lambda **options: make_experiment(**{"label_horizon_s": HORIZON_S, **options})


def save_pre_period(r, e) -> None:
    """A pre-period in which SYM k was right RATES[k] of the time (and made 10·RATES[k] a trade)."""
    rng = np.random.default_rng(11)
    routes = [f"SYM{i % 10}" for i in range(2000)]
    correct = np.array([float(rng.random() < RATES[i % 10]) for i in range(2000)])
    pnl = np.array([10 * RATES[i % 10] + rng.standard_normal() for i in range(2000)])
    covariates.save(r, e, covariates.summarise(routes, correct, pnl, source="test"))


@dataclass
class Traffic:
    """Journal entries (per shard) and outcomes on the Redis clock, written in time order as the
    analyses' clocks pass them: :meth:`write_until` writes each stream up to its own cut."""

    journal: dict[int, list[tuple[int, dict]]] = field(default_factory=dict)
    outcomes: list[tuple[int, dict]] = field(default_factory=list)
    written: dict[object, int] = field(default_factory=dict)  # stream → entries written

    def write_until(self, r, e, cuts_ms: dict[object, int]) -> None:
        pipe = r.pipeline(transaction=False)
        streams = [(shard, keys.experiment_journal(MODEL, e.id, shard), self.journal.get(shard, []))
                   for shard in range(SHARDS)] + [("outcomes", keys.outcomes_stream(MODEL), self.outcomes)]
        for stream, key, entries in streams:
            start = self.written.get(stream, 0)
            end = start
            while end < len(entries) and entries[end][0] <= cuts_ms[stream]:
                pipe.xadd(key, entries[end][1], id=f"{entries[end][0]}-*")
                end += 1
            self.written[stream] = end
        pipe.execute()


def traffic(e, rng, start_ms: int, n: int, *, step_ms: int = 150) -> Traffic:
    """``n`` requests from ``start_ms``, three at a time at the same millisecond on different shards
    (ties a full read orders by shard), on SYM0..SYM11, 2 % failed; 90 % get an outcome, on time or
    after the horizon, some within 50 ms (written before their journal entry when the outcomes stream
    is read further than the shard), some repeated, a few malformed."""
    t = Traffic()
    for i in range(n):
        at_ms = start_ms + (i // 3) * step_ms
        request_id, route = f"r{i}", f"SYM{rng.integers(12)}"
        fields = {"id": request_id, "arm": e.arm(route, request_id), "version": "1", "route": route,
                  "latency_ms": f"{rng.gamma(4, 1):.3f}"}
        fields |= {"error": "INTERNAL"} if rng.random() < 0.02 else {"label": str(rng.choice(["up", "down"]))}
        if e.mode == "shadow":
            shadow = {"shadow_error": "INTERNAL"} if rng.random() < 0.02 else {"shadow_label": "up"}
            fields |= {"arm": "control", "shadow_version": "2", **shadow}
        t.journal.setdefault(i % SHARDS, []).append((at_ms, fields))
        if rng.random() < 0.9:
            delay_ms = int(rng.choice([50, 5_000, 20_000, 45_000]))  # the last one late (horizon 30 s)
            rate = RATES[int(route[3:])] if int(route[3:]) < 10 else 0.5
            t.outcomes.append((at_ms + delay_ms, {
                "id": request_id, "at_ms": "1", "label": "up" if rng.random() < rate else "down",
                "pnl": f"{10 * rate + rng.standard_t(3):.4f}"}))
        if i % 97 == 0:
            t.outcomes += [(at_ms + 50_000, {"id": request_id, "at_ms": "1", "label": "down"}),  # a repeat
                           (at_ms + 50_001, {"id": "x", "at_ms": "1", "correct": "7"})]  # malformed
    t.outcomes.sort(key=lambda o: o[0])
    return t


EXACT = ("exposures", "errors", "units", "matured", "arrived", "late", "hit_sum", "hit_n", "pnl_n")


def assert_same_summary(live, full) -> None:
    """Counts exactly; sums of P&L and covariates up to rounding (they are added in another grouping)."""
    assert live.now_s == full.now_s
    for name in EXACT:
        a, b = getattr(live, name), getattr(full, name)
        assert a.shape == b.shape and np.array_equal(a, b), name
    for name in ("pnl_sum", "pnl_sq"):
        np.testing.assert_allclose(getattr(live, name), getattr(full, name), rtol=1e-12, atol=1e-9,
                                   err_msg=name)
    for name in ("pnl_bounds", "latency_n", "latency_above", "latency_windows"):
        assert getattr(live, name) == getattr(full, name), name
    assert live.pnl_sd == full.pnl_sd or math.isnan(live.pnl_sd) and math.isnan(full.pnl_sd)
    assert live.latency_margin_ms_sum == pytest.approx(full.latency_margin_ms_sum)
    for a, b in ((live.hit_covariate, full.hit_covariate), (live.pnl_covariate, full.pnl_covariate)):
        assert (a is None) == (b is None)
        if a is not None:
            assert np.array_equal(a.n, b.n)
            for name in ("x", "y", "xy", "xx"):
                np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-9)


def close(a, b) -> bool:
    """Equal; floats to 1e-9 (NaN equal to NaN)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def check(r, e, reader: runner.Reader, now_s: float, history: list[dict]) -> None:
    """The kept summary equals a full read's of the reader's rows and a fresh reader's, and so do the
    decisions."""
    live = reader.summary(now_s)
    assert_same_summary(live, summarize(e, reader.observations(), now_s))
    fresh = runner.Reader(e)
    fresh.update(r)
    full = summarize(e, fresh.observations(), now_s)
    assert_same_summary(live, full)
    a, b = analysis.decide(e, live, history).to_dict(), analysis.decide(e, full, history).to_dict()
    a.pop("at"), b.pop("at")  # the wall clock of each call
    assert close(a, b)
    history.append(a)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("design", [{}, {"unit": "request_id"}, {"mode": "shadow"},
                                    {"mode": "shadow", "unit": "request_id"}])
def test_the_kept_summary_equals_a_full_reads_at_every_analysis(r, make_experiment, design):
    e = make_experiment(**design)
    rng = np.random.default_rng(7)
    start_ms = int(e.created_at * 1000) + 1000
    t = traffic(e, rng, start_ms, 2400)
    reader, history = runner.Reader(e), []
    for k in range(1, 19):
        now_s = e.created_at + 1 + 7 * k
        if k == 3:  # the pre-period arrives after the first analyses: every row's covariate changes
            save_pre_period(r, e)
        # Each stream is read up to 3 s past the clock, each to its own point (as reads during traffic do).
        cuts = {stream: int(now_s * 1000) + int(rng.integers(0, 3000)) for stream in STREAMS}
        t.write_until(r, e, cuts)
        reader.update(r)
        check(r, e, reader, now_s, history)
    assert reader.rebuilds == 1, "started afresh once: when the pre-period arrived, never for the traffic"
    s = reader.summary(e.created_at + 1 + 7 * 18)
    assert s.late.sum() > 0 and s.pnl_bounds is not None and s.hit_covariate is not None
    assert reader.read.outcomes_duplicate > 0 and reader.read.outcomes_malformed > 0


def test_rows_or_outcomes_among_those_counted_start_the_summary_afresh(r, make_experiment):
    """Entries stamped before the last analysis's clock but read after it (clocks that disagree), and a
    clock that goes back: the kept summary starts afresh and stays equal; a late outcome does not."""
    e = make_experiment(unit="request_id")
    save_pre_period(r, e)
    rng = np.random.default_rng(3)
    start_ms = int(e.created_at * 1000) + 1000
    t = traffic(e, rng, start_ms, 900, step_ms=200)
    for shard in t.journal:  # shard 2 stays empty until the skewed entry below
        t.journal[shard] = [entry for entry in t.journal[shard] if shard != 2]
    reader, history = runner.Reader(e), []
    now_s = start_ms / 1000 + 55
    t.write_until(r, e, dict.fromkeys(STREAMS, int(now_s * 1000) - 5000))
    reader.update(r)
    check(r, e, reader, now_s, history)

    skewed = {"id": "skewed", "arm": e.arm("SYM1", "skewed"), "route": "SYM1", "latency_ms": "1.0",
              "label": "up"}
    r.xadd(keys.experiment_journal(MODEL, e.id, 2), skewed, id=f"{int(now_s * 1000) - 20_000}-*")
    reader.update(r)
    check(r, e, reader, now_s + 1, history)
    assert reader.rebuilds == 1, "a row earlier than rows already exposed"

    # An outcome stamped before the last clock (now_s + 1), within the horizon of a row already matured
    # then (t <= now_s + 1 - horizon).
    answered = {o["id"] for _, o in t.outcomes[:t.written["outcomes"]]}
    low_ms, high_ms = int(now_s * 1000) - 31_000, int(now_s * 1000) - 29_000
    matured = [f["id"] for at_ms, f in t.journal[0]
               if low_ms <= at_ms <= high_ms and "error" not in f and f["id"] not in answered][0]
    r.xadd(keys.outcomes_stream(MODEL), {"id": matured, "at_ms": "1", "label": "up"},
           id=f"{int(now_s * 1000) - 1000}-*")
    reader.update(r)
    check(r, e, reader, now_s + 2, history)
    assert reader.rebuilds == 2, "an outcome within the horizon of a row already matured"

    late = [f["id"] for _, f in t.journal[1] if f["id"] not in answered and "error" not in f][0]
    r.xadd(keys.outcomes_stream(MODEL), {"id": late, "at_ms": "1", "label": "up"},
           id=f"{int(now_s * 1000)}-*")
    before = int(reader.summary(now_s + 2).late.sum())
    reader.update(r)
    check(r, e, reader, now_s + 3, history)
    assert reader.rebuilds == 2 and int(reader.summary(now_s + 3).late.sum()) == before + 1, \
        "a late outcome of a matured row is counted as late, without starting afresh"

    check(r, e, reader, now_s + 1.5, history)  # the clock went back
    assert reader.rebuilds == 3


def test_an_analysis_processes_the_rows_that_arrived_and_matured_not_every_row(r, registry, make_experiment):
    e = make_experiment()
    save_pre_period(r, e)
    rng = np.random.default_rng(5)
    start_ms = int(e.created_at * 1000) + 1000
    per_minute = 3 * 60_000 // 150  # rows a minute (three every 150 ms)
    t = traffic(e, rng, start_ms, 30 * per_minute)
    reader = runner.Reader(e)
    t.write_until(r, e, dict.fromkeys(STREAMS, start_ms + 25 * 60_000))
    reader.update(r)
    reader.summary(start_ms / 1000 + 25 * 60)
    assert reader.live is not None
    everything = reader.live.rows_processed
    assert everything >= 25 * per_minute

    for minute in range(26, 30):
        t.write_until(r, e, dict.fromkeys(STREAMS, start_ms + minute * 60_000))
        reader.update(r)
        before = reader.live.rows_processed
        s = reader.summary(start_ms / 1000 + minute * 60)
        # Each row is read when it is exposed, when it matures and in its latency minute, and again when a
        # late outcome arrives for it: a minute's rows about three times, whatever the experiment's age.
        assert reader.live.rows_processed - before <= 3.5 * per_minute < everything / 20
        assert_same_summary(s, summarize(e, reader.observations(), start_ms / 1000 + minute * 60))
    assert reader.rebuilds == 0


def test_watch_decides_on_the_kept_summary(r, registry, make_experiment, monkeypatch):
    """``run_analysis`` with kept readers advances the same summary; without, it reads everything.
    The traffic was an hour ago: the analyses' clock is set to follow it."""
    e = make_experiment()
    rng = np.random.default_rng(9)
    start_ms = int(e.created_at * 1000) + 1000
    t = traffic(e, rng, start_ms, 1800)
    readers: dict[str, runner.Reader] = {}
    decisions = []
    for minute in range(1, 4):
        now_ms = start_ms + minute * 60_000
        monkeypatch.setattr(runner, "redis_now_s", lambda client, now_s=now_ms / 1000: now_s)
        t.write_until(r, e, dict.fromkeys(STREAMS, now_ms + 1000))
        decisions.append(runner.run_analysis(r, registry, MODEL, readers=readers))
        if minute == 1:
            live = readers[e.id].live
            assert live is not None
    assert readers[e.id].live is live and readers[e.id].rebuilds == 0
    full = runner.run_analysis(r, registry, MODEL)
    kept = decisions[-1]
    assert kept.exposures == full.exposures and kept.units == full.units and sum(kept.exposures) > 1000
    assert (kept.decision, kept.look, kept.reason) == (full.decision, full.look, full.reason)
