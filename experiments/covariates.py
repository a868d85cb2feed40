"""Pre-period covariates for CUPED: each route's hit rate and mean P&L before the experiment.

At ``experiment create`` the model's pre-period is read from the previous experiment's
journal (each request's route and label; the newest ``MAX_ENTRIES`` entries a shard)
joined with the outcomes that arrived for those requests (the newest ``MAX_OUTCOMES`` of
the journal's span plus its label horizon), and stored with the experiment in one bounded
hash (:func:`protocol.keys.experiment_covariates`, at most ``MAX_ROUTES`` routes). Both arms
of the previous experiment count: a symbol's difficulty is what the covariate is to carry,
and it is the market's, not the model's. Nothing the new experiment does can change it.

The analysis (:mod:`experiments.runner`) gives each row its route's covariate: the route's
hit rate (and winsorised mean P&L) shrunk toward the pre-period's overall one by how
much evidence the route has (empirical Bayes, method of moments), so a route seen three
times does not claim to know its rate; a route the pre-period never saw has none.

Everything read back from Redis is untrusted: a malformed value leaves its route without
a covariate, a malformed hash turns variance reduction off, and neither stops an analysis.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import astuple, dataclass, field, replace
from typing import TYPE_CHECKING, cast

import numpy as np

from experiments.cuped import MIN_COVARIATE_ROWS
from experiments.outcomes import Outcome, parse
from protocol import keys, sharding
from protocol.errors import InvalidInput
from protocol.values import text

if TYPE_CHECKING:
    import redis

    from experiments.store import Experiment
    from experiments.summary import Summary
    from protocol.values import Fields, StreamRows

MAX_ENTRIES = 100_000  # newest journal entries read per shard at creation (a covariate from 10,000
# requests spread over many symbols is too noisy to explain much of their spread: experiments.symbol_power)
MAX_JOURNAL_ENTRIES = 200_000  # over all shards
MAX_OUTCOMES = 200_000  # newest outcomes read from the journal's span
PAGE_ENTRIES = 10_000  # entries per read: one page of a stream in memory at a time
MAX_LABEL_BYTES = 64  # an outcome's label is at most this long (experiments.outcomes)
MAX_ROUTES = 10_000  # routes stored (the busiest)
MAX_PNL = 1e12  # a mean P&L beyond this is not a number anyone traded
PNL_CLIP = 0.005  # the pre-period P&L is winsorised at these quantiles, as the analysis does
ROUTE_FIELD = "route:"
ABOUT_FIELD = "about"
MAX_ROUTE_BYTES = 256  # a route longer than this is cut: it names a symbol or a strategy
MAX_TEXT = 300  # stored texts read back are cut to this
HEAD = "variance reduction (CUPED)"
OFF_FLAG = "turned off at creation (--no-cuped)"
_REQUEST_ID = re.compile(rb"[A-Za-z0-9_\-]{1,64}")  # keys.check_request_id, on bytes


@dataclass(frozen=True)
class RouteStats:
    """One route's pre-period: outcomes judged and their hit rate; P&L outcomes and their mean."""

    hit_n: int
    hit_rate: float  # NaN: none judged
    pnl_n: int
    pnl_mean: float  # NaN: none

    def to_field(self) -> str:
        """The hash value: four numbers."""
        return f"{self.hit_n} {self.hit_rate!r} {self.pnl_n} {self.pnl_mean!r}"

    @classmethod
    def from_field(cls, value: str) -> RouteStats | None:
        """Parsed leniently: None when it is not four numbers in range."""
        parts = value.split(" ")
        if len(parts) != 4 or not all(p.isascii() and len(p) <= 32 for p in parts):
            return None
        try:
            hit_n, hit_rate, pnl_n, pnl_mean = int(parts[0]), float(parts[1]), int(parts[2]), float(parts[3])
        except ValueError:
            return None
        rate_ok = 0 <= hit_rate <= 1 if hit_n > 0 else math.isnan(hit_rate)
        pnl_ok = abs(pnl_mean) <= MAX_PNL if pnl_n > 0 else math.isnan(pnl_mean)
        return cls(hit_n, hit_rate, pnl_n, pnl_mean) if hit_n >= 0 and pnl_n >= 0 and rate_ok and pnl_ok \
            else None


