"""What an experiment observed: one row per exposure (a request answered by one arm).

The live analysis (``experiments.runner`` reads it from Redis) and the offline
replay (``experiments.simulate`` reads it from a CSV or Parquet table) both build
an :class:`Observations`, summarise it with :class:`experiments.summary.Accumulator`
and decide with :func:`experiments.analysis.decide`, so the rule a quant audits
offline is the rule that promotes in production.

Times are seconds on one clock (Redis entry ids in production). In shadow mode a
request appears twice, once per arm, at the same time and in the same unit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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

    ``covariate_hit`` and ``covariate_pnl`` are pre-experiment quantities of the row,
    unaffected by its arm (its symbol's hit rate and mean P&L in a pre-period), which
    the analysis may use to reduce variance (:mod:`experiments.cuped`); NaN: unknown.
    A column nobody gave is a read-only NaN view that costs no memory.
    """

    t_s: np.ndarray
    unit: np.ndarray
    arm: np.ndarray
    error: np.ndarray
    latency_ms: np.ndarray
    outcome_t_s: np.ndarray
    correct: np.ndarray
    pnl: np.ndarray
    covariate_hit: np.ndarray
    covariate_pnl: np.ndarray
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
              covariate_hit: Sequence | np.ndarray | None = None,
              covariate_pnl: Sequence | np.ndarray | None = None,
              start_s: float | None = None) -> Observations:
        """Columns in any order of rows; ``unit`` as names or codes; ``arm`` as names or 0/1.

        Missing optional columns mean: no errors, no latency, no outcome, no covariate.
        ``ValueError`` names the first column that does not fit.
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
                   "correct": _column(correct, n, float, np.nan), "pnl": _column(pnl, n, float, np.nan),
                   "covariate_hit": _covariate(covariate_hit, n, "covariate_hit"),
                   "covariate_pnl": _covariate(covariate_pnl, n, "covariate_pnl")}
        for name, values in (("unit", codes), ("arm", arms), *columns.items()):
            if len(values) != n:
                raise ValueError(f"{name}: {len(values)} values for {n} exposures")
        correct = columns["correct"]
        bad = (correct != 0) & (correct != 1) & ~np.isnan(correct)  # bools only: no copy of the column
        if bad.any():
            raise ValueError("correct: must be 0, 1 or empty")
        start = float(t.min()) if start_s is None and n else float(start_s or 0.0)
        if n < 2 or bool(np.all(t[1:] >= t[:-1])):  # already in time order: no copy of any column
            return cls(t, codes, arms, start_s=start, unit_names=names, **columns)
        order = np.argsort(t, kind="stable")
        # An absent covariate stays a view of one NaN: sorting it would allocate a column of NaN.
        sorted_columns = {k: v if absent(v) else v[order] for k, v in columns.items()}
        return cls(t[order], codes[order], arms[order], start_s=start, unit_names=names, **sorted_columns)


def _codes(values: np.ndarray, name: str) -> tuple[np.ndarray, tuple[str, ...]]:
    if values.dtype.kind in "iu":
        if len(values) and values.min() < 0:
            raise ValueError(f"{name}: codes must be >= 0")
        return values.astype(np.int64, copy=False), ()
    names, codes = np.unique(values.astype(str), return_inverse=True)
    return codes.astype(np.int64), tuple(str(v) for v in names)


def _arms(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "iub":
        codes = values.astype(np.int8, copy=False) if values.dtype.itemsize == 1 else values.astype(np.int64)
    else:
        text = values.astype(str)
        codes = np.where(text == TREATMENT, 1, np.where(text == CONTROL, 0, -1))
    if len(codes) and not np.isin(codes, (0, 1)).all():
        raise ValueError(f"arm: must be {CONTROL!r}/{TREATMENT!r} or 0/1")
    return codes.astype(np.int8, copy=False)


def absent(values: np.ndarray) -> bool:
    """Is ``values`` a column nobody gave (a view of one NaN, as :meth:`Observations.build` makes it)?"""
    return values.strides == (0,) and (len(values) == 0 or bool(np.isnan(values[0])))


def _covariate(values: Sequence | np.ndarray | None, n: int, name: str) -> np.ndarray:
    if values is None:
        return np.broadcast_to(np.float64(np.nan), (n,))
    column = np.asarray(values, dtype=np.float64)
    if np.isinf(column).any():
        raise ValueError(f"{name}: must be a finite number or empty")
    return column


def _column(values: Sequence | np.ndarray | None, n: int, kind: type, missing: float | bool) -> np.ndarray:
    if values is None:
        return np.full(n, missing, dtype=kind)
    return np.asarray(values, dtype=kind)


# ---- tables, streamed ---------------------------------------------------------------------
#
# A table is read a batch at a time (Parquet row groups through ``iter_batches``, CSV blocks through
# pyarrow's streaming reader) into typed columns grown in place, so memory is the columns themselves
# (about 50 bytes a row) plus one batch, never a whole table of Python objects.

TABLE_COLUMNS = ("time", "unit", "arm", "correct", "pnl", "latency_ms", "error", "outcome_time",
                 "covariate_hit", "covariate_pnl")
TABLE_REQUIRED = ("time", "unit", "arm")
PARQUET_SUFFIXES = (".parquet", ".pq")
BATCH_ROWS = 1 << 18
_PARQUET_BUFFER_BYTES = 1 << 20
_RELEASE_EVERY = 8  # batches between handing Arrow's freed buffers back to the system
MAX_NAMED_UNITS = 100_000  # beyond this many units (request ids) they are numbered, not named
_CSV_BLOCK_BYTES = 8 << 20
_FALSE_TEXT = ("", "0", "0.0", "false", "no")
_HASH_PRIME = np.uint64(0x100000001B3)


class _Growing:
    """A numpy column appended batch by batch, grown by doubling (one copy per doubling)."""

    def __init__(self, dtype: type | np.dtype, capacity: int) -> None:
        self.values = np.empty(max(capacity, 1024), dtype=dtype)
        self.n = 0

    def extend(self, batch: np.ndarray) -> None:
        """Append ``batch``."""
        end = self.n + len(batch)
        if end > len(self.values):
            self.values = np.resize(self.values, max(end, 2 * len(self.values)))
        self.values[self.n:end] = batch
        self.n = end

    def array(self) -> np.ndarray:
        """The values so far (a view, no copy)."""
        return self.values[:self.n]


class _Units:
    """Unit cells as dense codes in order of first appearance, named while there are at most
    ``MAX_NAMED_UNITS``; beyond that, as 64-bit hashes of the cells (request ids: numbered, not named)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.codes: _Growing | None = _Growing(np.int64, capacity)
        self.hashes: _Growing | None = None
        self.names: list[str] = []
        self.known = np.empty(0, dtype=np.uint64)  # sorted hashes of the units named so far
        self.known_codes = np.empty(0, dtype=np.int64)  # their codes
        self.hash_of_code = np.empty(0, dtype=np.uint64)

    def extend(self, column: Any, where: Callable[[int], str]) -> None:
        """One batch's unit cells (a pyarrow array)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if column.null_count:
            first = int(pc.index(pc.is_null(column), True).as_py())
            raise ValueError(f"{where(first)}, column 'unit': is empty; every exposure has a unit")
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            column = pc.cast(column, pa.string())
        column = pc.utf8_trim_whitespace(column)
        hashes = _hash_strings(column)
        if self.codes is not None:
            self._name(hashes, column)
        if self.codes is not None:
            self.codes.extend(self.known_codes[np.searchsorted(self.known, hashes)])
        else:
            assert self.hashes is not None
            self.hashes.extend(hashes)

    def _name(self, hashes: np.ndarray, column: Any) -> None:
        unique, first = np.unique(hashes, return_index=True)
        place = np.searchsorted(self.known, unique)
        new = (place == len(self.known)) | (self.known[np.minimum(place, len(self.known) - 1)] != unique) \
            if len(self.known) else np.ones(len(unique), dtype=bool)
        if len(self.names) + int(new.sum()) > MAX_NAMED_UNITS:  # request ids: stop naming, keep hashes
            assert self.codes is not None
            self.hashes = _Growing(np.uint64, self.capacity)
            self.hashes.extend(self.hash_of_code[self.codes.array()])
            self.codes = None
            return
        codes = np.arange(len(self.names), len(self.names) + int(new.sum()), dtype=np.int64)
        self.names += [column[i].as_py() for i in first[new].tolist()]
        self.hash_of_code = np.concatenate([self.hash_of_code, unique[new]])
        known = np.concatenate([self.known, unique[new]])
        known_codes = np.concatenate([self.known_codes, codes])
        order = np.argsort(known, kind="stable")
        self.known, self.known_codes = known[order], known_codes[order]

    def dense(self) -> tuple[np.ndarray, tuple[str, ...]]:
        """Dense codes, numbered by name when named (as :meth:`Observations.build` numbers names)."""
        if self.codes is None:
            assert self.hashes is not None
            _, codes = np.unique(self.hashes.array(), return_inverse=True)
            return codes.astype(np.int64, copy=False), ()
        order = np.argsort(np.array(self.names, dtype=object), kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        codes = self.codes.array()
        return np.take(rank, codes, out=codes), tuple(self.names[i] for i in order)


def _hash_strings(column: Any) -> np.ndarray:
    """A 64-bit polynomial hash of each string of a pyarrow string array, vectorised over its buffers."""
    import pyarrow as pa

    if pa.types.is_large_string(column.type):
        offset_type: type = np.int64
    else:
        offset_type = np.int32
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    _, offsets_buffer, data_buffer = column.buffers()
    window = slice(column.offset, column.offset + len(column) + 1)
    offsets: np.ndarray = np.frombuffer(offsets_buffer, dtype=offset_type)[window].astype(np.int64)
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.empty(0, np.uint8)
    data = data[offsets[0]:offsets[-1]].astype(np.uint64)
    starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
    position = np.arange(len(data)) - np.repeat(starts, lengths)
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(int(lengths.max(initial=0)) + 1, _HASH_PRIME, dtype=np.uint64))
        terms = (data + np.uint64(1)) * powers[position]
        sums = np.zeros(len(lengths), dtype=np.uint64)
        nonempty = lengths > 0
        if len(terms):
            sums[nonempty] = np.add.reduceat(terms, starts[nonempty])
        return sums * _HASH_PRIME + lengths.astype(np.uint64)


def read_table(path: str | Path, *, batch_rows: int = BATCH_ROWS) -> Observations:
    """The exposures of a CSV or Parquet table (by suffix), read a batch at a time.

    Columns as ``experiment simulate`` documents them; numeric or Parquet timestamp times (CSV:
    numbers or ISO-8601 times, as pyarrow reads them). ``ValueError`` names the row and column of
    the first value that does not fit. A table already in time order is never copied whole.
    """
    from pyarrow import ArrowInvalid

    path = Path(path)
    parquet = path.suffix.lower() in PARQUET_SUFFIXES
    batches, rows_hint, names = _parquet_batches(path, batch_rows) if parquet else _csv_batches(path)
    missing = [c for c in TABLE_REQUIRED if c not in names]
    if missing:
        raise ValueError(f"{path.name}: no column {', '.join(map(repr, missing))} (it has "
                         f"{', '.join(names) or 'none of ours'}; needed: {', '.join(TABLE_REQUIRED)})")
    table = _Table(names, rows_hint, path.name, parquet)
    try:
        for i, batch in enumerate(batches):
            table.extend(batch)
            if i % _RELEASE_EVERY == _RELEASE_EVERY - 1:
                _release_arrow_memory()
    except ArrowInvalid as err:  # what pyarrow's reader could not parse: named by its line here
        raise (_csv_shape_error(path) if not parquet else None) or ValueError(f"{path.name}: {err}") from None
    del batches
    _release_arrow_memory()
    return table.observations()


def _csv_shape_error(path: Path) -> ValueError | None:
    """The first line whose number of fields is not the header's (read again, line by line)."""
    import csv

    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        for row in reader:
            if row and len(row) != len(header):
                return ValueError(f"{path.name}, line {reader.line_num}: {len(row)} fields, "
                                  f"the header has {len(header)}")
    return None


