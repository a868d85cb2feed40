"""Feed the analysis from what workers and bots recorded, keep the audit trail, apply decisions.

The analysis reads one row per exposure (:class:`experiments.data.Observations`).
The experiment's journal gives each request's time (its entry id: the Redis
clock), arm, unit, error and latency; the outcomes stream gives each request's
first valid outcome and when it arrived (that entry's id). In shadow mode a
request makes two rows: the control's, and the treatment's from the label it
scored beside it. Anyone who may XADD can write both streams, so an entry that
does not parse is skipped and counted, never fatal.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import math
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, cast

import numpy as np
import redis

from experiments import analysis, covariates, stats
from experiments.analysis import Decision
from experiments.assignment import CONTROL, TREATMENT
from experiments.data import ARMS, Observations
from experiments.outcomes import Outcome, parse
from experiments.store import Experiment, ExperimentStore
from experiments.summary import Accumulator, Summary, summarize
from protocol import keys, sharding
from protocol.errors import InvalidInput
from protocol.values import text
from registry import Registry

if TYPE_CHECKING:
    from protocol.values import StreamRows

STREAM_PAGE = 10_000
DECISIONS_MAXLEN = 100_000  # analyses kept per experiment: a month of `watch` every 30 s
_ARM_CODES = {CONTROL.encode(): 0, TREATMENT.encode(): 1}
_REQUEST_ID = re.compile(rb"[A-Za-z0-9_\-]{1,64}")  # keys.check_request_id, on bytes
log = logging.getLogger(__name__)


@dataclass
class ReadStats:
    """What reading the journal and the outcomes stream found, and what it left out."""

    journal_entries: int = 0  # requests read (shadow mode: each makes a row per arm)
    journal_malformed: int = 0
    journal_duplicate: int = 0  # a request journaled again (answered twice after a takeover): first counts
    outcomes_malformed: int = 0
    outcomes_duplicate: int = 0  # later outcomes of a request: the first valid one counts
    outcomes_unmatched: int = 0  # valid outcomes of requests not in the journal (or trimmed from it)


# Row columns: "part" orders a request's rows as a full read does (a shard's own rows, then the shadow
# rows); the outcome's three columns come last (set_outcome). Staged row by row, then sorted in.
_COLUMNS = {"t_s": np.float64, "unit": np.int64, "arm": np.int8, "error": np.bool_, "latency_ms": np.float64,
            "route": np.int64, "part": np.int32, "outcome_t_s": np.float64, "correct": np.float64,
            "pnl": np.float64}
_SHADOW_PART = keys.MAX_SHARDS  # a shadow row's part: after every shard's own rows at the same time
_COVARIATES = ("covariate_hit", "covariate_pnl")
_MIN_CAPACITY = 1024
_Found = tuple[float, Outcome]  # an outcome and when it arrived (s, Redis clock)


class _Rows:
    """Every row read, in numpy columns in the order a full read sorts them: by time, then a shard's own
    rows before the shadow rows, then by shard, then in entry order.

    A row is staged as it is read (C arrays of doubles, 8 bytes a value, no objects), then sorted in
    with the others read in the same step (:meth:`sort_in`); only the rows at or after the earliest
    new one move. ``changed_from`` and ``joined`` say what changed since :meth:`take_changes`.
    Columns grow by a quarter at a time; a row's id is its reading order (``position[id]``: where it is).
    """

    def __init__(self) -> None:
        self.staged = [array("d") for _ in _COLUMNS]
        self.columns: dict[str, np.ndarray] = {name: np.empty(0, dtype) for name, dtype in _COLUMNS.items()}
        self.columns["id"] = np.empty(0, np.int64)
        self.position = np.empty(0, np.int64)
        self.n = 0  # rows sorted in
        self.changed_from = 0  # the first position whose row changed since take_changes
        self.joined = array("q")  # ids of rows sorted in whose outcome was written since take_changes
        self.route_covariates: dict[str, np.ndarray] = {}  # by route code: the covariate columns kept

    def __len__(self) -> int:
        return self.n + len(self.staged[0])

    def append(self, *row: float) -> None:
        """One row, in ``_COLUMNS`` order; its id is ``len(self)`` before the call."""
        for column, value in zip(self.staged, row, strict=True):
            column.append(value)

    def set_outcome(self, row: int, outcome: tuple[float, float, float]) -> None:
        """Join an outcome (arrival s, correct, pnl) to row ``row`` (an id), staged or sorted in."""
        if row >= self.n:
            for column, value in zip(self.staged[-3:], outcome, strict=True):
                column[row - self.n] = value
            return
        at = int(self.position[row])
        for name, value in zip(("outcome_t_s", "correct", "pnl"), outcome, strict=True):
            self.columns[name][at] = value
        self.joined.append(row)

    def sort_in(self) -> None:
        """Move the staged rows into the sorted columns: the rows from the earliest new one's time on
        are sorted again with them (those read after the last analysis's clock, as a rule). One column
        at a time, each staged one let go once moved: a first read of a million rows holds little more
        than the columns themselves."""
        k = len(self.staged[0])
        if not k:
            return
        staged = dict(zip(_COLUMNS, self.staged, strict=True))
        self.staged = [array("d") for _ in _COLUMNS]
        new_route = np.frombuffer(staged["route"]).astype(np.int64)
        start = int(np.searchsorted(self.view("t_s"), np.frombuffer(staged["t_s"]).min(), side="left"))
        end = self.n + k

        def merged(name: str) -> np.ndarray:
            if name == "id":
                values = np.arange(self.n, end, dtype=np.int64)
            elif name in self.route_covariates:
                values = self.route_covariates[name][new_route]
            else:
                values = np.frombuffer(staged.pop(name)).astype(_COLUMNS[name])
            return np.concatenate([self.columns[name][start:self.n], values]) if start < self.n else values

        sort_keys = {name: merged(name) for name in ("id", "part", "t_s")}
        order = np.lexsort(tuple(sort_keys.values()))
        self._reserve(end)
        self.position[sort_keys["id"][order]] = np.arange(start, end)
        for name, values in sort_keys.items():
            self.columns[name][start:end] = values[order]
        del sort_keys
        for name in [*staged, *self.route_covariates]:
            self.columns[name][start:end] = merged(name)[order]
        moved = np.flatnonzero(order[:self.n - start] != np.arange(self.n - start))
        self.changed_from = min(self.changed_from, start + int(moved[0]) if len(moved) else self.n)
        self.n = end

    def _reserve(self, rows: int) -> None:
        if rows <= len(self.position):
            return
        capacity = max(rows, len(self.position) + len(self.position) // 4, _MIN_CAPACITY)
        for name, values in [*self.columns.items(), ("position", self.position)]:
            grown = np.empty(capacity, dtype=values.dtype)
            grown[:self.n] = values[:self.n]
            if name == "position":
                self.position = grown
            else:
                self.columns[name] = grown

    def set_route_covariates(self, by_route: dict[str, np.ndarray]) -> None:
        """Keep these covariate columns (by route code; any other is dropped): every row's, written now."""
        self.route_covariates = by_route
        for name in _COVARIATES:
            self.columns.pop(name, None)
        for name, values in by_route.items():
            column = np.empty(len(self.position))
            column[:self.n] = values[self.view("route")]
            self.columns[name] = column

    def view(self, name: str) -> np.ndarray:
        """The sorted rows' column ``name`` (a view, valid until the next :meth:`sort_in`)."""
        return self.columns[name][:self.n]

    def live(self, start_s: float) -> Observations:
        """The sorted rows as observations: views, no copy (valid until the next :meth:`sort_in`), the unit
        codes as read; a covariate column not kept is a NaN view."""
        nothing = np.broadcast_to(np.float64(np.nan), (self.n,))
        hit, pnl = (self.view(name) if name in self.columns else nothing for name in _COVARIATES)
        return Observations(self.view("t_s"), self.view("unit"), self.view("arm"), self.view("error"),
                            self.view("latency_ms"), self.view("outcome_t_s"), self.view("correct"),
                            self.view("pnl"), hit, pnl, start_s)

    def take_changes(self) -> tuple[int, np.ndarray]:
        """The first position changed and the positions of the outcomes joined since the last call."""
        changed = self.changed_from, self.position[np.frombuffer(self.joined, dtype=np.int64)]
        self.changed_from, self.joined = self.n, array("q")
        return changed


@dataclass(frozen=True, slots=True)
class _Waiting:
    """A journaled request whose outcome has not arrived: its rows (ids) and what it predicted."""

    row: int
    error: bool
    label: bytes
    shadow_row: int = -1  # -1: no shadow row
    shadow_error: bool = False
    shadow_label: bytes = b""


class _Journal:
    """The journal's rows with their outcomes joined, read entry by entry, shard by shard.

    One row per request (the control's in shadow mode), and in shadow mode one more for the
    treatment's label; rows are sorted as a full read sorts them (:class:`_Rows`), so reading
    in several steps gives the same columns as one read.
    """

    def __init__(self, e: Experiment) -> None:
        self.by_route, self.shadow_mode = e.unit == "route", e.mode == "shadow"
        self.rows = _Rows()
        self.seen: set[bytes] = set()
        self.waiting: dict[bytes, _Waiting] = {}  # journaled requests without an outcome yet
        self.unmatched: dict[bytes, _Found] = {}  # first outcomes of requests not (yet) journaled
        self.outcome_ids: set[bytes] = set()  # every request with a valid outcome: later ones are repeats
        self.unit_codes: dict[bytes, int] = {}
        self.route_codes: dict[bytes, int] = {}
        self.malformed = self.duplicate = self.matched = 0
        self._rank = np.empty(0, np.int64)

    def outcome(self, request_id: bytes, found: _Found) -> bool:
        """A valid outcome; False when the request already had one (only the first counts)."""
        if request_id in self.outcome_ids:
            return False
        self.outcome_ids.add(request_id)
        waiting = self.waiting.pop(request_id, None)
        if waiting is None:
            self.unmatched[request_id] = found
        else:
            self.matched += 1
            self._join(waiting, found)
        return True

    def _join(self, w: _Waiting, found: _Found) -> None:
        self.rows.set_outcome(w.row, _outcome_columns(None if w.error else found, w.label))
        if w.shadow_row >= 0:
            shadow = _outcome_columns(None if w.shadow_error else found, w.shadow_label, shadow=True)
            self.rows.set_outcome(w.shadow_row, shadow)

    def add(self, shard: int, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """One stream entry; a malformed or repeated one is counted and left out."""
        request_id, arm = fields.get(b"id", b""), _ARM_CODES.get(fields.get(b"arm", b""))
        latency_ms = _latency_ms(fields.get(b"latency_ms"))
        if arm is None or latency_ms is None or not _REQUEST_ID.fullmatch(request_id):
            self.malformed += 1
        elif request_id in self.seen:
            self.duplicate += 1
        else:
            self.seen.add(request_id)
            t_s = int(entry_id.split(b"-", 1)[0]) / 1000
            self._append(shard, t_s, request_id, arm, latency_ms, fields)

    def _append(self, shard: int, t_s: float, request_id: bytes, arm: int, latency_ms: float,
                fields: dict[bytes, bytes]) -> None:
        route = fields.get(b"route", b"")
        unit_name = route if self.by_route and route else request_id
        unit = self.unit_codes.setdefault(unit_name, len(self.unit_codes))
        route_code = self.route_codes.setdefault(route, len(self.route_codes))
        rows = self.rows
        error, label = bool(fields.get(b"error")), fields.get(b"label", b"")
        waiting = _Waiting(len(rows), error, label)
        rows.append(t_s, unit, arm, error, math.nan if error else latency_ms, route_code, shard, math.nan,
                    math.nan, math.nan)
        if self.shadow_mode and (b"shadow_label" in fields or b"shadow_error" in fields):
            waiting = replace(waiting, shadow_row=len(rows), shadow_error=bool(fields.get(b"shadow_error")),
                              shadow_label=fields.get(b"shadow_label", b""))
            rows.append(t_s, unit, 1, waiting.shadow_error, math.nan, route_code, _SHADOW_PART + shard,
                        *[math.nan] * 3)
        found = self.unmatched.pop(request_id, None)
        if found is None:
            self.waiting[request_id] = waiting
        else:
            self.matched += 1
            self._join(waiting, found)

    def unit_rank(self) -> np.ndarray | None:
        """By route: each unit code's number in a full read, which numbers routes by name, so the columns
        do not depend on how many reads made them (None: the codes as read are a full read's)."""
        if not self.by_route or not self.unit_codes:
            return None
        if len(self._rank) != len(self.unit_codes):  # sorted again only when a unit is new
            self._rank = np.empty(len(self.unit_codes), dtype=np.int64)
            self._rank[np.argsort(np.array(list(self.unit_codes), dtype=object), kind="stable")] = \
                np.arange(len(self.unit_codes))
        return self._rank

    def route_names(self, start: int = 0) -> list[str]:
        """Route names by code from ``start``, decoded as creation decodes them
        (:mod:`experiments.covariates`)."""
        routes = itertools.islice(self.route_codes, start, None)
        return [r[:covariates.MAX_ROUTE_BYTES].decode(errors="replace") for r in routes]

    def unit_names(self) -> tuple[str, ...]:
        """Unit names by code (routes, or request ids where the request is the unit)."""
        names = sorted(self.unit_codes) if self.by_route else self.unit_codes
        return tuple(u.decode(errors="replace") for u in names)


def _outcome_columns(found: _Found | None, predicted: bytes, *,
                     shadow: bool = False) -> tuple[float, float, float]:
    """(arrival s, correct, pnl) of a row: NaN for what is unknown.

    A shadow row is judged by its label only: ``correct`` and ``pnl`` are about the
    control's answer, the one the bot acted on.
    """
    if found is None:
        return math.nan, math.nan, math.nan
    arrived_s, outcome = found
    pnl = math.nan if shadow or outcome.pnl is None else outcome.pnl
    return arrived_s, _judged(predicted, outcome, by_label_only=shadow), pnl


def _latency_ms(value: bytes | None) -> float | None:
    """NaN when absent (entries written before latencies were journaled); None when malformed."""
    if value is None:
        return math.nan
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _pages(client: redis.Redis, key: str, start: str = "-") -> Iterator[StreamRows]:
    """The stream from ``start`` in pages of ``STREAM_PAGE`` entries (never all of it in memory)."""
    cursor = start
    while True:
        page = cast("StreamRows", client.xrange(key, min=cursor, count=STREAM_PAGE))
        if page:
            yield page
        if len(page) < STREAM_PAGE:
            return
        cursor = "(" + text(page[-1][0])


def shards(client: redis.Redis, model: str) -> range:
    """Every stream shard the model has used: each keeps its own experiment journal and counters."""
    try:
        return range(sharding.read_layout(client, model).highest)
    except InvalidInput:  # a malformed layout hash: the workers report it; read what may exist
        return range(keys.MAX_SHARDS)


class _RouteCovariates:
    """Each route's pre-period covariates by route code, as :meth:`covariates.PrePeriod.by_code` gives
    them for every route read so far, computed once per route."""

    def __init__(self, pre: covariates.PrePeriod) -> None:
        self.pre = pre
        self.values = {name: np.empty(0) for name in _COVARIATES}
        self.known = {name: False for name in _COVARIATES}  # some route has one (by_code: not None)

    def extend(self, names: list[str]) -> None:
        """The routes read since, in code order."""
        if not names:
            return
        for name, values in zip(_COVARIATES, self.pre.by_code(names), strict=True):
            new = np.full(len(names), np.nan) if values is None else values
            self.values[name] = np.concatenate([self.values[name], new])
            self.known[name] = self.known[name] or values is not None

    def kept(self) -> dict[str, np.ndarray]:
        """The covariates a full read attaches: each metric some route has one of."""
        return {name: values for name, values in self.values.items() if self.known[name]}


class Reader:
    """One experiment's journal and outcomes, read where the last read stopped, and their summary.

    Keeps, between analyses in the process that analyses (``experiment watch``), each
    stream's last entry id read and every row read so far (about 350 bytes a request
    with its ids), with the outcomes joined as they arrive; an analysis reads only the
    entries written since. It also keeps the summary of those rows (:meth:`summary`), advanced
    by the rows and outcomes read since the last analysis and the rows that matured since, so
    an analysis costs what arrived, not the experiment's age. A fresh reader reads and
    summarises everything, once: ``analyze`` and ``status`` do. Columns and summaries equal
    a full read's (see :func:`observations`), so decisions do too, until the capped journal
    trims rows the reader keeps; past what a full read could hold, ``run_analysis`` starts a
    fresh reader (:data:`READER_MAX_ENTRIES_PER_STREAM`).
    """

    def __init__(self, e: Experiment) -> None:
        self.experiment = e
        self.read = ReadStats()
        self.journal = _Journal(e)
        self.outcome_cursor = f"{int(e.created_at * 1000)}-0"
        self.journal_cursors: dict[int, str] = {}
        self.decisions: list[dict] = []  # the audit trail read so far (see :func:`decisions`)
        self.decisions_cursor = "-"
        self.pre_period = covariates.PrePeriod.off("not read yet", stored=False)
        self.live: Accumulator | None = None  # the summary kept between analyses
        self.rebuilds = 0  # kept summaries started afresh (see :meth:`summary`)
        self._covariates = _RouteCovariates(self.pre_period)

    def update(self, client: redis.Redis) -> None:
        """Read what was written since the last update: the outcomes first, then the journal.

        Outcomes first, so a request counted as answered cannot miss an outcome written before it
        was read (a bot reports after the reply).
        """
        _read_outcomes(client, self.experiment, self)
        if not self.pre_period.stored:  # written once, just after creation: read until it is there
            pre = covariates.load(client, self.experiment)
            if pre != self.pre_period:
                self.set_pre_period(pre)
        e, journal = self.experiment, self.journal
        for shard in shards(client, e.model):
            key = keys.experiment_journal(e.model, e.id, shard)
            for page in _pages(client, key, self.journal_cursors.get(shard, "-")):
                for entry_id, fields in page:
                    journal.add(shard, entry_id, fields)
                self.journal_cursors[shard] = "(" + text(page[-1][0])
        self.sort_in()
        r = self.read
        r.journal_malformed, r.journal_duplicate = journal.malformed, journal.duplicate
        r.journal_entries, r.outcomes_unmatched = len(journal.seen), len(journal.unmatched)

    def set_pre_period(self, pre: covariates.PrePeriod) -> None:
        """The covariates to attach to the rows read (every row's, at the next :meth:`sort_in`)."""
        self.pre_period, self._covariates = pre, _RouteCovariates(pre)

    def sort_in(self) -> None:
        """Sort the rows read since into the others, with their routes' covariates."""
        rows, cov = self.journal.rows, self._covariates
        cov.extend(self.journal.route_names(len(cov.values["covariate_hit"])))
        kept = cov.kept()
        # A metric's first covariate (its first route with one, or the pre-period, which is read until
        # it is stored and then never again): every row's column is written, the earlier rows' NaN, and
        # the kept summary starts afresh (Accumulator.extend refuses a new column).
        if kept.keys() != rows.route_covariates.keys():
            rows.set_route_covariates(kept)
        else:
            rows.route_covariates = kept
        rows.sort_in()

    def held_entries(self) -> int:
        """Journal rows and not-yet-joined outcomes held between analyses."""
        return len(self.journal.seen) + len(self.journal.unmatched)

    def observations(self) -> Observations:
        """Every row read so far, with the outcomes read so far: a copy, as a full read makes it."""
        j = self.journal
        columns = {name: j.rows.view(name).copy() for name in
                   ("t_s", "unit", "arm", "error", "latency_ms", "outcome_t_s", "correct", "pnl")}
        rank = j.unit_rank()
        if rank is not None:
            columns["unit"] = rank[columns["unit"]]
        route = j.rows.view("route")
        hit, pnl = (None if covariate is None else covariate[route]
                    for covariate in self.pre_period.by_code(j.route_names()))
        obs = Observations.build(**columns, covariate_hit=hit, covariate_pnl=pnl,
                                 start_s=self.experiment.created_at)
        return replace(obs, unit_names=j.unit_names())

    def summary(self, now_s: float) -> Summary:
        """The summary as of ``now_s`` of every row read so far: ``summarize(e, self.observations(),
        now_s)``, kept between calls and advanced by what was read since the last (its arrays stay
        valid until the next call).

        Started afresh, exactly, when what arrived changes rows already counted: a row earlier than
        rows already exposed, or an outcome within the horizon of a row already matured (only when
        clocks disagree: entries are stamped by Redis's clock, read after the analysis's), the
        pre-period or which covariates exist; :attr:`rebuilds` counts these.
        """
        e, j = self.experiment, self.journal
        obs = j.rows.live(e.created_at)
        changed_from, joined = j.rows.take_changes()
        live, self.live = self.live, None  # kept again only once advanced: an error midway starts afresh
        if live is None or now_s < live.summary.now_s or not live.extend(obs, changed_from) \
                or not live.late_outcomes(joined):
            if live is not None:
                self.rebuilds += 1
                log.info("experiment %s: the kept summary starts afresh (%d so far): rows or outcomes "
                         "arrived among those already counted", e.id, self.rebuilds)
            live = Accumulator(e, obs)
        s = live.advance(now_s)
        self.live = live
        rank = j.unit_rank()
        return s.renumbered(rank) if rank is not None else s


def _read_outcomes(client: redis.Redis, e: Experiment, read: Reader) -> None:
    """Each request's first valid outcome and when it arrived, from where ``read`` stopped."""
    for page in _pages(client, keys.outcomes_stream(e.model), read.outcome_cursor):
        for entry_id, fields in page:
            try:
                outcome = parse(_text_fields(fields))
            except InvalidInput:
                read.read.outcomes_malformed += 1
                continue
            found = (int(entry_id.split(b"-", 1)[0]) / 1000, outcome)
            if not read.journal.outcome(outcome.request_id.encode(), found):
                read.read.outcomes_duplicate += 1
        read.outcome_cursor = "(" + text(page[-1][0])


def _text_fields(fields: dict[bytes, bytes]) -> dict[str, str]:
    # Undecodable bytes become U+FFFD, so the entry fails validation instead of the whole read.
    return {_lenient(k): _lenient(v) for k, v in fields.items()}


def _lenient(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _judged(predicted: bytes, outcome: Outcome, *, by_label_only: bool = False) -> float:
    """1.0 right, 0.0 wrong, NaN unknown: the request's first label against the true one, else ``correct``."""
    if outcome.label is not None and predicted:
        return float(predicted.split(b",", 1)[0].decode(errors="replace") == outcome.label)
    if by_label_only or outcome.correct is None:
        return math.nan
    return float(outcome.correct)


def observations(client: redis.Redis, e: Experiment, reader: Reader | None = None
                 ) -> tuple[Observations, ReadStats]:
    """The experiment's exposures with their outcomes, and what reading them left out.

    The unit is the route when the experiment assigns by route and the request has
    one, else the request id (as :meth:`Experiment.arm` assigns). A failed request's
    row has its error and neither latency nor outcome: the latency guardrail is about
    answers, and there was no prediction to judge. ``reader`` (of ``e``) goes on from
    its last read; without one, everything is read.
    """
    reader = reader if reader is not None else Reader(e)
    reader.update(client)
    return reader.observations(), replace(reader.read)


# ---- experiment status ----------------------------------------------------------------

@dataclass
class ArmData:
    """One arm as ``experiment status`` shows it, as of its snapshot's ``now_s`` (Redis clock).

    ``exposures`` and ``errors`` come from the workers' counters (complete, whatever the
    capped journal kept); the rest from the journal's rows up to ``now_s`` and the outcomes
    joined to them. ``due`` and ``on_time`` are what the analysis counts: a request's outcome
    is due once it is older than the label horizon, and it counts if it arrived within it.
    """

    exposures: int = 0
    errors: int = 0
    due: int = 0  # answered requests older than the label horizon: their outcome is due
    on_time: int = 0  # of those, outcomes that arrived within the horizon
    received: int = 0  # outcomes received for the arm's journaled requests: due or not yet, on time or late
    outcomes: int = 0  # received outcomes that say right or wrong
    correct: int = 0
    latencies_ms: np.ndarray = field(default_factory=lambda: np.empty(0))

    @property
    def hit_rate(self) -> float:
        """Share of judged outcomes that were right (NaN: none judged)."""
        return self.correct / self.outcomes if self.outcomes else math.nan

    @property
    def missing_share(self) -> float:
        """Share of due outcomes that did not arrive within the horizon, late ones included, as the
        analysis counts them (NaN: none due)."""
        return (self.due - self.on_time) / self.due if self.due else math.nan


@dataclass(frozen=True)
class ArrivalCheck:
    """The analysis's outcome-arrival HALT check (:func:`experiments.analysis.decide`) on a snapshot.

    Each arm's on-time share of due outcomes gets an always-valid interval; an analysis
    HALTs when the intervals are more than ``tolerance_pp`` apart (``gap_pp``; negative:
    they overlap). ``halt_below`` / ``halt_above``: the treatment's on-time share under /
    over which an analysis at these counts would HALT, control's share as it is (None: no
    share would). Split mode only: in shadow mode both arms are judged on the same outcomes.
    """

    applies: bool
    control_rate: float
    treatment_rate: float
    gap_pp: float = math.nan
    tolerance_pp: float = analysis.ARRIVAL_TOLERANCE * 100
    halts: bool = False
    halt_below: float | None = None
    halt_above: float | None = None


def _arrival_interval(arrived: int, due: int) -> tuple[float, float]:
    """One arm's always-valid interval, as :func:`experiments.analysis.decide` computes it."""
    return stats.bernoulli_confidence_sequence(arrived, due, analysis.ARRIVAL_ALPHA / 2)


def arrival_check(e: Experiment, s: Summary) -> ArrivalCheck:
    """What the arrival check makes of ``s`` now, and the treatment's shares that would HALT."""
    arrived, due = ([int(v) for v in a.sum(axis=0)] for a in (s.arrived, s.matured))
    control_rate, treatment_rate = (a / n if n else math.nan for a, n in zip(arrived, due, strict=True))
    if e.mode != "split":
        return ArrivalCheck(False, control_rate, treatment_rate)
    control, n_t = _arrival_interval(arrived[0], due[0]), due[1]
    tolerance = analysis.ARRIVAL_TOLERANCE

    def too_low(a: int) -> bool:  # fewer treatment arrivals only widen this side's gap
        return control[0] - _arrival_interval(a, n_t)[1] > tolerance

    def too_high(a: int) -> bool:
        return _arrival_interval(a, n_t)[0] - control[1] > tolerance

    treatment = _arrival_interval(arrived[1], n_t)
    gap = max(control[0] - treatment[1], treatment[0] - control[1])
    # Both sides are monotone in the treatment's arrivals: the HALT region is a prefix and a suffix.
    first_ok = bisect.bisect_left(range(n_t + 1), True, key=lambda a: not too_low(a))
    first_high = bisect.bisect_left(range(n_t + 1), True, key=too_high)
    return ArrivalCheck(True, control_rate, treatment_rate, gap * 100, tolerance * 100, gap > tolerance,
                        halt_below=first_ok / n_t if first_ok else None,
                        halt_above=(first_high - 1) / n_t if first_high <= n_t else None)


@dataclass
class Snapshot:
    """Both arms as of ``now_s`` (Redis clock), the arrival check, and what was left out."""

    control: ArmData
    treatment: ArmData
    read: ReadStats
    counters_malformed: int = 0
    now_s: float = math.nan
    arrival: ArrivalCheck | None = None
    variance_reduction: str = ""  # CUPED: off and why, or θ and the variance removed per metric

    @property
    def outcomes_malformed(self) -> int:
        """Outcome entries that did not parse."""
        return self.read.outcomes_malformed

    @property
    def outcomes_duplicate(self) -> int:
        """Outcomes after a request's first."""
        return self.read.outcomes_duplicate

    @property
    def records_malformed(self) -> int:
        """Counter values and journal entries that did not parse."""
        return self.counters_malformed + self.read.journal_malformed


def _counts(raws: list[dict]) -> tuple[dict[str, int], int]:
    """The experiment's counters summed over shards; a value that is not a whole number is left
    out and counted."""
    counts: dict[str, int] = {}
    bad = 0
    for raw in raws:
        lenient = {_lenient(k): _lenient(v) for k, v in raw.items()}
        good = {k: int(v) for k, v in lenient.items() if v.isascii() and v.isdigit() and len(v) <= 18}
        for k, n in good.items():
            counts[k] = counts.get(k, 0) + n
        bad += len(raw) - len(good)
    return counts, bad


def _arm_data(obs: Observations, s: Summary, arm: int, counts: dict[str, int]) -> ArmData:
    name = ARMS[arm]
    mine = (obs.arm == arm) & (obs.t_s <= s.now_s)
    received = mine & (obs.outcome_t_s <= s.now_s)  # NaN (no outcome) compares False
    judged = received & ~np.isnan(obs.correct)
    latencies = obs.latency_ms[mine]
    # A counter below the arm's journaled requests was damaged (a value that is not a number, which
    # refuses the workers' HINCRBY): those requests were exposures all the same.
    exposures = max(counts.get(f"{name}:requests", 0), int(mine.sum()))
    return ArmData(exposures=exposures,
                   errors=sum(n for k, n in counts.items() if k.startswith(f"{name}:errors:")),
                   due=int(s.matured[:, arm].sum()), on_time=int(s.arrived[:, arm].sum()),
                   received=int(received.sum()), outcomes=int(judged.sum()),
                   correct=int(obs.correct[judged].sum()),
                   latencies_ms=latencies[~np.isnan(latencies)])


def snapshot(client: redis.Redis, e: Experiment, reader: Reader | None = None) -> Snapshot:
    """Per arm: exposures and errors (counters), due, on-time and received outcomes and latencies
    (journal), as of the Redis clock when it starts; the arrival check; what was left out.

    Read in this order: the clock, the outcomes, the journal, the counters. A worker writes a
    request's journal entry and its counter in one MULTI/EXEC, and a bot reports an outcome after
    the reply, so every outcome joined here belongs to a request the counters had counted by the
    time they are read: outcomes never exceed exposures, however much traffic arrives meanwhile.
    (Counters read first left out the requests answered, and reported, during the read.)
    """
    now_s = redis_now_s(client)
    reader = reader if reader is not None else Reader(e)
    obs, read = observations(client, e, reader)
    counts, bad = _counts([client.hgetall(keys.experiment_counts(e.model, e.id, k))
                           for k in shards(client, e.model)])
    s = summarize(e, obs, now_s)
    return Snapshot(_arm_data(obs, s, 0, counts), _arm_data(obs, s, 1, counts), read, bad, now_s,
                    arrival_check(e, s), covariates.status_line(reader.pre_period, s))


# ---- analysis and audit trail ----------------------------------------------------------

def redis_now_s(client: redis.Redis) -> float:
    """Redis's clock, the one the journal and outcome entry ids are on."""
    seconds, microseconds = client.time()
    return seconds + microseconds / 1e6


def outcomes_due_s(client: redis.Redis, e: Experiment) -> float:
    """When the last journaled request's outcome is due (Redis clock, s); -inf before any request."""
    last_ms = -math.inf
    for shard in shards(client, e.model):
        last = cast("StreamRows", client.xrevrange(keys.experiment_journal(e.model, e.id, shard), count=1))
        if last:
            last_ms = max(last_ms, int(text(last[0][0]).split("-", 1)[0]))
    return last_ms / 1000 + e.label_horizon_s


def run_analysis(client: redis.Redis, registry: Registry, model: str, *, apply: bool = False,
                 readers: dict[str, Reader] | None = None) -> Decision:
    """Analyze the model's experiment now, append the decision to its audit trail, maybe apply it.

    ``readers`` (by experiment id, kept by the caller between analyses: ``experiment watch``) make
    each analysis read only what was written since the last one and advance the summary kept with
    it (:meth:`Reader.summary`); without it (``experiment analyze``), everything is read and
    summarised once.
    """
    store = ExperimentStore(client, registry)
    e = store.get(model)
    if e is None:
        raise ValueError(f"{model} has no experiment")
    # The clock first: everything written after it is left for the next analysis, so a request
    # counted as matured cannot miss an outcome that arrived before now.
    now_s = redis_now_s(client)
    reader = Reader(e) if readers is None else _reader_for(readers, e)
    reader.update(client)
    decision = analysis.decide(e, reader.summary(now_s), decisions(client, e, reader))
    record = decision.to_dict() | {"applied": apply}
    client.xadd(keys.experiment_decisions(model, e.id), {"record": json.dumps(record)},
                maxlen=DECISIONS_MAXLEN, approximate=False)
    if apply and e.status == "running":
        _apply(store, registry, e, decision)
    return decision


# A reader keeps every row and unmatched outcome it read, while the streams it reads are capped (the
# journal per shard, the outcomes per model, at a million entries each: JOURNAL_MAXLEN in
# worker/arms.py, OUTCOMES_MAXLEN in producer). Past what a full read could hold it starts over with
# one full read, so `watch` never holds more than `analyze` would, however long it runs.
READER_MAX_ENTRIES_PER_STREAM = 1_000_000


def _reader_for(readers: dict[str, Reader], e: Experiment) -> Reader:
    """The kept reader of ``e``, or a fresh one (dropping any other experiment's) when none fits."""
    reader = readers.get(e.id)
    streams = 1 + len(reader.journal_cursors) if reader is not None else 1
    if reader is None or reader.held_entries() > READER_MAX_ENTRIES_PER_STREAM * streams:
        readers.clear()
        reader = readers[e.id] = Reader(e)
    return reader


def _apply(store: ExperimentStore, registry: Registry, e: Experiment, decision: Decision) -> None:
    if decision.decision == "PROMOTE":
        registry.promote(e.model, e.treatment_version, reason=f"experiment {e.id}: {decision.reason}")
    if decision.decision in ("PROMOTE", "ROLLBACK", "HALT", "KEEP"):
        store.set_status(e.model, "stopped", reason=f"{decision.decision}: {decision.reason}")


def decisions(client: redis.Redis, e: Experiment, reader: Reader | None = None) -> list[dict]:
    """The audit trail, oldest first (a record that does not parse is left out); ``reader`` reads
    only the records appended since its last read and keeps them all."""
    reader = reader if reader is not None else Reader(e)
    for page in _pages(client, keys.experiment_decisions(e.model, e.id), reader.decisions_cursor):
        for _, fields in page:
            try:
                record = json.loads(_text_fields(fields).get("record", ""))
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("look"), int):
                reader.decisions.append(record)
        del reader.decisions[:-DECISIONS_MAXLEN]  # as many as the capped audit stream holds
        reader.decisions_cursor = "(" + text(page[-1][0])
    return list(reader.decisions)