@dataclass(frozen=True)
class Prior:
    """What a route's mean is shrunk toward: the pre-period's mean, and the weight k of it in outcomes
    (the within-route variance over the between-route variance)."""

    mean: float
    k: float

    def shrink(self, n: np.ndarray, means: np.ndarray) -> np.ndarray:
        """(n·mean + k·grand) / (n + k); NaN where n is 0."""
        has = n > 0
        out = np.full(len(n), np.nan)
        out[has] = (n[has] * means[has] + self.k * self.mean) / (n[has] + self.k)
        return out


@dataclass(frozen=True)
class PrePeriod:
    """The covariates an experiment was created with, or why it has none (``why_off``)."""

    routes: dict[str, RouteStats] = field(default_factory=dict)
    hit_prior: Prior | None = None  # None: routes' hit rates do not differ beyond chance
    pnl_prior: Prior | None = None
    why_off: str = ""
    source: str = ""  # where the pre-period came from, for status
    requests: int = 0  # pre-period requests with an outcome
    stored: bool = True  # False: nothing was stored (an experiment created without this step)
    malformed: int = 0  # stored routes whose value did not parse (left without a covariate)

    @classmethod
    def off(cls, why: str, *, stored: bool = True) -> PrePeriod:
        """No covariates, and why."""
        return cls(why_off=why, stored=stored)

    def covariates(self, routes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(hit, P&L) covariate of each of ``routes``: its pre-period mean shrunk toward the overall
        one (NaN: the route was not seen, or routes do not differ)."""
        empty = RouteStats(0, math.nan, 0, math.nan)
        rows = np.array([astuple(self.routes.get(r, empty)) for r in routes], dtype=float).reshape(-1, 4)
        nothing = np.full(len(rows), np.nan)
        return (self.hit_prior.shrink(rows[:, 0], rows[:, 1]) if self.hit_prior else nothing,
                self.pnl_prior.shrink(rows[:, 2], rows[:, 3]) if self.pnl_prior else nothing)

    def by_code(self, routes: Sequence[str]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """:meth:`covariates`, with None for a metric no route has a covariate of (or when off)."""
        if _why_off(self):
            return None, None
        hit, pnl = self.covariates(routes)
        return (hit if np.isfinite(hit).any() else None), (pnl if np.isfinite(pnl).any() else None)


def prior(codes: np.ndarray, values: np.ndarray, routes: int) -> Prior | None:
    """The shrinkage toward the mean of rows ``values`` in routes ``codes`` (NaN rows left out), by
    moments (one-way random effects, unbalanced): within = Σ (y − m_r)² / (N − R), and
    Σ n_r (m_r − m)² = (R − 1) within + (N − Σ n_r² / N) between. None when routes do not differ
    beyond chance, or too few have outcomes to tell."""
    known = ~np.isnan(values)
    codes, values = codes[known], values[known]
    n = np.bincount(codes, minlength=routes).astype(float)
    seen = n > 0
    total, r = float(n.sum()), int(seen.sum())
    if r < 2 or total <= r:
        return None
    route_mean = np.bincount(codes, weights=values, minlength=routes) / np.maximum(n, 1)
    grand = float(values.mean())
    within = float(np.sum((values - route_mean[codes]) ** 2)) / (total - r)
    spread = float(np.sum(n[seen] * (route_mean[seen] - grand) ** 2))
    between = (spread - (r - 1) * within) / (total - float(np.sum(n * n)) / total)
    if not (between > 0 and math.isfinite(between)):
        return None
    return Prior(grand, within / between)


def summarise(routes: Sequence[str] | np.ndarray, correct: np.ndarray, pnl: np.ndarray, *,
              source: str) -> PrePeriod:
    """A pre-period from one row per request with an outcome: its route ("" for none), 0/1 or NaN,
    P&L or NaN. The P&L is winsorised first, as the analysis does."""
    names, codes = np.unique(np.asarray(routes, dtype=str), return_inverse=True)
    correct, pnl = np.asarray(correct, dtype=float), np.asarray(pnl, dtype=float)
    has_route = np.asarray(routes, dtype=str) != "" if len(routes) else np.zeros(0, dtype=bool)
    if not has_route.any():
        return PrePeriod.off(f"no outcomes of requests with a route in {source}")
    priced = ~np.isnan(pnl)
    if priced.sum() >= 2:  # one fat-tailed trade must not make its symbol's covariate
        pnl = np.clip(pnl, *np.quantile(pnl[priced], [PNL_CLIP, 1 - PNL_CLIP]))
    codes, correct, pnl = codes[has_route], correct[has_route], pnl[has_route]
    stats = _route_stats(names, codes, correct, pnl)
    busiest = sorted(stats, key=lambda r: -(stats[r].hit_n + stats[r].pnl_n))[:MAX_ROUTES]
    return PrePeriod({r: stats[r] for r in busiest}, prior(codes, correct, len(names)),
                     prior(codes, pnl, len(names)), source=source, requests=int(has_route.sum()))


def _route_stats(names: np.ndarray, codes: np.ndarray, correct: np.ndarray, pnl: np.ndarray
                 ) -> dict[str, RouteStats]:
    judged, priced = ~np.isnan(correct), ~np.isnan(pnl)
    size = len(names)
    hit_n = np.bincount(codes[judged], minlength=size)
    hits = np.bincount(codes[judged], weights=correct[judged], minlength=size)
    pnl_n = np.bincount(codes[priced], minlength=size)
    pnl_sum = np.bincount(codes[priced], weights=pnl[priced], minlength=size)
    return {str(name): RouteStats(int(hit_n[i]), float(hits[i] / hit_n[i]) if hit_n[i] else math.nan,
                                  int(pnl_n[i]), float(pnl_sum[i] / pnl_n[i]) if pnl_n[i] else math.nan)
            for i, name in enumerate(names) if name and (hit_n[i] or pnl_n[i])}


# ---- at creation: the previous experiment's journal joined with its outcomes -------------------

def at_create(client: redis.Redis, e: Experiment, previous: Experiment | None, *, enabled: bool) -> str:
    """Measure the pre-period (unless turned off), store it with ``e``: the line ``create`` prints."""
    pre = measure(client, e.model, previous) if enabled else PrePeriod.off(OFF_FLAG)
    save(client, e, pre)
    return create_line(pre)


def measure(client: redis.Redis, model: str, previous: Experiment | None) -> PrePeriod:
    """The model's pre-period: the previous experiment's newest requests with the outcomes they got."""
    if previous is None:
        return PrePeriod.off("no previous experiment to take a pre-period from")
    requests, span_ms = _journal(client, model, previous)
    if not requests:
        return PrePeriod.off(f"the previous experiment ({previous.id}) journaled no answered request")
    horizon_ms = int(previous.label_horizon_s * 1000)
    found = _outcomes(client, model, requests, (span_ms[0], span_ms[1] + horizon_ms))
    if not found:
        return PrePeriod.off(f"none of the previous experiment's newest {len(requests):,} requests "
                             f"({previous.id}) has an outcome")
    routes = [requests[r][0] for r in found]
    correct = np.array([_judged(requests[r][1], o) for r, o in found.items()])
    pnl = np.array([math.nan if o.pnl is None else o.pnl for o in found.values()])
    return summarise(routes, correct, pnl, source=f"experiment {previous.id}")


def _journal(client: redis.Redis, model: str, previous: Experiment
             ) -> tuple[dict[bytes, tuple[str, bytes]], tuple[int, int]]:
    """Request id → (route, first label) of the newest answered requests, and their span (ms)."""
    requests: dict[bytes, tuple[str, bytes]] = {}
    routes: dict[bytes, str] = {}  # one str per route, however many requests name it
    first_ms, last_ms, budget = math.inf, -math.inf, MAX_JOURNAL_ENTRIES
    for shard in _shards(client, model):
        limit = min(MAX_ENTRIES, budget)
        for page in _newest(client, keys.experiment_journal(model, previous.id, shard), limit):
            budget -= len(page)
            for entry_id, fields in page:
                request_id, at_ms = fields.get(b"id", b""), _entry_ms(entry_id)
                if fields.get(b"error") or at_ms is None or not _REQUEST_ID.fullmatch(request_id):
                    continue  # failed, or not ours to parse: left out
                first_ms, last_ms = min(first_ms, at_ms), max(last_ms, at_ms)
                raw = fields.get(b"route", b"")[:MAX_ROUTE_BYTES]
                route = routes.setdefault(raw, raw.decode(errors="replace"))
                label = fields.get(b"label", b"").split(b",", 1)[0][:MAX_LABEL_BYTES]
                requests.setdefault(request_id, (route, label))
    return requests, (int(first_ms), int(last_ms)) if requests else (0, 0)


def _newest(client: redis.Redis, key: str, limit: int, span_ms: tuple[int, int] | None = None
            ) -> Iterator[StreamRows]:
    """At most ``limit`` of a stream's newest entries (within ``span_ms``), a page at a time."""
    low, cursor = ("-", "+") if span_ms is None else (str(span_ms[0]), str(span_ms[1]))
    while limit > 0:
        count = min(PAGE_ENTRIES, limit)
        page = cast("StreamRows", client.xrevrange(key, max=cursor, min=low, count=count))
        if page:
            yield page
        if len(page) < count:
            return
        limit -= len(page)
        cursor = "(" + text(page[-1][0])


def _shards(client: redis.Redis, model: str) -> range:
    try:
        return range(sharding.read_layout(client, model).highest)
    except InvalidInput:  # a malformed layout hash: shard 0 is always there
        return range(1)


def _entry_ms(entry_id: bytes) -> int | None:
    head = entry_id.split(b"-", 1)[0]
    return int(head) if head.isdigit() and len(head) <= 16 else None


def _outcomes(client: redis.Redis, model: str, requests: dict[bytes, tuple[str, bytes]],
              span_ms: tuple[int, int]) -> dict[bytes, Outcome]:
    """Each request's first valid outcome among the newest ``MAX_OUTCOMES`` of the span."""
    found: dict[bytes, Outcome] = {}
    for page in _newest(client, keys.outcomes_stream(model), MAX_OUTCOMES, span_ms):
        for _, fields in page:  # newest first: an older outcome of the request replaces it (the first counts)
            try:
                outcome = parse({_lenient(k): _lenient(v) for k, v in fields.items()})
            except InvalidInput:
                continue
            request_id = outcome.request_id.encode()
            if request_id in requests:
                found[request_id] = outcome
    return found


def _lenient(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _judged(predicted: bytes, outcome: Outcome) -> float:
    """1.0 right, 0.0 wrong, NaN unknown, as the analysis judges a row (:mod:`experiments.runner`)."""
    if outcome.label is not None and predicted:
        return float(predicted.split(b",", 1)[0].decode(errors="replace") == outcome.label)
    return math.nan if outcome.correct is None else float(outcome.correct)


# ---- stored with the experiment ------------------------------------------------------------

def save(client: redis.Redis, e: Experiment, pre: PrePeriod) -> None:
    """Write ``pre`` as ``e``'s covariate hash (replacing any), in one transaction."""
    key = keys.experiment_covariates(e.model, e.id)
    about = {"why_off": pre.why_off, "source": pre.source, "requests": pre.requests,
             "hit_prior": _prior_json(pre.hit_prior), "pnl_prior": _prior_json(pre.pnl_prior)}
    fields = {ABOUT_FIELD: json.dumps(about)} | {ROUTE_FIELD + r: s.to_field() for r, s in pre.routes.items()}
    pipe = client.pipeline(transaction=True)
    pipe.delete(key)
    pipe.hset(key, mapping=cast("Fields", fields))
    pipe.execute()


def _prior_json(p: Prior | None) -> list[float] | None:
    return [p.mean, p.k] if p is not None and math.isfinite(p.mean) and math.isfinite(p.k) else None


def load(client: redis.Redis, e: Experiment) -> PrePeriod:
    """``e``'s stored covariates, parsed leniently: a malformed route is left out and counted, a
    malformed or oversized hash turns variance reduction off."""
    key = keys.experiment_covariates(e.model, e.id)
    size = int(client.hlen(key))
    if size == 0:
        return PrePeriod.off("no pre-period was stored when the experiment was created", stored=False)
    if size > MAX_ROUTES + 1:
        return PrePeriod.off(f"the stored covariates have {size:,} fields, more than the {MAX_ROUTES:,} "
                             f"routes creation writes: ignored")
    fields = {_lenient(k): _lenient(v) for k, v in cast("dict", client.hgetall(key)).items()}
    about = _about(fields.pop(ABOUT_FIELD, ""))
    if about is None:
        return PrePeriod.off("the stored covariates are malformed: ignored")
    routes: dict[str, RouteStats] = {}
    for name, value in fields.items():
        stats = RouteStats.from_field(value) if name.startswith(ROUTE_FIELD) else None
        if stats is not None:
            routes[name[len(ROUTE_FIELD):]] = stats
    return replace(about, routes=routes, malformed=len(fields) - len(routes))


def _about(value: str) -> PrePeriod | None:
    try:
        about = json.loads(value)
    except ValueError:
        return None
    if not isinstance(about, dict):
        return None
    why, source, requests = about.get("why_off"), about.get("source"), about.get("requests")
    if not (isinstance(why, str) and isinstance(source, str) and isinstance(requests, int)):
        return None
    return PrePeriod(hit_prior=_prior_of(about.get("hit_prior")), pnl_prior=_prior_of(about.get("pnl_prior")),
                     why_off=why[:MAX_TEXT], source=source[:MAX_TEXT], requests=max(requests, 0))


def _prior_of(value: object) -> Prior | None:
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) for v in value)):
        return None
    mean, k = float(value[0]), float(value[1])
    return Prior(mean, k) if math.isfinite(mean) and math.isfinite(k) and k >= 0 else None