def _release_arrow_memory() -> None:
    """Hand the batches' buffers back to the system: Arrow's allocator keeps freed memory for reuse."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _parquet_batches(path: Path, batch_rows: int) -> tuple[Iterator[Any], int, list[str]]:
    import pyarrow.parquet as pq  # the `experiments` extra

    # Without pre-buffering and with a bounded read buffer, memory stays at one batch: the defaults keep
    # every row group's buffers read so far (600 MB more on a 10-million-row table).
    file = pq.ParquetFile(path, pre_buffer=False, buffer_size=_PARQUET_BUFFER_BYTES)
    names = [c for c in file.schema_arrow.names if c in TABLE_COLUMNS]
    return file.iter_batches(batch_size=batch_rows, columns=names), file.metadata.num_rows, names


def _csv_batches(path: Path) -> tuple[Iterator[Any], int, list[str]]:
    import csv as csv_module

    import pyarrow as pa
    from pyarrow import csv

    with path.open(newline="") as f:
        header = [name.strip() for name in next(csv_module.reader(f), [])]
    if len(set(header)) != len(header):
        raise ValueError(f"{path.name}: a column name appears twice in the header")
    names = [c for c in header if c in TABLE_COLUMNS]
    # Text, converted a batch at a time: a cell that is not a number is named by its line.
    text_columns = TABLE_COLUMNS  # every column as text: numbers, times and codes are read here
    types: dict[str, Any] = {name: pa.string() for name in text_columns if name in names}
    try:  # opening reads the first block
        reader = csv.open_csv(path, read_options=csv.ReadOptions(block_size=_CSV_BLOCK_BYTES),
                              convert_options=csv.ConvertOptions(include_columns=names, column_types=types,
                                                                 strings_can_be_null=True))
    except pa.ArrowInvalid as err:
        raise _csv_shape_error(path) or ValueError(f"{path.name}: {err}") from None
    rows_hint = path.stat().st_size // 40  # grown by doubling when the rows are shorter
    return iter(reader), rows_hint, names


class _Table:
    """Typed columns filled batch by batch."""

    def __init__(self, names: list[str], rows_hint: int, file_name: str, parquet: bool) -> None:
        self.names, self.file_name, self.parquet = names, file_name, parquet
        self.columns = {name: _Growing(np.float64, rows_hint) for name in
                        ("time", "correct", "pnl", "latency_ms", "outcome_time", "covariate_hit",
                                     "covariate_pnl") if name in names}
        self.arm = _Growing(np.int8, rows_hint)
        self.error = _Growing(np.bool_, rows_hint) if "error" in names else None
        self.units = _Units(rows_hint)
        self.rows = 0
        self.clock = ""

    def where(self, i: int) -> str:
        """Names row ``i`` of the table as the user sees it."""
        return f"{self.file_name}, row {i + 1}" if self.parquet else f"{self.file_name}, line {i + 2}"

    def extend(self, batch: Any) -> None:
        """One record batch."""
        offset = self.rows

        def where(i: int) -> str:
            return self.where(offset + i)

        for name, column in self.columns.items():
            column.extend(self._numbers(batch.column(name), name, where))
        self.arm.extend(_arm_codes(batch.column("arm"), where))
        if self.error is not None:
            self.error.extend(_error_flags(batch.column("error")))
        self.units.extend(batch.column("unit"), where)
        self.rows += batch.num_rows

    def _numbers(self, column: Any, name: str, where: Callable[[int], str]) -> np.ndarray:
        import pyarrow as pa

        def cell(i: int) -> object:  # the cell as the table has it, for messages
            value = column[i].as_py()
            return "" if value is None else value

        text = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
        if name in ("time", "outcome_time"):
            values = self._text_times(column, name, where) if text else self._typed_times(column, name, where)
        elif text:
            values = _text_numbers(column, name, where)
        else:
            values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        return _checked(values, name, where, cell)

    def _typed_times(self, column: Any, name: str, where: Callable[[int], str]) -> np.ndarray:
        import pyarrow as pa

        if not pa.types.is_timestamp(column.type):
            self._agree_column("numbers", column, name, where)
            return column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        self._agree_column("timestamps", column, name, where)
        # seconds since the epoch; a time without a zone is UTC
        micros = column.cast(pa.timestamp("us", tz=column.type.tz)).cast(pa.int64())
        return micros.to_numpy(zero_copy_only=False).astype(np.float64) / 1e6

    def _text_times(self, column: Any, name: str, where: Callable[[int], str]) -> np.ndarray:
        """Numbers, or ISO-8601 times (no zone: UTC): vectorised when a batch is all one kind."""
        import pyarrow as pa
        import pyarrow.compute as pc

        text = pc.utf8_trim_whitespace(column)
        text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
        try:
            values = pc.cast(text, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return self._cells(text.to_pylist(), name, where)
        self._agree_column("numbers", values, name, where)
        return values.to_numpy(zero_copy_only=False)

    def _cells(self, cells: list[str | None], name: str, where: Callable[[int], str]) -> np.ndarray:
        """Time cells one by one (a batch of timestamps, or mixed): as ``experiment simulate`` reads them."""
        out = np.full(len(cells), np.nan)
        for i, cell in enumerate(cells):
            if cell is None:
                continue  # an empty time: _checked names it when the column needs one
            try:
                seconds, kind = float(cell), "numbers"
            except ValueError:
                try:
                    stamp = datetime.fromisoformat(cell)
                except ValueError:
                    raise ValueError(f"{where(i)}, column {name!r}: {cell!r} is neither seconds nor an "
                                     f"ISO-8601 time") from None
                stamp = stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
                seconds, kind = stamp.timestamp(), "timestamps"
            self._agree(kind, name, where(i), cell)
            out[i] = seconds
        return out

    def _agree_column(self, kind: str, values: Any, name: str, where: Callable[[int], str]) -> None:
        if values.null_count == len(values):
            return  # an empty column says nothing about the clock
        import pyarrow.compute as pc

        first = int(pc.index(pc.is_valid(values), True).as_py())
        self._agree(kind, name, where(first), values[first].as_py())

    def _agree(self, kind: str, name: str, place: str, cell: object) -> None:
        if self.clock and kind != self.clock:
            raise ValueError(f"{place}, column {name!r}: {cell!r} is on another clock: the times before it "
                             f"are {self.clock}")
        self.clock = kind

    def observations(self) -> Observations:
        """The columns as :class:`Observations` (sorted by time; no copy when already sorted)."""
        if self.rows == 0:
            raise ValueError(f"{self.file_name}: no rows")
        c = {name: column.array() for name, column in self.columns.items()}
        t_s = c["time"]
        codes, names = self.units.dense()
        outcome_t_s = _arrivals(t_s, c.get("outcome_time"), (c.get("correct"), c.get("pnl")), self.where)
        obs = Observations.build(t_s=t_s, unit=codes, arm=self.arm.array(),
                                 error=self.error.array() if self.error is not None else None,
                                 latency_ms=c.get("latency_ms"), outcome_t_s=outcome_t_s,
                                 correct=c.get("correct"), pnl=c.get("pnl"),
                                 covariate_hit=c.get("covariate_hit"), covariate_pnl=c.get("covariate_pnl"))
        return replace(obs, unit_names=names)


def _text_numbers(column: Any, name: str, where: Callable[[int], str]) -> np.ndarray:
    """Text cells as numbers (empty: NaN; ``correct`` also true/false), vectorised; the first cell that is
    not one is named by its row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    text = pc.utf8_lower(pc.utf8_trim_whitespace(column))
    text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    if name == "correct":
        text = pc.replace_substring_regex(pc.replace_substring_regex(text, "^true$", "1"), "^false$", "0")
    try:
        return pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        for i, cell in enumerate(text.to_pylist()):
            try:
                float(cell) if cell is not None else None
            except ValueError:
                why = "must be 0, 1 or empty" if name == "correct" else "is not a number"
                raise ValueError(f"{where(i)}, column {name!r}: {column[i].as_py()!r} {why}") from None
        raise


