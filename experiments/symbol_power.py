"""What CUPED buys: false PROMOTE, power and information with and without a pre-period covariate.

``python -m experiments.symbol_power [--sims 40]`` simulates trading days of symbols whose hit rates
differ and replays each one twice through :func:`experiments.simulate.simulate` (the rule of
``experiment simulate`` and ``analyze``) on the same seed: with the covariate columns (CUPED) and
without them. The world is :mod:`experiments.traffic_power`'s day — 390 minutes of Poisson traffic,
three times the volume at the open and the close, a time-of-day drift of ±8 pp, half of the outcomes
shared by a symbol's requests of the same minute, outcomes 5–55 s late, P&L Student-t with 2.5 df,
0.1 % errors — with ``symbols`` Zipf-weighted symbols whose hit rates differ (sd 5 pp) and whose mean
P&L follows their hit rate (10 × the offset: sd 0.5 per trade).

The pre-period is the previous day, where each symbol's hit rate was today's less a day-to-day change
(sd 1 pp): its newest ``PRE_PERIOD_REQUESTS`` requests, as many as ``experiment create`` reads of the
previous experiment's journal, summarised by :func:`experiments.covariates.summarise` into each
symbol's shrunk hit rate and mean P&L (``covariate_hit``, ``covariate_pnl``) exactly as the live
analysis attaches them.

Designs: by route with 30 and 300 symbols at 90/10 and 50/50 (``ROUTE_RATE_PER_S``), and by request
with 40 symbols at 30 and 430 requests/s. Scenarios: A/A (false PROMOTE, target at most 1 %) and
+2 pp (power). Per design and scenario it prints PROMOTE's rate with a 95 % Wilson interval both ways,
the other decisions, and the median information fraction at the close (the whole rule's, from one
analysis of the whole day). A by-request day is cut short as :mod:`experiments.traffic_power` cuts
it (2.5 × the time the plan takes at that rate, at least 15 minutes); a by-route day runs to its
close, because without a covariate its plan may never be reached.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from experiments import analysis, covariates, traffic_power
from experiments.data import Observations
from experiments.simulate import experiment_for, simulate
from experiments.summary import summarize

DAY_MINUTES = traffic_power.DAY_MINUTES
UNIT_SD = 0.05  # symbols' hit rates differ by 5 pp (sd)
DAY_TO_DAY_SD = 0.01  # how far a symbol's hit rate moves from one day to the next
PNL_PER_OFFSET = 10.0  # a symbol's mean P&L per trade: 1 + this × its hit-rate offset
PRE_PERIOD_REQUESTS = covariates.MAX_ENTRIES  # what create reads of the previous experiment's journal shard
ROUTE_RATE_PER_S = 30.0
SCENARIOS = {"A/A": 0.0, "+2 pp": 2.0}
OTHERS = ("ROLLBACK", "KEEP", "HALT", "CONTINUE")


@dataclass(frozen=True)
class Design:
    """Who is randomised, how many symbols, which split, how busy the desk."""

    name: str
    unit: str  # route | request_id
    symbols: int
    treatment_share: float
    rate_per_s: float


DESIGNS = (
    Design("by route, 30 symbols, 90/10", "route", 30, 0.1, ROUTE_RATE_PER_S),
    Design("by route, 30 symbols, 50/50", "route", 30, 0.5, ROUTE_RATE_PER_S),
    Design("by route, 300 symbols, 90/10", "route", 300, 0.1, ROUTE_RATE_PER_S),
    Design("by route, 300 symbols, 50/50", "route", 300, 0.5, ROUTE_RATE_PER_S),
    Design("by request, 40 symbols, 30 req/s", "request_id", 40, 0.1, 30.0),
    Design("by request, 40 symbols, 430 req/s", "request_id", 40, 0.1, 430.0),
)


@dataclass(frozen=True)
class World:
    """The symbols of one simulated day: traffic weights, hit-rate offsets, yesterday's offsets."""

    weights: np.ndarray
    offset: np.ndarray
    yesterday: np.ndarray
    treated: np.ndarray  # by route: each symbol's arm

    @classmethod
    def draw(cls, rng: np.random.Generator, d: Design) -> World:
        """Zipf weights, offsets (sd ``UNIT_SD``), yesterday's (``DAY_TO_DAY_SD`` apart), each one's arm."""
        zipf = 1 / np.arange(1, d.symbols + 1)
        offset = rng.normal(0, UNIT_SD, d.symbols)
        return cls(zipf / zipf.sum(), offset, offset + rng.normal(0, DAY_TO_DAY_SD, d.symbols),
                   rng.random(d.symbols) < d.treatment_share)


