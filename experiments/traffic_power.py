"""Power and false PROMOTE by traffic: the by-request design replayed through ``experiment simulate``.

``python -m experiments.traffic_power --rates 6,30,100,430 --sims 200`` simulates trading days at
the production design (90/10 by request, 40 looks, one-sided alpha 0.005, 60 s label horizon,
default margins) and replays each through :func:`experiments.simulate.simulate`, which stops at
the first decision other than CONTINUE. A day: 390 minutes of Poisson traffic with three times
the volume at the open and the close, 40 Zipf-weighted symbols with hit-rate offsets (sd 5 pp),
a time-of-day drift of ±8 pp, half of the outcomes shared by a symbol's requests of the same
minute (overlapping labels), outcomes 5–55 s late, P&L Student-t with 2.5 df, 0.1 % errors.
Scenarios per rate: +2 pp (power), A/A (false PROMOTE) and +3 pp with P&L 0.05 sd lower (a
model that wins trades but loses money: false PROMOTE). Each rate gets a 95 % Wilson interval.
A day is cut short once the plan is long reached, to keep the run short: 2.5 × the time the
planned information takes at that rate, at least 15 minutes.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from scipy import stats

from experiments.data import Observations
from experiments.simulate import experiment_for, simulate

DAY_MINUTES = 390
PLANNED_REQUESTS = 95_000  # about what the +2 pp plan needs at 90/10, with the variance allowance
PNL_SD = 2 * np.sqrt(2.5 / 0.5)  # 2 × Student-t with 2.5 df
OTHERS = ("ROLLBACK", "KEEP", "HALT", "CONTINUE")
SCENARIOS = {"+2 pp": (2.0, 0.0), "A/A": (0.0, 0.0), "+3 pp, P&L -0.05 sd": (3.0, -0.05)}


def volume(t: np.ndarray) -> np.ndarray:
    """Relative request rate over the day: 3 × at the open and the close, 1 × at midday."""
    u = t / (DAY_MINUTES * 60)
    return 1 + 2 * ((1 - u) ** 8 + u ** 8)


def day(rate_per_s: float, effect_pp: float, pnl_sd_effect: float, seed: int, minutes: int) -> Observations:
    """One simulated trading day's exposures by request, at ``rate_per_s`` on average."""
    rng = np.random.default_rng(seed)
    span_s, peak = minutes * 60, 3.0
    mean = float(np.mean(volume(np.linspace(0, DAY_MINUTES * 60, 1000))))
    t = np.sort(rng.uniform(0, span_s, rng.poisson(rate_per_s / mean * peak * span_s)))
    t = t[rng.random(len(t)) < volume(t) / peak]  # thinning: an inhomogeneous Poisson process
    n = len(t)
    arm = (rng.random(n) < 0.1).astype(np.int8)
    zipf = 1 / np.arange(1, 41)
    symbol = rng.choice(40, n, p=zipf / zipf.sum())
    offset = rng.normal(0, 0.05, 40)
    drift = 0.08 * np.sin(2 * np.pi * t / (DAY_MINUTES * 60))
    own = rng.random(n) < np.clip(0.55 + drift + offset[symbol], 0, 1)
    episode = symbol * (minutes + 1) + (t // 60).astype(np.int64)
    shared = rng.random(40 * (minutes + 1)) < 0.55 + np.repeat(offset, minutes + 1)
    correct = np.where(rng.random(n) < 0.5, shared[episode], own).astype(float)
    # The treatment turns a wrong answer right often enough to add effect_pp to its hit rate.
    correct[(arm == 1) & (correct == 0) & (rng.random(n) < effect_pp / 100 / 0.45)] = 1.0
    pnl = 1 + 2 * rng.standard_t(2.5, n) + pnl_sd_effect * PNL_SD * arm
    return Observations.build(t_s=t, unit=np.arange(n), arm=arm, outcome_t_s=t + rng.uniform(5, 55, n),
                              correct=correct, pnl=pnl, latency_ms=rng.lognormal(np.log(3), 0.4, n),
                              error=rng.random(n) < 0.001, start_s=0.0)


def run_one(args: tuple[float, str, int]) -> tuple[str, float]:
    """One day → (first decision other than CONTINUE, or CONTINUE at its end; its minute)."""
    decision, _, minute = run_detail(args)
    return decision, minute


def run_detail(args: tuple[float, str, int]) -> tuple[str, float, float]:
    """One day → (first decision other than CONTINUE, or CONTINUE at its end; information fraction
    and minute at it): what ``make validate-stats`` reads of a trading day."""
    rate, scenario, seed = args
    minutes = int(min(DAY_MINUTES, max(15, PLANNED_REQUESTS / rate / 60 * 2.5)))
    obs = day(rate, *SCENARIOS[scenario], seed, minutes)
    e = experiment_for(obs, treatment_share=0.1, unit="request_id", label_horizon_s=60.0)
    last = simulate(e, obs, 60.0)[-1]
    return last.decision, last.info_fraction, last.now_s / 60


def wilson_rate(k: int, n: int) -> str:
    """`k/n = share [95 % Wilson interval]`."""
    ci = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
    return f"{k}/{n} = {k / n:.1%} [{ci.low:.1%}, {ci.high:.1%}]"


def main(argv: list[str] | None = None) -> int:
    """Print, per rate and scenario, PROMOTE's rate with its interval and the other decisions."""
    parser = argparse.ArgumentParser(prog="python -m experiments.traffic_power", description=__doc__)
    parser.add_argument("--rates", default="6,30,100,430", help="requests per second, comma-separated")
    parser.add_argument("--sims", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workers", type=int, default=0, help="processes (0: one per CPU)")
    parser.add_argument("--only", help="run the scenarios whose name contains this text")
    args = parser.parse_args(argv)
    with ProcessPoolExecutor(args.workers or None) as pool:
        for rate in (float(r) for r in args.rates.split(",")):
            for name in (s for s in SCENARIOS if not args.only or args.only in s):
                seeds = [args.seed * 1_000_003 + 1000 * int(rate) + i for i in range(args.sims)]
                results = list(pool.map(run_one, [(rate, name, s) for s in seeds], chunksize=4))
                decided = [d for d, _ in results]
                others = ", ".join(f"{k} {decided.count(k)}" for k in OTHERS)
                promote = wilson_rate(decided.count("PROMOTE"), args.sims)
                print(f"{rate:g} req/s, {name}: PROMOTE {promote}; {others}; "
                      f"median minute {np.median([m for _, m in results]):.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