def _checked(values: np.ndarray, name: str, where: Callable[[int], str],
             cell: Callable[[int], object]) -> np.ndarray:
    """``values`` if each fits its column, else ``ValueError`` naming the first cell that does not."""
    required = name == "time"
    bad = np.flatnonzero(~np.isfinite(values) if required else np.isinf(values))
    if not len(bad) and name == "latency_ms":
        bad = np.flatnonzero(values < 0)
    if not len(bad) and name == "correct":
        bad = np.flatnonzero(~np.isnan(values) & (values != 0) & (values != 1))
    if not len(bad):
        return values
    i = int(bad[0])
    why = {"latency_ms": "is not a finite number >= 0", "correct": "must be 0, 1 or empty",
           "outcome_time": "is not a finite time"}.get(name, "is not a finite number")
    if required:
        why = "is empty; every exposure needs a time" if np.isnan(values[i]) else "is not a finite time"
    raise ValueError(f"{where(i)}, column {name!r}: {cell(i)!r} {why}")


def _arrivals(t_s: np.ndarray, arrived_s: np.ndarray | None, outcomes: tuple[np.ndarray | None, ...],
              where: Callable[[int], str]) -> np.ndarray:
    """When each outcome arrived; an outcome without an arrival time was known at its request."""
    arrived = np.full(len(t_s), np.nan) if arrived_s is None else arrived_s
    for values in outcomes:
        if values is not None:
            np.copyto(arrived, t_s, where=np.isnan(arrived) & ~np.isnan(values))
    early = np.flatnonzero(arrived < t_s)  # NaN compares False
    if len(early):
        i = int(early[0])
        raise ValueError(f"{where(i)}, column 'outcome_time': the outcome arrived "
                         f"{t_s[i] - arrived[i]:g} s before its request")
    return arrived


