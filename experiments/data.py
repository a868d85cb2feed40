"""What an experiment observed: one row per exposure (a request answered by one arm).

The live analysis (``experiments.runner`` reads it from Redis) and the offline
replay (``experiments.simulate`` reads it from a CSV or Parquet table) both build
an :class:`Observations` and pass it through :func:`experiments.analysis.evaluate`,
so the rule a quant audits offline is the rule that promotes in production.

Times are seconds on one clock (Redis entry ids in production). In shadow mode a
request appears twice, once per arm, at the same time and in the same unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from experiments.assignment import CONTROL, TREATMENT

ARMS = (CONTROL, TREATMENT)  # arm code 0 and 1


@dataclass(frozen=True)
class Observations:
    """Columns of equal length, sorted by exposure time ``t_s``.

    ``unit`` is the randomisation unit's code (``unit_names[code]`` names it): the
    route (symbol, strategy) when the experiment assigns by route, the request
    otherwise. ``outcome_t_s`` is when the outcome arrived (NaN: none yet);
    ``correct`` (0/1) and ``pnl`` are NaN when the outcome did not say.
    """

    t_s: np.ndarray
    unit: np.ndarray
    arm: np.ndarray
    error: np.ndarray
    latency_ms: np.ndarray
    outcome_t_s: np.ndarray
    correct: np.ndarray
    pnl: np.ndarray
    start_s: float
    unit_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.t_s)

    @classmethod
    def build(cls, *, t_s: Sequence[float] | np.ndarray, unit: Sequence | np.ndarray,
              arm: Sequence | np.ndarray, error: Sequence | np.ndarray | None = None,
              latency_ms: Sequence | np.ndarray | None = None,
              outcome_t_s: Sequence | np.ndarray | None = None,
              correct: Sequence | np.ndarray | None = None, pnl: Sequence | np.ndarray | None = None,
              start_s: float | None = None) -> Observations:
        """Columns in any order of rows; ``unit`` as names or codes; ``arm`` as names or 0/1.

        Missing optional columns mean: no errors, no latency, no outcome. ``ValueError``
        names the first column that does not fit.
        """
        t = np.asarray(t_s, dtype=np.float64)
        n = len(t)
        if not np.all(np.isfinite(t)):
            raise ValueError("time: every exposure needs a finite time")
        codes, names = _codes(np.asarray(unit), "unit")
        arms = _arms(np.asarray(arm))
        columns = {"error": _column(error, n, bool, False),
                   "latency_ms": _column(latency_ms, n, float, np.nan),
                   "outcome_t_s": _column(outcome_t_s, n, float, np.nan),
                   "correct": _column(correct, n, float, np.nan), "pnl": _column(pnl, n, float, np.nan)}
        for name, values in (("unit", codes), ("arm", arms), *columns.items()):
            if len(values) != n:
                raise ValueError(f"{name}: {len(values)} values for {n} exposures")
        bad = ~np.isnan(columns["correct"]) & ~np.isin(columns["correct"], (0.0, 1.0))
        if bad.any():
            raise ValueError("correct: must be 0, 1 or empty")
        order = np.argsort(t, kind="stable")
        sorted_columns = {k: v[order] for k, v in columns.items()}
        start = float(t.min()) if start_s is None and n else float(start_s or 0.0)
        return cls(t[order], codes[order], arms[order], start_s=start, unit_names=names, **sorted_columns)


def _codes(values: np.ndarray, name: str) -> tuple[np.ndarray, tuple[str, ...]]:
    if values.dtype.kind in "iu":
        if len(values) and values.min() < 0:
            raise ValueError(f"{name}: codes must be >= 0")
        return values.astype(np.int64), ()
    names, codes = np.unique(values.astype(str), return_inverse=True)
    return codes.astype(np.int64), tuple(str(v) for v in names)


def _arms(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "iub":
        codes = values.astype(np.int64)
    else:
        text = values.astype(str)
        codes = np.where(text == TREATMENT, 1, np.where(text == CONTROL, 0, -1))
    if len(codes) and not np.isin(codes, (0, 1)).all():
        raise ValueError(f"arm: must be {CONTROL!r}/{TREATMENT!r} or 0/1")
    return codes.astype(np.int8)


def _column(values: Sequence | np.ndarray | None, n: int, kind: type, missing: float | bool) -> np.ndarray:
    if values is None:
        return np.full(n, missing, dtype=kind)
    return np.asarray(values, dtype=kind)
