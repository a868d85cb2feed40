"""The latency guardrail's margin: the larger of an absolute floor and a share of control's p95."""

from __future__ import annotations

import json
from dataclasses import replace

import models
import numpy as np
import pytest
from conftest import MODEL

from experiments import cli as experiment_cli
from experiments import validate
from experiments.data import Observations
from experiments.replay import replay
from experiments.simulate import experiment_for
from experiments.store import Experiment, ExperimentStore, Margins
from protocol import keys
from protocol.errors import RegistryError
from streamserve.cli import main

EXP = Experiment("lat", "m", 1, 2, treatment_share=0.5, unit="request_id", label_horizon_s=10.0, salt="s")
ABSOLUTE_ONLY = Margins(latency_p95_ms=2.0, latency_p95_relative=0.0)  # the guardrail as it was: +2 ms
DEFAULT = Margins()


def world(slow: float, *, median_ms: float = 3.0, seed: int = 0, n: int = 72_000, minutes: int = 120,
          p: tuple[float, float] = (0.55, 0.58)) -> Observations:
    """50/50 by request; the treatment wins +3 pp of hit rate and is ``slow`` times control's latency."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, minutes * 60, n))
    arm = (rng.random(n) < 0.5).astype(int)
    latency = rng.lognormal(np.log(np.where(arm == 1, median_ms * slow, median_ms)), 0.4)
    correct = (rng.random(n) < np.where(arm == 1, p[1], p[0])).astype(float)
    return Observations.build(t_s=t, unit=np.arange(n), arm=arm, error=rng.random(n) < 0.001,
                              latency_ms=latency, outcome_t_s=t + rng.uniform(0, 5, n), correct=correct,
                              start_s=0.0)


def first_decision(obs: Observations, margins: Margins = DEFAULT):
    return replay(replace(EXP, margins=margins), obs, every_s=60.0, stop=True)[-1]


def latency_test(decision) -> dict:
    return next(t for t in decision.tests if t["metric"] == "latency_p95")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_30_percent_slower_winner_at_a_3_ms_median_is_rolled_back_not_promoted(seed):
    obs = world(1.3, seed=seed)
    d = first_decision(obs)
    assert d.decision == "ROLLBACK" and "latency" in d.reason, d.reason
    assert "20% of control's p95" in d.reason
    # The same data under an absolute 2 ms margin alone: the hit-rate win is promoted.
    assert first_decision(obs, ABSOLUTE_ONLY).decision == "PROMOTE"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_5_percent_slower_winner_is_not_flagged(seed):
    d = first_decision(world(1.05, seed=seed))
    latency = latency_test(d)
    assert d.decision == "PROMOTE", d.reason
    assert latency["ci_low"] < 5.0 and latency["ci_high"] < 5.0


def test_at_microsecond_latencies_the_absolute_floor_applies():
    # 50 µs median: 20 % of the p95 is about 20 µs, scheduling jitter; the 0.5 ms floor decides.
    obs = world(1.3, median_ms=0.05)
    assert first_decision(obs).decision == "PROMOTE"
    relative_only = first_decision(obs, Margins(latency_p95_ms=0.0))
    assert relative_only.decision == "ROLLBACK" and "latency" in relative_only.reason


def test_at_high_latencies_the_relative_margin_applies():
    # 40 ms median: a 0.1 ms floor alone would flag a +5 % treatment; 20 % of the p95 does not.
    obs = world(1.05, median_ms=40.0)
    assert first_decision(obs, Margins(latency_p95_ms=0.1)).decision == "PROMOTE"
    assert first_decision(obs, Margins(latency_p95_ms=0.1, latency_p95_relative=0.0)).decision == "ROLLBACK"


def test_the_margin_is_the_larger_of_the_two():
    m = Margins()
    assert (m.latency_p95_ms, m.latency_p95_relative) == (0.5, 0.2)
    assert m.latency_margin_ms(1.0) == 0.5 and m.latency_margin_ms(10.0) == pytest.approx(2.0)
    assert m.latency_text() == "max(0.5 ms, 20% of control's p95)"


def test_analyze_lines_name_the_margin_and_its_mean_in_ms():
    d = first_decision(world(1.3))
    line = experiment_cli._test_line(latency_test(d))
    assert "max(0.5 ms, 20% of control's p95) = 1.1" in line and "ms on average" in line


def test_a_bad_relative_margin_is_refused():
    for value in (-0.1, float("nan"), 20.0):  # 20.0: a percentage typed as a fraction
        with pytest.raises(RegistryError, match="latency_p95_relative|margins must be finite"):
            experiment_for(world(1.0, n=200), margins=Margins(latency_p95_relative=value))


def test_an_experiment_stored_without_the_field_loads_with_the_default(r, registry, production):
    old = Experiment("old1", MODEL, 1, 2, salt="s", margins=Margins(latency_p95_ms=2.0)).to_hash()
    margins = json.loads(old["margins"])
    del margins["latency_p95_relative"]
    r.hset(keys.experiment_hash(MODEL), mapping={**old, "margins": json.dumps(margins)})
    e = ExperimentStore(r, registry).get(MODEL)
    assert e is not None and e.margins == Margins(latency_p95_ms=2.0, latency_p95_relative=0.2)


def test_create_stores_the_relative_margin_and_status_shows_it(r, settings, registry, production, tmp_path,
                                                                capsys):
    registry.register(MODEL, models.linear_softmax(tmp_path / "v2.onnx", seed=2), input_spec=models.SPEC,
                      output_names=["probs"], labels=models.LABELS)
    base = ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir)]
    assert main([*base, "experiment", "create", MODEL, "--control", "1", "--treatment", "2",
                 "--margin-latency-relative", "0.3", "--margin-latency-ms", "1"]) == 0
    e = ExperimentStore(r, registry).get(MODEL)
    assert e is not None and e.margins == Margins(latency_p95_ms=1.0, latency_p95_relative=0.3)
    assert "latency margin max(1 ms, 30% of control's p95)" in capsys.readouterr().out
    assert main([*base, "experiment", "status", MODEL]) == 0
    assert "latency margin max(1 ms, 30% of control's p95)" in capsys.readouterr().out.splitlines()[0]


def test_create_refuses_a_bad_relative_margin_without_a_traceback(r, settings, registry, production, tmp_path,
                                                                  capsys):
    registry.register(MODEL, models.linear_softmax(tmp_path / "v2.onnx", seed=2), input_spec=models.SPEC,
                      output_names=["probs"], labels=models.LABELS)
    base = ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir)]
    assert main([*base, "experiment", "create", MODEL, "--control", "1", "--treatment", "2",
                 "--margin-latency-relative", "20"]) == 2
    err = capsys.readouterr().err
    assert "latency_p95_relative must be at most 10" in err and "Traceback" not in err


def test_validate_stats_replays_the_relative_latency_and_trading_day_scenarios():
    # A seeded handful of `make validate-stats`' new scenarios through their own entry point.
    slow = next(s for s in validate.SCENARIOS if s.name.endswith("latency +30 %"))
    assert [validate.run_one((slow, seed))[0] for seed in range(4)] == ["ROLLBACK"] * 4
    losing = next(s for s in validate.TRAFFIC_SCENARIOS if s.name.startswith("+3 pp, P&L -0.05 sd at 430"))
    decision, info_fraction, minute = validate.run_one((losing, 1))
    assert decision != "PROMOTE" and info_fraction > 0 and 0 < minute <= 390