def _arm_codes(column: Any, where: Callable[[int], str]) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind) or pa.types.is_floating(kind):
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        codes = np.where(values == 1, 1, np.where(values == 0, 0, -1))
    else:
        text = pc.utf8_lower(pc.utf8_trim_whitespace(column.cast(pa.string())))
        treatment = pc.is_in(text, value_set=pa.array(["treatment", "1", "1.0"]))
        control = pc.is_in(text, value_set=pa.array(["control", "0", "0.0"]))
        t = treatment.fill_null(False).to_numpy(zero_copy_only=False)
        c = control.fill_null(False).to_numpy(zero_copy_only=False)
        codes = np.where(t, 1, np.where(c, 0, -1))
    bad = np.flatnonzero(codes < 0)
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{where(i)}, column 'arm': {column[i].as_py()!r} must be control/treatment or 0/1")
    return codes.astype(np.int8)


def _error_flags(column: Any) -> np.ndarray:
    """0/1, or an error code: any text but 0/false/no/empty is an error."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        text = pc.utf8_lower(pc.utf8_trim_whitespace(column)).fill_null("")
        ok = pc.is_in(text, value_set=pa.array(list(_FALSE_TEXT)))
        return ~ok.to_numpy(zero_copy_only=False)
    values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    return np.nan_to_num(values) != 0
