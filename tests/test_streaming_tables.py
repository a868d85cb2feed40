"""Tables are streamed a batch at a time into typed columns (the same observations as reading them whole),
and the design's calibrations are cached on disk."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from experiments import calibration_cache, data, simulate
from experiments.data import Observations

COLUMNS = ("t_s", "unit", "arm", "error", "latency_ms", "outcome_t_s", "correct", "pnl")


def day(n: int, *, symbols: int = 300, seed: int = 1) -> Observations:
    """``n`` exposures of Zipf symbols with every optional column, some cells empty."""
    rng = np.random.default_rng(seed)
    shares = 1 / np.arange(1, symbols + 1)
    units = rng.choice(symbols, size=n, p=shares / shares.sum())
    t_s = np.sort(rng.uniform(0, 3600, n))
    correct = np.where(rng.random(n) < 0.9, (rng.random(n) < 0.55).astype(float), np.nan)
    return Observations.build(t_s=t_s, unit=np.array([f"S{u}" for u in units]),
                              arm=(units % 10 == 0).astype(int), correct=correct,
                              pnl=np.where(np.isnan(correct), np.nan, rng.standard_t(3, n)),
                              latency_ms=rng.gamma(3, 1, n), error=rng.random(n) < 0.01,
                              outcome_t_s=np.where(np.isnan(correct), np.nan, t_s + rng.exponential(20, n)))


def same(a: Observations, b: Observations) -> None:
    for name in COLUMNS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.unit_names == b.unit_names and a.start_s == b.start_s


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_a_streamed_table_is_the_table_read_whole(tmp_path, suffix):
    path = simulate.write_table(tmp_path / f"t.{suffix}", day(30_000))
    same(data.read_table(path, batch_rows=4_000), simulate.read_table(path))


def test_timestamps_and_unsorted_rows_read_as_a_whole_read_does(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    stamps = np.array(["2026-01-05T14:30:00", "2026-01-05T14:29:00", "2026-01-05T14:31:30"],
                      dtype="datetime64[us]")
    path = tmp_path / "t.parquet"
    table = {"time": stamps, "unit": ["A", "B", "A"], "arm": [0, 1, 0], "correct": [1.0, None, 0.0]}
    pq.write_table(pa.table(table), path)
    same(data.read_table(path, batch_rows=2), simulate.read_table(path))
    csv = tmp_path / "t.csv"
    csv.write_text("time,unit,arm,correct\n2026-01-05T14:30:00,A,control,true\n2026-01-05T14:29:00,B,treatment,\n"
                   "2026-01-05T14:31:00,B,treatment, 0 \n")
    same(data.read_table(csv), simulate.read_table(csv))


def test_many_units_are_numbered_not_named_with_the_same_partition(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_NAMED_UNITS", 50)
    obs = day(5_000, symbols=2_000)
    path = simulate.write_table(tmp_path / "t.parquet", obs)
    streamed = data.read_table(path, batch_rows=700)
    assert streamed.unit_names == ()
    whole = simulate.read_table(path)
    # The same rows share a unit: the codes are the same partition of the rows.
    pairs = np.unique(np.stack([whole.unit, streamed.unit]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def test_a_streamed_table_costs_its_columns_not_python_objects(tmp_path):
    """About 50 bytes a row (five float columns, the unit code, arm, error) plus one batch; the whole-table
    read holds every cell as an object first."""
    n = 200_000
    path = simulate.write_table(tmp_path / "t.parquet", day(n))
    tracemalloc.start()
    data.read_table(path, batch_rows=10_000)
    streamed = tracemalloc.get_traced_memory()[1] / n
    tracemalloc.stop()
    assert streamed < 80, f"{streamed:.0f} bytes a row"


@pytest.mark.parametrize(("cells", "message"), [
    ("1,S1,sideways", "t.csv, line 2, column 'arm': 'sideways' must be control/treatment or 0/1"),
    ("1,,control", "t.csv, line 2, column 'unit': is empty"),
    (",S1,control", "t.csv, line 2, column 'time'"),
    ("1,S1,control,abc", "t.csv, line 2, column 'pnl': 'abc' is not a number"),
    ("1,S1,control,1\n2,S1,control,-1e999", "t.csv, line 3, column 'pnl'"),
])
def test_a_bad_cell_is_named_by_line_and_column(tmp_path, cells, message):
    path = tmp_path / "t.csv"
    path.write_text(f"time,unit,arm{',pnl' if cells.count(',') > 2 else ''}\n{cells}\n")
    with pytest.raises(ValueError, match=message):
        data.read_table(path)


@pytest.mark.parametrize("text", [
    "time,unit,arm,correct,outcome_time\n2024-05-01T12:00:00Z,BTC,control,1,2024-05-01T12:00:45Z\n"
    "2024-05-01T14:00:30+02:00,ETH,treatment,0,\n2024-05-01 12:01:00,BTC,control,,\n",
    "time,unit,arm,error,pnl\n1,a,control,DEADLINE_EXCEEDED,\n2,a,control,0,1.5\n3,a,control,,\n4,a,control,1,\n",
])
def test_zones_and_error_codes_read_as_a_whole_read_does(tmp_path, text):
    path = tmp_path / "t.csv"
    path.write_text(text)
    same(data.read_table(path, batch_rows=2), simulate.read_table(path))


@pytest.mark.parametrize(("text", "message"), [
    ("time,unit,arm\n1,a,control\n2,a\n", "t.csv, line 3: 2 fields, the header has 3"),
    ("time,unit,arm\n1,a,control\n,a,control\n", "t.csv, line 3, column 'time': '' is empty"),
    ("time,unit,arm,outcome_time\n1,a,control,2024-05-01T12:00:00Z\n",
     "column 'outcome_time'.*another clock"),
    ("time,unit,arm\nyesterday,a,control\n", "line 2, column 'time': 'yesterday' is neither seconds"),
])
def test_malformed_csv_is_named_as_a_whole_read_names_it(tmp_path, text, message):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        data.read_table(path)


def test_missing_columns_and_no_rows_are_refused(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("time,arm\n1,control\n")
    with pytest.raises(ValueError, match="no column 'unit'"):
        data.read_table(path)
    path.write_text("time,unit,arm\n")
    with pytest.raises(ValueError, match="no rows"):
        data.read_table(path)


@pytest.fixture
def cache_at(monkeypatch):
    """Point the calibration cache at a folder for one test (and back to the default after)."""
    def to(directory):
        monkeypatch.setattr(calibration_cache, "_directory", [directory])
    return to


def test_a_calibration_runs_once_then_comes_from_disk(tmp_path, cache_at):
    cache_at(tmp_path)
    calls: list[tuple] = []

    def bounds(looks: int, alpha: float) -> tuple[float, ...]:
        calls.append((looks, alpha))
        return tuple(float(k) * alpha for k in range(looks))

    cached = calibration_cache.disk_cached(bounds)
    assert cached(3, 0.5) == cached(3, 0.5) == (0.0, 0.5, 1.0) and calls == [(3, 0.5)]
    assert cached(4, 0.5) == (0.0, 0.5, 1.0, 1.5) and len(calls) == 2, "other arguments: computed"
    [first, _] = sorted((tmp_path / "calibration").iterdir())
    for garbage in ("not json", json.dumps({"key": "another", "value": [1.0]}), json.dumps([1])):
        for path in (tmp_path / "calibration").iterdir():
            path.write_text(garbage)
        assert cached(3, 0.5) == (0.0, 0.5, 1.0)
    assert len(calls) == 5, "a malformed or foreign file is computed again"
    assert first.exists() and cached(3, 0.5) == (0.0, 0.5, 1.0) and len(calls) == 5, "and rewritten"


def test_an_unwritable_cache_only_costs_the_time(tmp_path, cache_at):
    blocked = tmp_path / "file"
    blocked.write_text("")
    cache_at(blocked)
    calls = []
    cached = calibration_cache.disk_cached(lambda x: calls.append(x) or 2.0 * x)
    assert cached(1.5) == cached(1.5) == 3.0 and len(calls) == 2


def test_the_cache_directory_comes_from_the_settings_the_command_reads(tmp_path, monkeypatch, cache_at):
    """STREAMSERVE_CACHE_DIR is read once, with the other settings, and handed to the cache."""
    from streamserve.cli import main

    cache_at(tmp_path / "before")
    monkeypatch.setenv("STREAMSERVE_CACHE_DIR", str(tmp_path / "cache"))
    table = tmp_path / "t.csv"
    table.write_text("time,unit,arm,correct\n" + "".join(f"{i},u{i},{'treatment' if i % 2 else 'control'},1\n"
                                                          for i in range(50)))
    assert main(["experiment", "simulate", str(table), "--unit", "request_id"]) == 0
    assert calibration_cache.cache_dir() == tmp_path / "cache" / "calibration"
    monkeypatch.delenv("STREAMSERVE_CACHE_DIR")
    assert main(["experiment", "simulate", str(table), "--unit", "request_id"]) == 0
    assert calibration_cache.cache_dir() == Path.home() / ".cache" / "streamserve" / "calibration"
