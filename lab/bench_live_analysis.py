"""CPU time of one ``experiment watch`` analysis at about a million journal rows: the summary kept
between analyses, advanced by what arrived (``Reader.summary`` and ``decide``), against a summary of
every row read (``Reader.observations`` and ``evaluate``, what a full read does), with ``--new``
requests arriving between analyses.

The reader is fed directly, without Redis: parsing the new entries costs the same either way and is
reported on its own line. Two shards, ``--routes`` symbols with pre-period covariates (CUPED on),
90 % of requests answered by an outcome 5, 20, 45 or 75 s later (horizon 60 s: the last is late).

    .venv/bin/python -m lab.bench_live_analysis [--rows 1000000] [--new 1000] [--analyses 10]
        [--unit route|request_id]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator

import numpy as np

from experiments import analysis, covariates, runner
from experiments.outcomes import Outcome
from experiments.store import Experiment

RATE_PER_S = 100.0  # requests a second: a million rows is about 2.8 hours of traffic
HORIZON_S = 60.0
DELAYS_S = (5.0, 20.0, 45.0, 75.0)


class Feed:
    """Requests in time order, each with its outcome's arrival; fed to a reader up to a time."""

    def __init__(self, e: Experiment, routes: int, seed: int = 1) -> None:
        self.e, self.routes, self.rng = e, routes, np.random.default_rng(seed)
        self.requests = self._requests()
        self.pending: list[tuple[float, bytes, Outcome]] = []  # outcomes not yet arrived, by arrival
        self.next_request: tuple[float, bytes, dict] | None = None
        self.count = 0

    def _requests(self) -> Iterator[tuple[float, bytes, dict]]:
        i = 0
        while True:
            t_s = self.e.created_at + 1 + i / RATE_PER_S
            route = f"SYM{self.rng.integers(self.routes)}"
            request_id = f"r{i}"
            fields = {b"id": request_id.encode(), b"arm": self.e.arm(route, request_id).encode(),
                      b"route": route.encode(), b"latency_ms": f"{self.rng.gamma(4, 1):.3f}".encode(),
                      b"label": b"up"}
            yield t_s, f"{int(t_s * 1000)}-{i % 2}".encode(), fields
            i += 1

    def until(self, now_s: float) -> tuple[list[tuple[int, bytes, dict]], list[tuple[bytes, tuple]]]:
        """The requests journaled by ``now_s`` since the last call, and the outcomes that arrived by then."""
        entries = []
        while True:
            t_s, entry_id, fields = self.next_request or next(self.requests)
            if t_s > now_s:
                self.next_request = (t_s, entry_id, fields)
                break
            self.next_request = None
            entries.append((self.count % 2, entry_id, fields))
            self.count += 1
            if self.rng.random() < 0.9:
                label = "up" if self.rng.random() < 0.55 else "down"
                request_id = fields[b"id"]
                outcome = Outcome(request_id.decode(), 1, label=label, pnl=float(self.rng.standard_t(3)))
                self.pending.append((t_s + float(self.rng.choice(DELAYS_S)), request_id, outcome))
        arrived = [(request_id, (at_s, outcome))
                   for at_s, request_id, outcome in self.pending if at_s <= now_s]
        self.pending = [p for p in self.pending if p[0] > now_s]
        return entries, arrived


def read(reader: runner.Reader, entries: list[tuple[int, bytes, dict]], arrived: list[tuple[bytes, tuple]]
         ) -> None:
    """What ``Reader.update`` does with them: the outcomes first, then the journal, then sort the rows in."""
    for request_id, found in arrived:
        reader.journal.outcome(request_id, found)
    for shard, entry_id, fields in entries:
        reader.journal.add(shard, entry_id, fields)
    reader.sort_in()


def pre_period(routes: int) -> covariates.PrePeriod:
    rng = np.random.default_rng(2)
    names = [f"SYM{i % routes}" for i in range(20 * routes)]
    rates = rng.uniform(0.4, 0.7, routes)
    correct = np.array([float(rng.random() < rates[i % routes]) for i in range(len(names))])
    pnl = rng.standard_normal(len(names))
    return covariates.summarise(names, correct, pnl, source="bench")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--new", type=int, default=1000, help="requests arriving between analyses")
    parser.add_argument("--analyses", type=int, default=10)
    parser.add_argument("--routes", type=int, default=300)
    parser.add_argument("--unit", choices=("route", "request_id"), default="route")
    args = parser.parse_args(argv)
    e = Experiment("bench", "m", 1, 2, treatment_share=0.5, unit=args.unit, label_horizon_s=HORIZON_S,
                   created_at=1_700_000_000.0)
    reader = runner.Reader(e)
    reader.set_pre_period(pre_period(args.routes))
    feed = Feed(e, args.routes)
    now_s = e.created_at + 1 + args.rows / RATE_PER_S
    batch = feed.until(now_s)
    started = time.process_time()
    read(reader, *batch)
    print(f"{feed.count:,} requests read in {time.process_time() - started:.1f} s CPU "
          f"({args.unit}, {args.routes} routes, {len(reader.journal.rows):,} rows)")
    started = time.process_time()
    reader.summary(now_s)
    print(f"first analysis (every row, once): {time.process_time() - started:.2f} s CPU")
    history: list[dict] = []
    times: dict[str, list[float]] = {"read": [], "kept": [], "decide": [], "full": [], "rows": []}
    for _ in range(args.analyses):
        now_s += args.new / RATE_PER_S
        batch = feed.until(now_s)
        started = time.process_time()
        read(reader, *batch)
        times["read"].append(time.process_time() - started)
        assert reader.live is not None
        processed = reader.live.rows_processed
        started = time.process_time()
        summary = reader.summary(now_s)
        times["kept"].append(time.process_time() - started)
        times["rows"].append(reader.live.rows_processed - processed)
        started = time.process_time()
        kept = analysis.decide(e, summary, history)
        times["decide"].append(time.process_time() - started)
        started = time.process_time()
        full = analysis.evaluate(e, reader.observations(), now_s, history)
        times["full"].append(time.process_time() - started - times["decide"][-1])
        assert (kept.decision, kept.exposures, kept.units) == (full.decision, full.exposures, full.units)
        history.append(kept.memo())
    print(f"per analysis, median of {args.analyses}, {args.new:,} new requests each "
          f"({len(reader.journal.rows):,} rows at the end; rebuilds: {reader.rebuilds}):")
    def ms(name: str) -> str:
        return f"{statistics.median(times[name]) * 1000:.1f} ms CPU"

    print(f"  joining the new entries and sorting them in: {ms('read')}")
    print(f"  kept summary (Reader.summary):               {ms('kept')} "
          f"({statistics.median(times['rows']):,.0f} row reads)")
    print(f"  full summary (observations + summarize):     {ms('full')}")
    print(f"  decide, on either:                           {ms('decide')}")


if __name__ == "__main__":
    main()
