"""Live covariates: ``experiment create`` stores each route's pre-period (the previous experiment's journal
joined with its outcomes) in one bounded hash, the analysis attaches it to every row by route, ``status``
says what variance reduction does, ``--no-cuped`` turns it off, and malformed stored values never crash."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MODEL

from experiments import covariates, runner
from experiments.store import ExperimentStore
from protocol import keys
from streamserve.cli import main

RATES = np.linspace(0.3, 0.8, 10)  # the pre-period hit rates of SYM0..SYM9
HOUR_MS = 3_600_000


def journal(r, e, at_ms: int, rows: list[tuple[str, str, str]], *, shard: int = 0) -> None:
    """Journal entries as a worker writes them, one a second from ``at_ms``: (request id, route, label)."""
    pipe = r.pipeline(transaction=False)
    for i, (request_id, route, label) in enumerate(rows):
        arm = e.arm(route, request_id)
        version = e.control_version if arm == "control" else e.treatment_version
        entry = {"id": request_id, "arm": arm, "version": str(version), "route": route, "latency_ms": "1.000",
                 "label": label}
        pipe.xadd(keys.experiment_journal(MODEL, e.id, shard), entry, id=f"{at_ms + 1000 * i}-0")
    pipe.execute()


def outcomes(r, at_ms: int, rows: list[tuple[str, dict[str, str]]]) -> None:
    """Outcomes 5 s after each request of :func:`journal` (same order)."""
    pipe = r.pipeline(transaction=False)
    for i, (request_id, fields) in enumerate(rows):
        pipe.xadd(keys.outcomes_stream(MODEL), {"id": request_id, "at_ms": "1", **fields},
                  id=f"{at_ms + 1000 * i + 5000}-0")
    pipe.execute()


def pre_period(r, registry, make_experiment, *, symbols: int = 10, per_symbol: int = 100):
    """A stopped experiment whose requests (3 h ago) got outcomes: SYM k right RATES[k] of the time."""
    previous = make_experiment()
    ExperimentStore(r, registry).set_status(MODEL, "stopped")
    rng = np.random.default_rng(2)
    rows, found = [], []
    for i in range(symbols * per_symbol):
        k = i % symbols
        rate = RATES[k % len(RATES)]
        rows.append((f"p{i}", f"SYM{k}", "up"))
        found.append((f"p{i}", {"correct": "1" if rng.random() < rate else "0", "pnl": f"{10 * rate:.3f}"}))
    start_ms = now_ms(r) - 3 * HOUR_MS
    journal(r, previous, start_ms, rows)
    outcomes(r, start_ms, found)
    return previous


def now_ms(r) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def create(settings, *options: str) -> int:
    return main(["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir),
                 "experiment", "create", MODEL, "--control", "1", "--treatment", "2", "--share", "0.5",
                 "--force", *options])


def status(settings, capsys) -> str:
    capsys.readouterr()
    assert main(["--redis-url", settings.redis_url, "experiment", "status", MODEL]) == 0
    return capsys.readouterr().out


def current(r, registry):
    """The experiment just created, moved an hour into the past (its outcomes are read from then)."""
    e = ExperimentStore(r, registry).get(MODEL)
    r.hset(keys.experiment_hash(MODEL), "created_at", repr(e.created_at - 3600))
    return ExperimentStore(r, registry).get(MODEL)


def traffic(r, e, n: int = 600) -> list[str]:
    """Answered requests 50 minutes ago (matured) on SYM0..SYM9 and NEW (no pre-period), with outcomes."""
    rng = np.random.default_rng(5)
    routes = [f"SYM{i % 10}" if i % 11 else "NEW" for i in range(n)]
    start_ms = now_ms(r) - 50 * 60_000
    journal(r, e, start_ms, [(f"q{i}", route, "up") for i, route in enumerate(routes)])
    rates = {f"SYM{k}": RATES[k] for k in range(10)} | {"NEW": 0.5}
    outcomes(r, start_ms, [(f"q{i}", {"correct": "1" if rng.random() < rates[route] else "0"})
                           for i, route in enumerate(routes)])
    return routes


def test_create_stores_the_pre_period_and_the_analysis_attaches_it_by_route(r, settings, registry,
                                                                            make_experiment, capsys):
    pre_period(r, registry, make_experiment)
    assert create(settings) == 0
    assert "variance reduction (CUPED): on: 10 routes' pre-period from experiment" in capsys.readouterr().out
    e = current(r, registry)
    stored = r.hgetall(keys.experiment_covariates(MODEL, e.id))
    assert len(stored) == 11 and b"about" in stored
    sym9 = covariates.RouteStats.from_field(stored[b"route:SYM9"].decode())
    assert sym9 is not None and sym9.hit_n == 100 and abs(sym9.hit_rate - 0.8) < 0.15

    routes = traffic(r, e)
    obs, _ = runner.observations(r, e)
    by_route = {}
    for name, x in zip(routes, obs.covariate_hit, strict=True):  # one shard: rows in journal order
        by_route.setdefault(name, set()).add(None if np.isnan(x) else round(float(x), 12))
    assert by_route["NEW"] == {None}, "a route the pre-period never saw has no covariate"
    values = [by_route[f"SYM{k}"] for k in range(10)]
    assert all(len(v) == 1 and None not in v for v in values), "one covariate per route"
    ordered = [next(iter(v)) for v in values]
    assert np.corrcoef(ordered, RATES)[0, 1] > 0.9, "the covariate follows each route's pre-period hit rate"
    assert not np.isnan(obs.covariate_pnl).all()

    out = status(settings, capsys)
    assert "variance reduction (CUPED): hit rate θ" in out and "of outcomes with a covariate" in out


def test_the_stored_routes_are_capped_at_the_busiest(r, settings, registry, make_experiment, monkeypatch):
    pre_period(r, registry, make_experiment, symbols=30, per_symbol=20)
    monkeypatch.setattr(covariates, "MAX_ROUTES", 5)
    assert create(settings) == 0
    e = ExperimentStore(r, registry).get(MODEL)
    assert r.hlen(keys.experiment_covariates(MODEL, e.id)) == 5 + 1


def test_creation_reads_the_newest_entries_a_page_at_a_time_up_to_its_bound(r, registry, make_experiment,
                                                                          monkeypatch):
    previous = pre_period(r, registry, make_experiment)  # 1,000 requests, each with an outcome
    monkeypatch.setattr(covariates, "PAGE_ENTRIES", 64)
    monkeypatch.setattr(covariates, "MAX_ENTRIES", 500)
    counts: list[int] = []
    xrevrange = r.xrevrange

    def recorded(name, max="+", min="-", count=None):  # noqa: A002 (redis-py's names)
        counts.append(count)
        return xrevrange(name, max=max, min=min, count=count)

    monkeypatch.setattr(r, "xrevrange", recorded)
    pre = covariates.measure(r, MODEL, previous)
    assert counts and max(counts) <= 64, "never more than a page in one read"
    assert pre.requests == 500 and len(pre.routes) == 10
    assert sum(s.hit_n for s in pre.routes.values()) == 500, "the newest 500 requests, each judged once"


def test_no_cuped_turns_it_off_and_status_says_so(r, settings, registry, make_experiment, capsys):
    pre_period(r, registry, make_experiment)
    assert create(settings, "--no-cuped") == 0
    assert "variance reduction (CUPED): off: turned off at creation (--no-cuped)" in capsys.readouterr().out
    e = current(r, registry)
    assert r.hlen(keys.experiment_covariates(MODEL, e.id)) == 1  # only why
    traffic(r, e)
    obs, _ = runner.observations(r, e)
    assert np.isnan(obs.covariate_hit).all()
    assert "variance reduction (CUPED): off: turned off at creation (--no-cuped)" in status(settings, capsys)


def test_without_a_previous_experiment_or_its_outcomes_it_is_off_and_says_why(r, settings, registry,
                                                                              make_experiment, capsys):
    assert create(settings) == 0
    assert "off: no previous experiment to take a pre-period from" in capsys.readouterr().out
    assert "off: no previous experiment" in status(settings, capsys)

    ExperimentStore(r, registry).set_status(MODEL, "stopped")
    previous = ExperimentStore(r, registry).get(MODEL)
    journal(r, previous, now_ms(r) - HOUR_MS, [(f"p{i}", "SYM1", "up") for i in range(50)])
    assert create(settings) == 0
    assert "off: none of the previous experiment's newest 50 requests" in capsys.readouterr().out


def test_malformed_stored_values_and_entries_do_not_crash(r, settings, registry, make_experiment, capsys):
    previous = pre_period(r, registry, make_experiment)
    # At creation: entries that do not parse are left out.
    r.xadd(keys.experiment_journal(MODEL, previous.id), {"id": "bad id!", "route": "SYM1"})
    bad_outcome = {"id": "p1", "at_ms": "x", "pnl": "nan"}
    r.xadd(keys.outcomes_stream(MODEL), bad_outcome, id=f"{now_ms(r) - 2 * HOUR_MS}-0")
    assert create(settings) == 0
    e = current(r, registry)
    traffic(r, e)
    key = keys.experiment_covariates(MODEL, e.id)
    r.hset(key, mapping={"route:SYM1": "garbage", "route:SYM2": "5 7.0 1 1", "stray": "1 0.5 0 nan",
                         "route:SYM3": "3 0.5 2 1e300"})
    out = status(settings, capsys)
    assert "hit rate θ" in out and "4 malformed stored routes left out" in out
    r.hset(key, "about", "{not json")
    assert "off: the stored covariates are malformed" in status(settings, capsys)
    r.hset(key, mapping={f"route:X{i}": "1 0.5 0 nan" for i in range(covariates.MAX_ROUTES + 1)})
    assert "fields, more than the 10,000 routes creation writes: ignored" in status(settings, capsys)
    r.delete(key)
    assert "off: no pre-period was stored when the experiment was created" in status(settings, capsys)
    obs, _ = runner.observations(r, e)
    assert np.isnan(obs.covariate_hit).all()


@pytest.mark.parametrize("value", ["1 0.5 0 nan", "0 nan 3 -2.5", "12 1.0 12 0.0"])
def test_a_route_value_round_trips(value):
    stats = covariates.RouteStats.from_field(value)
    back = covariates.RouteStats.from_field(stats.to_field()) if stats is not None else None
    assert back is not None and back.to_field() == stats.to_field()


@pytest.mark.parametrize("value", ["", "1 2 3", "1 1.5 0 nan", "-1 0.5 0 nan", "1 0.5 1 inf", "1 nan 0 nan",
                                   "1 0.5 0 " + "9" * 40])
def test_a_malformed_route_value_is_refused(value):
    assert covariates.RouteStats.from_field(value) is None