def pre_period(rng: np.random.Generator, w: World, requests: int) -> tuple[np.ndarray, np.ndarray]:
    """Each symbol's (hit, P&L) covariate from yesterday's newest requests, as the live analysis has them."""
    symbol = rng.choice(len(w.weights), requests, p=w.weights)
    correct = (rng.random(len(symbol)) < np.clip(0.55 + w.yesterday[symbol], 0, 1)).astype(float)
    pnl = 1 + PNL_PER_OFFSET * w.yesterday[symbol] + 2 * rng.standard_t(2.5, len(symbol))
    names = np.array([f"S{i}" for i in range(len(w.weights))])
    pre = covariates.summarise(names[symbol], correct, pnl, source="the previous day")
    return pre.covariates(list(names))


def minutes_for(d: Design) -> int:
    """The simulated span: a full day by route; by request, as traffic_power cuts it."""
    if d.unit == "route":
        return DAY_MINUTES
    return int(min(DAY_MINUTES, max(15, traffic_power.PLANNED_REQUESTS / d.rate_per_s / 60 * 2.5)))


def day(d: Design, effect_pp: float, seed: int, pre_requests: int = PRE_PERIOD_REQUESTS) -> Observations:
    """One day's exposures with each row's covariates from ``pre_requests`` of the previous day."""
    rng = np.random.default_rng(seed)
    w = World.draw(rng, d)
    x_hit, x_pnl = pre_period(rng, w, pre_requests)
    minutes = minutes_for(d)
    t = _arrivals(rng, d.rate_per_s, minutes)
    n = len(t)
    symbol = rng.choice(d.symbols, n, p=w.weights)
    arm = (w.treated[symbol] if d.unit == "route" else rng.random(n) < d.treatment_share).astype(np.int8)
    correct = _outcomes(rng, w, t, symbol, minutes)
    # The treatment turns a wrong answer right often enough to add effect_pp to its hit rate.
    correct[(arm == 1) & (correct == 0) & (rng.random(n) < effect_pp / 100 / 0.45)] = 1.0
    pnl = 1 + PNL_PER_OFFSET * w.offset[symbol] + 2 * rng.standard_t(2.5, n)
    unit = symbol if d.unit == "route" else np.arange(n)
    return Observations.build(t_s=t, unit=unit, arm=arm, outcome_t_s=t + rng.uniform(5, 55, n),
                              correct=correct, pnl=pnl, latency_ms=rng.lognormal(np.log(3), 0.4, n),
                              error=rng.random(n) < 0.001, covariate_hit=x_hit[symbol],
                              covariate_pnl=x_pnl[symbol], start_s=0.0)


def _arrivals(rng: np.random.Generator, rate_per_s: float, minutes: int) -> np.ndarray:
    """Request times: an inhomogeneous Poisson process, 3 × at the open and the close (thinning)."""
    span_s, peak = minutes * 60, 3.0
    mean = float(np.mean(traffic_power.volume(np.linspace(0, DAY_MINUTES * 60, 1000))))
    t = np.sort(rng.uniform(0, span_s, rng.poisson(rate_per_s / mean * peak * span_s)))
    return t[rng.random(len(t)) < traffic_power.volume(t) / peak]


