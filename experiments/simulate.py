"""Offline simulation: a table of exposures and outcomes, replayed through the live decision rule.

``streamserve experiment simulate TABLE`` reads a CSV or Parquet table into
:class:`experiments.data.Observations` and replays it with
:func:`experiments.replay.replay`, the code path of ``experiment analyze``, so a
quant can audit the rule on their own data before it decides with capital.

Columns (one row per exposure; other columns are ignored):

============== ========= ======================================================
``time``       required  seconds on any clock, or ISO-8601 timestamps (no zone: UTC)
``unit``       required  the randomisation unit (symbol, strategy, or request id)
``arm``        required  ``control``/``treatment`` or 0/1
``correct``    optional  0, 1 or empty (no outcome said)
``pnl``        optional  P&L of the trade, or empty
``latency_ms`` optional  or empty
``error``      optional  0/1, or an error code (any other text counts as an error)
``outcome_time`` optional when the outcome arrived, on the ``time`` clock; empty or
               absent: a row with an outcome had it at ``time``
============== ========= ======================================================

Every time cell of a table is on one clock: all numbers or all timestamps.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from experiments.analysis import Decision
from experiments.data import Observations
from experiments.replay import replay
from experiments.store import Experiment

COLUMNS = ("time", "unit", "arm", "correct", "pnl", "latency_ms", "error", "outcome_time")
REQUIRED = ("time", "unit", "arm")
PARQUET_SUFFIXES = (".parquet", ".pq")
MAX_ANALYSES = 100_000  # a typo in --every-s should fail at once, not replay for an hour
_FALSE = {"", "0", "0.0", "false", "no"}
_ARMS = {"control": 0, "0": 0, "0.0": 0, "treatment": 1, "1": 1, "1.0": 1}
_BITS = {"0": 0.0, "0.0": 0.0, "false": 0.0, "1": 1.0, "1.0": 1.0, "true": 1.0}


@dataclass(frozen=True)
class _Raw:
    """A table's columns as read (object arrays of text, or typed arrays) and how to name a row."""

    columns: dict[str, np.ndarray]
    rows: int
    where: Callable[[int], str]


def read_table(path: str | Path) -> Observations:
    """The exposures of a CSV or Parquet table (by suffix), sorted by time.

    ``ValueError`` names the row and column of the first value that does not fit.
    """
    path = Path(path)
    raw = _read_parquet(path) if path.suffix.lower() in PARQUET_SUFFIXES else _read_csv(path)
    missing = [c for c in REQUIRED if c not in raw.columns]
    if missing:
        raise ValueError(f"{path.name}: no column {', '.join(map(repr, missing))} (it has "
                         f"{', '.join(raw.columns) or 'none of ours'}; needed: {', '.join(REQUIRED)})")
    if raw.rows == 0:
        raise ValueError(f"{path.name}: no rows")
    return _observations(raw)


def simulate(e: Experiment, obs: Observations, every_s: float = 60.0, *,
             continue_after_decision: bool = False) -> list[Decision]:
    """The analyses of ``obs``, one each ``every_s``, up to the first decision other than CONTINUE.

    That is where ``experiment watch --apply`` acts. With ``continue_after_decision``
    the replay goes on until the last outcome is due, so a quant sees the decision
    stand (or turn into ROLLBACK on shown harm) at every later analysis.
    """
    if not (math.isfinite(every_s) and every_s > 0):
        raise ValueError(f"every_s must be a positive number of seconds, not {every_s}")
    span_s = (float(obs.t_s[-1]) - obs.start_s if len(obs) else 0.0) + e.label_horizon_s
    if span_s / every_s > MAX_ANALYSES:
        raise ValueError(f"{span_s / every_s:,.0f} analyses of {span_s:,.0f} s every {every_s:g} s "
                         f"(at most {MAX_ANALYSES:,}): analyse less often")
    return replay(e, obs, every_s=every_s, stop=not continue_after_decision)


def experiment_for(obs: Observations, **design: Any) -> Experiment:
    """An offline experiment over ``obs``, started at its first exposure; ``design`` as ``experiment create``.

    ``RegistryError`` says which option is invalid, exactly as ``create`` would.
    """
    e = Experiment("simulate", "table", 1, 2, created_at=obs.start_s, **design)
    # from_hash is the public door to the store's validation: the same messages as `create`
    return Experiment.from_hash({str(k): str(v) for k, v in e.to_hash().items()})


def write_table(path: str | Path, obs: Observations) -> Path:
    """Write ``obs`` as a table :func:`read_table` reads back (Parquet by suffix, else CSV)."""
    path = Path(path)
    columns = _table_columns(obs)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        _write_parquet(path, columns)
    else:
        _write_csv(path, columns)
    return path


# ---- reading ------------------------------------------------------------------------------