# ---- what create and status say -------------------------------------------------------------

def _why_off(pre: PrePeriod) -> str:
    if pre.why_off:
        return pre.why_off
    if not pre.routes:
        return "no route of the pre-period could be read back"
    if pre.hit_prior is None and pre.pnl_prior is None:
        return "the pre-period's routes do not differ beyond chance: nothing for a covariate to explain"
    return ""


def _source(pre: PrePeriod) -> str:
    return f"{len(pre.routes):,} routes' pre-period from {pre.source} " \
           f"({pre.requests:,} requests with an outcome)"


def create_line(pre: PrePeriod) -> str:
    """What ``experiment create`` says about variance reduction."""
    why = _why_off(pre)
    return f"{HEAD}: off: {why}" if why else f"{HEAD}: on: {_source(pre)}"


def status_line(pre: PrePeriod, s: Summary) -> str:
    """What ``experiment status`` says: off and why, or θ and the variance removed per metric."""
    why = _why_off(pre)
    if why:
        return f"{HEAD}: off: {why}"
    used = s.cuped
    left_out = f"; {pre.malformed} malformed stored routes left out" if pre.malformed else ""
    if not used:
        return (f"{HEAD}: on, not applied yet: fewer than {MIN_COVARIATE_ROWS} outcomes "
                f"with a covariate, or the covariate does not vary ({_source(pre)}{left_out})")
    names = {"hit_rate": "hit rate", "pnl": "P&L"}
    parts = [f"{names[name]} θ {_num(f['theta'], '.3g')}, {_num(f['covariate_share'], '.0%')} of outcomes "
             f"with a covariate, variance {_num(f['variance_reduction'], '.1%')} lower per outcome and "
             f"{_num(f.get('effect_variance_reduction'), '.1%')} lower for the effect"
             for name, f in used.items()]
    return f"{HEAD}: {'; '.join(parts)} ({_source(pre)}{left_out})"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
