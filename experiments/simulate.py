"""Offline simulation: a table of exposures and outcomes, replayed through the live decision rule.

``streamserve experiment simulate TABLE`` reads a CSV or Parquet table into
:class:`experiments.data.Observations` and replays it with
:func:`experiments.replay.replay`, the code path of ``experiment analyze``, so a
quant can audit the rule on their own data before it decides with capital.

Columns (one row per exposure; other columns are ignored):

================= ========= ======================================================
``time``          required  seconds on any clock, or ISO-8601 timestamps (no zone: UTC)
``unit``          required  the randomisation unit (symbol, strategy, or request id)
``arm``           required  ``control``/``treatment`` or 0/1
``correct``       optional  0, 1 or empty (no outcome said)
``pnl``           optional  P&L of the trade, or empty
``latency_ms``    optional  or empty
``error``         optional  0/1, or an error code (any other text counts as an error)
``outcome_time``  optional  when the outcome arrived, on the ``time`` clock; empty or
                            absent: a row with an outcome had it at ``time``
``covariate_hit`` optional  a pre-experiment number that predicts ``correct`` and that
                            the arm cannot change (the symbol's hit rate in a
                            pre-period, the champion's own score of the request), or
                            empty: unknown
``covariate_pnl`` optional  the same for ``pnl`` (the symbol's mean P&L in a pre-period)
================= ========= ======================================================

Every time cell of a table is on one clock: all numbers or all timestamps.

With a covariate known for enough rows the hit-rate and P&L comparisons are
variance-reduced (CUPED, :mod:`experiments.cuped`).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from experiments import data
from experiments.analysis import Decision
from experiments.data import Observations
from experiments.replay import replay
from experiments.store import Experiment

PARQUET_SUFFIXES = (".parquet", ".pq")
MAX_ANALYSES = 100_000  # a typo in --every-s should fail at once, not replay for an hour


def read_table(path: str | Path) -> Observations:
    """The exposures of a CSV or Parquet table (by suffix), sorted by time, read in chunks
    (:func:`experiments.data.read_table`: 10 million rows in under 1 GB).

    ``ValueError`` names the row and column of the first value that does not fit.
    """
    return data.read_table(path)


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


# ---- writing ------------------------------------------------------------------------------

def _table_columns(obs: Observations) -> dict[str, np.ndarray]:
    names = np.array(obs.unit_names, dtype=object)[obs.unit] if obs.unit_names else obs.unit.astype(str)
    columns = {"time": obs.t_s, "unit": names, "arm": np.where(obs.arm == 1, "treatment", "control"),
               "correct": obs.correct, "pnl": obs.pnl, "latency_ms": obs.latency_ms,
               "error": obs.error.astype(np.int8), "outcome_time": obs.outcome_t_s}
    # A covariate column is written only when the observations have one: older readers see no change.
    covariates = {"covariate_hit": obs.covariate_hit, "covariate_pnl": obs.covariate_pnl}
    return columns | {k: np.ascontiguousarray(v) for k, v in covariates.items() if not data.absent(v)}


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