def _read_csv(path: Path) -> _Raw:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        if len(set(header)) != len(header):
            raise ValueError(f"{path.name}: a column name appears twice in the header")
        ours = {name: i for i, name in enumerate(header) if name in COLUMNS}
        cells: dict[str, list[str]] = {name: [] for name in ours}
        lines: list[int] = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # a blank line, e.g. at the end
            if len(row) != len(header):
                raise ValueError(f"{path.name}, line {reader.line_num}: {len(row)} fields, "
                                 f"the header has {len(header)}")
            lines.append(reader.line_num)
            for name, i in ours.items():
                cells[name].append(row[i])
    columns = {name: np.array(values, dtype=object) for name, values in cells.items()}
    return _Raw(columns, len(lines), lambda i: f"{path.name}, line {lines[i]}")


def _read_parquet(path: Path) -> _Raw:
    import pyarrow.parquet as pq  # the `experiments` extra; CSV needs none

    names = [c for c in pq.read_schema(path).names if c in COLUMNS]
    table = pq.read_table(path, columns=names)
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in names}
    return _Raw(columns, table.num_rows, lambda i: f"{path.name}, row {i + 1}")


def _observations(raw: _Raw) -> Observations:
    c, where = raw.columns, raw.where
    clock = _Clock(where)
    t_s = clock.column(c["time"], "time", required=True)
    correct = _bits(c["correct"], where) if "correct" in c else None
    pnl = _numbers(c["pnl"], "pnl", where) if "pnl" in c else None
    arrived_s = clock.column(c["outcome_time"], "outcome_time") if "outcome_time" in c else None
    latency_ms = _numbers(c["latency_ms"], "latency_ms", where, minimum=0.0) if "latency_ms" in c else None
    return Observations.build(t_s=t_s, unit=_units(c["unit"], where), arm=_arms(c["arm"], where),
                              error=_errors(c["error"]) if "error" in c else None, latency_ms=latency_ms,
                              outcome_t_s=_outcome_times(t_s, arrived_s, (correct, pnl), where),
                              correct=correct, pnl=pnl)


def _outcome_times(t_s: np.ndarray, arrived_s: np.ndarray | None, outcomes: tuple[np.ndarray | None, ...],
                   where: Callable[[int], str]) -> np.ndarray:
    """When each outcome arrived; an outcome without an arrival time was known at its request."""
    said = np.zeros(len(t_s), dtype=bool)
    for values in outcomes:
        if values is not None:
            said |= ~np.isnan(values)
    arrived = np.full(len(t_s), np.nan) if arrived_s is None else arrived_s
    arrived = np.where(np.isnan(arrived) & said, t_s, arrived)
    early = np.flatnonzero(arrived < t_s)  # NaN compares False
    if len(early):
        i = int(early[0])
        raise ValueError(f"{where(i)}, column 'outcome_time': the outcome arrived "
                         f"{t_s[i] - arrived[i]:g} s before its request")
    return arrived


def _empty(cell: object) -> bool:
    return cell is None or (isinstance(cell, float) and math.isnan(cell)) or \
        (isinstance(cell, str) and not cell.strip())


def _bad(where: Callable[[int], str], i: int, column: str, cell: object, why: str) -> ValueError:
    return ValueError(f"{where(i)}, column {column!r}: {cell!r} {why}")