def _outcomes(rng: np.random.Generator, w: World, t: np.ndarray, symbol: np.ndarray, minutes: int
              ) -> np.ndarray:
    """0/1 per request: half its own draw, half its symbol's outcome of that minute (overlapping labels)."""
    symbols, n = len(w.offset), len(t)
    drift = 0.08 * np.sin(2 * np.pi * t / (DAY_MINUTES * 60))
    own = rng.random(n) < np.clip(0.55 + drift + w.offset[symbol], 0, 1)
    episode = symbol * (minutes + 1) + (t // 60).astype(np.int64)
    shared = rng.random(symbols * (minutes + 1)) < 0.55 + np.repeat(w.offset, minutes + 1)
    return np.where(rng.random(n) < 0.5, shared[episode], own).astype(float)


def without_covariates(obs: Observations) -> Observations:
    """The same day with no covariate: what the rule sees without CUPED."""
    unknown = np.broadcast_to(np.float64(np.nan), obs.t_s.shape)  # as Observations.build leaves an absent one
    return replace(obs, covariate_hit=unknown, covariate_pnl=unknown)


@dataclass(frozen=True)
class Outcome:
    """One replay: the first decision other than CONTINUE (or CONTINUE at the end), its minute, and
    the information fraction one analysis of the whole day reaches."""

    decision: str
    minute: float
    close_fraction: float


def run_one(args: tuple[Design, str, int, int]) -> tuple[Outcome, Outcome]:
    """One day (design, scenario, seed, pre-period requests), replayed (raw, CUPED) on the same seed."""
    d, scenario, seed, pre_requests = args
    obs = day(d, SCENARIOS[scenario], seed, pre_requests)
    e = experiment_for(obs, treatment_share=d.treatment_share, unit=d.unit, label_horizon_s=60.0)
    close_s = float(obs.t_s[-1]) + e.label_horizon_s
    results = []
    for data in (without_covariates(obs), obs):
        last = simulate(e, data, 60.0)[-1]
        at_close = analysis.decide(e, summarize(e, data, close_s))
        results.append(Outcome(last.decision, last.now_s / 60, at_close.info_fraction))
    return results[0], results[1]


def _line(name: str, outcomes: list[Outcome]) -> str:
    decided = [o.decision for o in outcomes]
    counts = [f"PROMOTE {traffic_power.wilson_rate(decided.count('PROMOTE'), len(outcomes))}"] + \
        [f"{k} {decided.count(k)}" for k in OTHERS if decided.count(k)]
    minute = np.median([o.minute for o in outcomes])
    fraction = np.median([o.close_fraction for o in outcomes])
    return f"    {name:<5} {', '.join(counts)}; median minute {minute:.0f}; " \
           f"median information at the close {fraction:.0%}"


def main(argv: list[str] | None = None) -> int:
    """Print, per design and scenario, PROMOTE's rate and the information at the close, without and with
    CUPED."""
    parser = argparse.ArgumentParser(prog="python -m experiments.symbol_power", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sims", type=int, default=40)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--workers", type=int, default=0, help="processes (0: one per CPU)")
    parser.add_argument("--only", help="run the designs whose name contains this text")
    parser.add_argument("--pre-period-requests", type=int, default=PRE_PERIOD_REQUESTS,
                        help="requests of the previous day the covariates are estimated from (create reads "
                             f"{PRE_PERIOD_REQUESTS:,} a journal shard)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    designs = [d for d in DESIGNS if not args.only or args.only in d.name]
    with ProcessPoolExecutor(args.workers or None) as pool:
        for d in designs:
            print(f"{d.name} ({d.rate_per_s:g} req/s, {minutes_for(d)} min; covariates from "
                  f"{args.pre_period_requests:,} requests of the previous day):", flush=True)
            for scenario in SCENARIOS:
                seeds = [args.seed * 1_000_003 + 1000 * i for i in range(args.sims)]
                tasks = [(d, scenario, s, args.pre_period_requests) for s in seeds]
                pairs = list(pool.map(run_one, tasks))
                print(f"  {scenario}:\n" + _line("raw", [p[0] for p in pairs]) + "\n" +
                      _line("CUPED", [p[1] for p in pairs]), flush=True)
    print(f"{time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
