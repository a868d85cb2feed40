"""`experiment simulate`: tables in, the live decision rule replayed, the report drawn from its records."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import models
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MODEL

from experiments import cli as experiment_cli
from experiments import report
from experiments.data import Observations
from experiments.replay import replay
from experiments.simulate import experiment_for, read_table, simulate, write_table
from experiments.store import ExperimentStore, Margins
from streamserve.cli import main

COLUMNS = ("t_s", "arm", "error", "latency_ms", "outcome_t_s", "correct", "pnl")
START_S = 1_700_000_000.0
# Small and decisive: 100 symbols, a fifth of them treated, +25 pp hit rate; wide latency and error margins
# because 30 minutes of a few requests a second cannot show those within production margins.
DESIGN = {"treatment_share": 0.2, "min_effect_pp": 8.0, "planned_looks": 4, "label_horizon_s": 30.0,
          "margins": Margins(latency_p95_ms=50, error_rate_pp=5, pnl_per_trade=0.5)}
DESIGN_ARGS = ["--share", "0.2", "--min-effect-pp", "8", "--looks", "4", "--horizon-s", "30",
               "--margin-latency-ms", "50", "--margin-error-pp", "5", "--margin-pnl", "0.5"]


def exposures(seed: int = 0, minutes: int = 30, units: int = 100, effect: float = 0.25) -> Observations:
    """An experiment by symbol, every fifth symbol treated; 5 % of outcomes say nothing about `correct`."""
    rng = np.random.default_rng(seed)
    n = int(rng.poisson(4 * 60 * minutes))
    t = START_S + np.sort(rng.uniform(0, minutes * 60, n))
    unit = rng.integers(0, units, n)
    arm = (unit % 5 == 0).astype(np.int8)
    correct = (rng.random(n) < 0.5 + effect * arm).astype(float)
    correct[rng.random(n) < 0.05] = np.nan
    return Observations.build(t_s=t, unit=np.char.add("SYM", unit.astype(str)), arm=arm,
                              error=rng.random(n) < 0.002, latency_ms=rng.lognormal(1.0, 0.3, n),
                              outcome_t_s=t + rng.uniform(1, 20, n), correct=correct,
                              pnl=rng.standard_t(3, n) + arm)


@pytest.fixture(scope="module")
def obs() -> Observations:
    return exposures()


@pytest.fixture(scope="module")
def records(obs: Observations) -> list[dict]:
    """Decision records as the audit trail stores them, from the same code path as `analyze`."""
    return [d.to_dict() for d in replay(experiment_for(obs, **DESIGN), obs, every_s=60, stop=False)]


def write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- tables ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["exposures.csv", "exposures.parquet"])
def test_a_table_round_trips(obs, tmp_path, name):
    back = read_table(write_table(tmp_path / name, obs))
    for column in COLUMNS:
        np.testing.assert_array_equal(getattr(back, column), getattr(obs, column), err_msg=column)
    assert [back.unit_names[u] for u in back.unit] == [obs.unit_names[u] for u in obs.unit]
    assert back.start_s == obs.start_s and np.isnan(obs.correct).any() and obs.error.any()


def test_iso_times_with_and_without_a_zone_are_one_clock(tmp_path):
    path = write(tmp_path, "time,unit,arm,correct,outcome_time\n"
                           "2024-05-01T12:00:00Z,BTC,control,1,2024-05-01T12:00:45Z\n"
                           "2024-05-01T14:00:30+02:00,ETH,treatment,0,\n"  # 12:00:30 UTC
                           "2024-05-01 12:01:00,BTC,control,,\n")  # no zone: UTC
    obs = read_table(path)
    noon = 1714564800.0
    np.testing.assert_array_equal(obs.t_s, [noon, noon + 30, noon + 60])
    # an outcome without its arrival time was known at once; a row that says nothing has none
    np.testing.assert_array_equal(obs.outcome_t_s, [noon + 45, noon + 30, np.nan])
    assert list(obs.arm) == [0, 1, 0] and obs.unit_names == ("BTC", "ETH")


def test_parquet_typed_columns(tmp_path):
    stamps = np.array(["2024-05-01T12:00:00", "2024-05-01T12:00:02"], dtype="datetime64[ms]")
    table = pa.table({"time": pa.array(stamps, pa.timestamp("ms", tz="UTC")), "unit": [7, 1234567890123],
                      "arm": [0, 1], "error": [False, True], "correct": pa.array([1, None], pa.int8()),
                      "latency_ms": [3.5, None], "extra": ["ignored", "too"]})
    pq.write_table(table, tmp_path / "t.parquet")
    obs = read_table(tmp_path / "t.parquet")
    np.testing.assert_array_equal(obs.t_s, [1714564800.0, 1714564802.0])
    assert obs.unit_names == ("1234567890123", "7") and list(obs.unit) == [1, 0]  # ids renumbered densely
    np.testing.assert_array_equal(obs.correct, [1, np.nan])
    np.testing.assert_array_equal(obs.latency_ms, [3.5, np.nan])
    assert list(obs.error) == [False, True]


def test_optional_columns_may_be_absent_and_error_codes_count(tmp_path):
    obs = read_table(write(tmp_path, "unit,time,arm\nBTC,1,0\nETH,2,1\n"))
    assert not obs.error.any() and np.isnan(obs.latency_ms).all() and np.isnan(obs.outcome_t_s).all()
    obs = read_table(write(tmp_path, "time,unit,arm,error,pnl\n1,a,control,DEADLINE_EXCEEDED,\n2,a,control,0,"
                                     "1.5\n3,a,control,,\n4,a,control,1,\n5,a,control,false,-2\n"))
    assert list(obs.error) == [True, False, False, True, False]
    np.testing.assert_array_equal(obs.outcome_t_s, [np.nan, 2, np.nan, np.nan, 5])


HEADER = "time,unit,arm,correct,pnl,latency_ms,outcome_time\n"


@pytest.mark.parametrize(("text", "message"), [
    (HEADER + "1,a,control,1,0.5,3,2\nyesterday,a,control,1,0.5,3,2\n", "line 3, column 'time': 'yesterday'"),
    (HEADER + "1,a,control,1,0.5,3,2\n,a,control,1,0.5,3,2\n", "line 3, column 'time': '' is empty"),
    (HEADER + "1,a,both,1,0.5,3,2\n", "line 2, column 'arm': 'both' must be control/treatment or 0/1"),
    (HEADER + "1,,control,1,0.5,3,2\n", "line 2, column 'unit'"),
    (HEADER + "1,a,control,2,0.5,3,2\n", "line 2, column 'correct': '2' must be 0, 1 or empty"),
    (HEADER + "1,a,control,1,lots,3,2\n", "line 2, column 'pnl': 'lots' is not a number"),
    (HEADER + "1,a,control,1,inf,3,2\n", "line 2, column 'pnl': 'inf' is not a finite number"),
    (HEADER + "1,a,control,1,0.5,-3,2\n", "line 2, column 'latency_ms': '-3' is not a finite number >= 0"),
    (HEADER + "10,a,control,1,0.5,3,4\n", "line 2, column 'outcome_time': the outcome arrived 6 s before"),
    (HEADER + "1,a,control,1,0.5,3,2024-05-01T12:00:00Z\n", "line 2, column 'outcome_time'.*another clock"),
    (HEADER + "1,a,control,1,0.5,3\n", "line 2: 6 fields, the header has 7"),
    ("time,arm\n1,control\n", "no column 'unit'"),
    ("time,unit,arm\n", "no rows"),
])
def test_bad_rows_are_refused_naming_row_and_column(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        read_table(write(tmp_path, text))


def test_parquet_rows_are_named_by_number(tmp_path):
    table = pa.table({"time": [1.0, 2.0], "unit": ["a", "b"], "arm": ["control", "A"]})
    pq.write_table(table, tmp_path / "t.pq")
    with pytest.raises(ValueError, match="t.pq, row 2, column 'arm'"):
        read_table(tmp_path / "t.pq")


# ---- the simulation ---------------------------------------------------------------------------

def test_simulate_stops_at_the_first_decision_unless_asked_to_go_on(obs):
    e = experiment_for(obs, **DESIGN)
    stopped = simulate(e, obs, 60)
    assert [d.decision for d in stopped[:-1]] == ["CONTINUE"] * (len(stopped) - 1)
    assert stopped[-1].decision == "PROMOTE"
    decisions = simulate(e, obs, 60, continue_after_decision=True)
    expected = replay(e, obs, every_s=60, stop=False)
    def seen(ds: list) -> list[tuple]:
        return [(d.decision, d.reason, d.now_s, d.look) for d in ds]

    assert seen(decisions) == seen(expected)
    first = next(i for i, d in enumerate(decisions) if d.decision != "CONTINUE")
    assert decisions[first].decision == "PROMOTE" and first == len(stopped) - 1
    assert first < len(decisions) - 10
    assert {d.decision for d in decisions[first:]} == {"PROMOTE"}  # the decision stands
    assert len(decisions) == math.floor((obs.t_s[-1] - obs.start_s + e.label_horizon_s) / 60)


def test_simulate_refuses_a_bad_interval(obs):
    e = experiment_for(obs, **DESIGN)
    for every_s in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="positive number of seconds"):
            simulate(e, obs, every_s)
    with pytest.raises(ValueError, match="analyse less often"):
        simulate(e, obs, 0.001)


# ---- the command --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def table(obs, tmp_path_factory) -> Path:
    return write_table(tmp_path_factory.mktemp("table") / "exposures.csv", obs)


def test_simulate_prints_a_decision_per_analysis_and_marks_the_first(obs, table, capsys):
    assert main(["experiment", "simulate", str(table), *DESIGN_ARGS]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = simulate(experiment_for(obs, **DESIGN), obs, 60)
    rows = [line for line in lines if line[2:10].strip().replace(".", "").isdigit()]
    for row, d in zip(rows, expected, strict=True):
        assert f"  {d.decision:<9} hit_rate " in row and row.endswith(d.reason), row
    first = next(i for i, d in enumerate(expected) if d.decision != "CONTINUE")
    assert [i for i, row in enumerate(rows) if row.startswith("->")] == [first]
    assert "hit_rate" in rows[first] and " pp " in rows[first]
    assert lines[-1].startswith(f"-> the first decision other than CONTINUE: minute {(first + 1):.1f}")


def test_simulate_json_is_one_strict_record_per_analysis(obs, table, capsys):
    assert main(["experiment", "simulate", str(table), "--json", *DESIGN_ARGS]) == 0
    lines = capsys.readouterr().out.splitlines()

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    records = [json.loads(line, parse_constant=refuse) for line in lines]
    expected = simulate(experiment_for(obs, **DESIGN), obs, 60)
    assert [r["decision"] for r in records] == [d.decision for d in expected]
    assert {"metric", "role", "units", "threshold"} <= set(records[-1]["tests"][0])


def test_simulate_writes_the_png(table, tmp_path, capsys):
    png = tmp_path / "sim.png"
    assert main(["experiment", "simulate", str(table), "--png", str(png), *DESIGN_ARGS]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    data = png.read_bytes()
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    assert width >= 1000 and height >= 7 * 250  # seven panels: primary, z, three guardrails, arrival, split


def test_simulate_options_reach_the_experiment(table, monkeypatch, capsys):
    from experiments import simulate as simulate_module

    seen = []
    monkeypatch.setattr(simulate_module, "simulate",
                        lambda e, obs, every_s, **_: seen.append((e, every_s)) or [])
    assert main(["experiment", "simulate", str(table), "--share", "0.3", "--unit", "request_id",
                 "--mode", "shadow", "--primary", "pnl", "--min-effect-pnl", "0.4", "--min-effect-pp", "3",
                 "--horizon-s", "120", "--looks", "12", "--min-units", "9", "--margin-latency-ms", "4",
                 "--margin-error-pp", "0.2", "--margin-accuracy-pp", "6", "--margin-pnl", "0.1",
                 "--every-s", "30"]) == 0
    (e, every_s), = seen
    assert (e.treatment_share, e.unit, e.mode, e.primary, e.min_effect_pnl, e.min_effect_pp) == \
        (0.3, "request_id", "shadow", "pnl", 0.4, 3.0)
    assert (e.label_horizon_s, e.planned_looks, e.min_units_per_arm, every_s) == (120.0, 12, 9, 30.0)
    assert e.margins == Margins(4.0, 0.2, 6.0, 0.1) and e.created_at == read_table(table).start_s


def test_simulate_refuses_a_bad_design_or_table(table, tmp_path, capsys):
    assert main(["experiment", "simulate", str(table), "--share", "1.5"]) == 2
    assert "treatment_share must be in (0, 1)" in capsys.readouterr().err
    assert main(["experiment", "simulate", str(table), "--primary", "pnl"]) == 2  # no P&L effect to power for
    assert "min_effect_pnl" in capsys.readouterr().err
    bad = write(tmp_path, "time,unit,arm\n1,a,both\n")
    assert main(["experiment", "simulate", str(bad)]) == 2
    assert "t.csv, line 2, column 'arm'" in capsys.readouterr().err
    assert main(["experiment", "simulate", str(tmp_path / "absent.csv")]) == 2
    assert "absent.csv" in capsys.readouterr().err


def test_create_takes_the_design_options(r, settings, registry, production, tmp_path, capsys):
    registry.register(MODEL, models.linear_softmax(tmp_path / "v2.onnx", seed=2), input_spec=models.SPEC,
                      output_names=["probs"], labels=models.LABELS)
    base = ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir)]
    assert main([*base, "experiment", "create", MODEL, "--control", "1", "--treatment", "2",
                 "--primary", "pnl", "--min-effect-pnl", "0.25", "--horizon-s", "300", "--min-units", "12",
                 "--looks", "20", "--margin-error-pp", "0.3", "--margin-pnl", "0.05",
                 "--margin-accuracy-pp", "4"]) == 0
    e = ExperimentStore(r, registry).get(MODEL)
    assert (e.primary, e.min_effect_pnl, e.label_horizon_s, e.min_units_per_arm, e.planned_looks) == \
        ("pnl", 0.25, 300.0, 12, 20)
    assert e.margins == Margins(error_rate_pp=0.3, accuracy_pp=4.0, pnl_per_trade=0.05)  # default latency
    assert "primary pnl" in capsys.readouterr().out


# ---- the report --------------------------------------------------------------------------

def test_report_panels_show_each_metric_with_units(records, obs):
    panels = report.decision_panels(records, start_s=obs.start_s, treatment_share=0.2)
    titles = [p.title.split(":")[0] for p in panels]
    assert titles == ["hit_rate (primary)", "hit_rate group-sequential test", "error_rate (guardrail)",
                      "latency_p95 (guardrail)", "pnl (guardrail)", "pnl non-inferiority", "arrival (check)",
                      "sample ratio (check)"]
    assert all(p.ylabel.endswith(")") and "()" not in p.ylabel for p in panels), [p.ylabel for p in panels]
    primary, z, srm = panels[0], panels[1], panels[-1]
    assert primary.ylabel == "treatment − control (pp)"
    assert (primary.reference[np.isfinite(primary.reference)] == 0).all()
    np.testing.assert_allclose(primary.minutes, np.arange(1, len(records) + 1))
    tested = [r["boundary_tested"] for r in records]
    assert list(np.isfinite(z.reference)) == tested and any(tested)  # the boundary where it was tested
    assert (srm.reference == 20).all() and 15 < np.nanmean(srm.value) < 25  # realised vs configured share, %


def test_report_plot_and_table_from_records(records, obs, tmp_path, capsys):
    png = tmp_path / "report.png"
    report.plot_decisions(records, png, start_s=obs.start_s, treatment_share=0.2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000
    report.print_decisions(records, obs.start_s)
    out = capsys.readouterr().out
    assert out.count("\n") == len(records) + 2 and "primary effect" in out.splitlines()[0]


def test_report_survives_records_from_before_the_new_analysis(tmp_path, capsys):
    old = [{"look": 1, "decision": "CONTINUE", "reason": "ok", "at": 160.0,
            "tests": [{"test": "two-proportion chi-square", "statistic": 1.0, "p_value": 0.3,
                       "estimate": 0.01, "ci_low": -0.01, "ci_high": 0.03}]},
           {"look": 2, "decision": "PROMOTE", "reason": "crossed", "at": 220.0, "tests": []}]
    report.plot_decisions(old, tmp_path / "old.png", start_s=100.0, treatment_share=0.1)
    report.print_decisions(old, 100.0)
    out = capsys.readouterr().out
    assert (tmp_path / "old.png").stat().st_size > 1000 and "->     2.0" in out


def test_analyze_lines_show_metric_role_interval_units_and_threshold(records):
    lines = [experiment_cli._test_line(t) for t in records[-1]["tests"]]
    primary = next(line for line in lines if line.startswith("primary"))
    assert primary.split()[:2] == ["primary", "hit_rate"] and " pp " in primary and "threshold +0" in primary
    assert "[" in primary and "always-valid" in primary
    latency = next(line for line in lines if line.startswith("guardrail latency_p95"))
    assert "% of treatment requests" in latency and "threshold +5" in latency


def test_a_table_that_never_says_right_or_wrong_is_named_for_a_hit_rate_design(tmp_path, capsys):
    rows = "\n".join(f"{i},u{i},{'treatment' if i % 10 == 0 else 'control'},{i % 7}" for i in range(200))
    table = write(tmp_path, "time,unit,arm,pnl\n" + rows + "\n")
    assert main(["experiment", "simulate", str(table), "--unit", "request_id"]) == 0
    out = capsys.readouterr().out
    assert "no row says whether its prediction was right" in out and "can never decide" in out
    assert main(["experiment", "simulate", str(table), "--unit", "request_id", "--primary", "pnl",
                 "--min-effect-pnl", "1"]) == 0
    assert "no row says" not in capsys.readouterr().out