class _Clock:
    """Time cells as seconds; the first one fixes the table's clock (numbers or timestamps)."""

    def __init__(self, where: Callable[[int], str]) -> None:
        self.where = where
        self.kind = ""

    def column(self, values: np.ndarray, name: str, *, required: bool = False) -> np.ndarray:
        """Seconds (NaN where empty); ``required``: no cell may be empty."""
        if values.dtype.kind == "M":  # a Parquet timestamp column
            micros = values.astype("datetime64[us]").astype(np.int64)
            seconds = np.where(np.isnat(values), np.nan, micros / 1e6)
            return self._checked(seconds, values, name, "timestamps", required)
        if values.dtype.kind in "iuf":
            return self._checked(values.astype(np.float64), values, name, "numbers", required)
        out = np.full(len(values), np.nan)
        for i, cell in enumerate(values):
            if _empty(cell):
                if required:
                    raise _bad(self.where, i, name, cell, "is empty; every exposure needs a time")
                continue
            out[i] = self._cell(cell, i, name)
        return out

    def _cell(self, cell: object, i: int, name: str) -> float:
        try:
            seconds, kind = float(str(cell).strip()), "numbers"
        except ValueError:
            try:
                stamp = datetime.fromisoformat(str(cell).strip())
            except ValueError:
                raise _bad(self.where, i, name, cell, "is neither seconds nor an ISO-8601 time") from None
            seconds, kind = (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp(), "timestamps"
        if not math.isfinite(seconds):
            raise _bad(self.where, i, name, cell, "is not a finite time")
        self._agree(kind, i, name, cell)
        return seconds

    def _checked(self, seconds: np.ndarray, values: np.ndarray, name: str, kind: str,
                 required: bool) -> np.ndarray:
        bad = np.flatnonzero(~np.isfinite(seconds) if required else np.isinf(seconds))
        if len(bad):
            raise _bad(self.where, int(bad[0]), name, values[bad[0]], "is not a finite time")
        known = np.flatnonzero(~np.isnan(seconds))
        if len(known):
            self._agree(kind, int(known[0]), name, values[known[0]])
        return seconds

    def _agree(self, kind: str, i: int, name: str, cell: object) -> None:
        if self.kind and kind != self.kind:
            raise _bad(self.where, i, name, cell, f"is on another clock: the times before it are {self.kind}")
        self.kind = kind


def _numbers(values: np.ndarray, name: str, where: Callable[[int], str], *,
             minimum: float = -math.inf) -> np.ndarray:
    if values.dtype.kind in "iufb":
        out = values.astype(np.float64)
    else:
        out = np.full(len(values), np.nan)
        for i, cell in enumerate(values):
            if not _empty(cell):
                try:
                    out[i] = float(cell)
                except (TypeError, ValueError):
                    raise _bad(where, i, name, cell, "is not a number") from None
    bad = np.flatnonzero(np.isinf(out) | (out < minimum))
    if len(bad):
        rule = "a finite number" if minimum == -math.inf else f"a finite number >= {minimum:g}"
        raise _bad(where, int(bad[0]), name, values[bad[0]], f"is not {rule}")
    return out


def _bits(values: np.ndarray, where: Callable[[int], str]) -> np.ndarray:
    """``correct``: 1.0, 0.0 or NaN (no outcome said)."""
    if values.dtype.kind in "iufb":
        out = values.astype(np.float64)
    else:
        out = np.array([np.nan if _empty(c) else _BITS.get(str(c).strip().lower(), 2.0) for c in values])
    bad = np.flatnonzero(~np.isnan(out) & (out != 0) & (out != 1))
    if len(bad):
        raise _bad(where, int(bad[0]), "correct", values[bad[0]], "must be 0, 1 or empty")
    return out


def _errors(values: np.ndarray) -> np.ndarray:
    """0/1, or an error code: any text but 0/false/no/empty is an error."""
    if values.dtype.kind in "iufb":
        return np.nan_to_num(values.astype(np.float64)) != 0
    return np.array([not _empty(c) and str(c).strip().lower() not in _FALSE for c in values], dtype=bool)


def _arms(values: np.ndarray, where: Callable[[int], str]) -> np.ndarray:
    text = values.astype(np.int64).astype(str) if values.dtype.kind in "iub" else values
    codes = np.array([_ARMS.get(str(c).strip().lower(), -1) if not _empty(c) else -1 for c in text])
    bad = np.flatnonzero(codes < 0)
    if len(bad):
        raise _bad(where, int(bad[0]), "arm", values[bad[0]], "must be control/treatment or 0/1")
    return codes


def _units(values: np.ndarray, where: Callable[[int], str]) -> np.ndarray:
    """Unit names as text: codes are renumbered densely, however large the ids."""
    if values.dtype.kind in "iu":
        return values.astype(str)
    empty = np.flatnonzero([_empty(c) for c in values])
    if len(empty):
        raise _bad(where, int(empty[0]), "unit", values[empty[0]], "is empty; every exposure has a unit")
    return np.array([str(c).strip() for c in values])



# ---- writing ------------------------------------------------------------------------------

def _table_columns(obs: Observations) -> dict[str, np.ndarray]:
    names = np.array(obs.unit_names, dtype=object)[obs.unit] if obs.unit_names else obs.unit.astype(str)
    return {"time": obs.t_s, "unit": names, "arm": np.where(obs.arm == 1, "treatment", "control"),
            "correct": obs.correct, "pnl": obs.pnl, "latency_ms": obs.latency_ms,
            "error": obs.error.astype(np.int8), "outcome_time": obs.outcome_t_s}


def _text(value: object) -> str:
    """A CSV cell: empty for NaN, exact (repr) for floats."""
    if isinstance(value, float | np.floating):
        return "" if math.isnan(value) else repr(float(value))
    return str(value)


def _write_csv(path: Path, columns: dict[str, np.ndarray]) -> None:
    cells = {name: [_text(v) for v in values] for name, values in columns.items()}
    cells["correct"] = ["" if math.isnan(c) else str(int(c)) for c in columns["correct"]]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(cells)
        writer.writerows(zip(*cells.values(), strict=True))


def _write_parquet(path: Path, columns: dict[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {name: pa.array(values, from_pandas=True) if values.dtype.kind == "f" else pa.array(values)
              for name, values in columns.items()}  # from_pandas: NaN is written as null
    pq.write_table(pa.table(arrays), path)
