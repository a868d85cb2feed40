"""``make validate-stats``: the production decision rule, replayed on simulated trading days.

Every scenario simulates ``--sims`` experiments at the production design (90/10
split, SRM and every guardrail on, one analysis a minute for 260 minutes,
outcomes delayed, P&L fat-tailed, latency and errors measured) and drives
:func:`experiments.replay.replay`, the code path of ``experiment analyze``.
The trading days of :mod:`experiments.traffic_power` (6 to 430 requests/s, open/close
volume, drift, overlapping labels; replayed through ``experiment simulate``'s code
path) are scenarios too, ``--traffic-sims`` each.
Each rate is printed with a 95 % (Wilson) interval; exit 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import stats

from experiments import feasibility, plan, traffic_power
from experiments import stats as S
from experiments.data import Observations
from experiments.replay import replay
from experiments.store import Experiment

MINUTES = 260
RATE_PER_S = 9.0  # requests a second, both arms: the whole rule's plan is reached in about 190 minutes
COVERAGE_LOOKS = 200  # analyses of the error-rate coverage check
ERROR_RATE = 0.001
PNL_SD = 2.0 * math.sqrt(3.0)  # P&L is 2 × Student-t with 3 df: variance 3
TRAFFIC_RATES = (6.0, 30.0, 100.0, 430.0)  # requests a second, both arms
TRAFFIC_TARGETS = {"+2 pp": "promote>=80%", "A/A": "promote<=1%", "+3 pp, P&L -0.05 sd": "promote<=1%"}


@dataclass(frozen=True)
class Scenario:
    """One simulated world and the target it is judged by."""

    name: str
    target: str
    units: int = 0  # 0: every request is its own unit (randomised by request)
    unit_sd_pp: float = 0.0  # hit-rate spread between units
    effect_pp: float = 0.0
    pnl_treatment: float = 1.0  # mean P&L per trade (control's is 1.0)
    wrong_delay_s: float = 0.0  # extra delay of the treatment's wrong outcomes
    episode_s: float = 0.0  # request-randomised symbols whose labels overlap for this long
    latency_factor: float = 1.0  # the treatment's latency, a multiple of control's (3 ms median)


@dataclass(frozen=True)
class TrafficScenario:
    """A trading day of :mod:`experiments.traffic_power` at one traffic level."""

    name: str
    target: str
    rate_per_s: float
    world: str  # a key of traffic_power.SCENARIOS


SCENARIOS = (
    Scenario("A/A, 100 Zipf units, sd 3 pp, by unit", "promote<=1%,halt<=1%,rollback<=1%", units=100,
             unit_sd_pp=3.0),
    Scenario("A/A, i.i.d. requests", "promote<=1%,halt<=0.5%"),
    Scenario("A/A, by request, 40 symbols, 60 s overlapping labels", "promote<=1%,halt<=1%,rollback<=1%",
             units=40, episode_s=60.0),
    Scenario("+2 pp hit rate, P&L unchanged", "promote>=80%", effect_pp=2.0),
    Scenario("+3 pp hit rate, P&L 1 -> -2 per trade", "promote<=1%", effect_pp=3.0, pnl_treatment=-2.0),
    Scenario("-6 pp hit rate", "rollback>=90%,median_info<=0.334", effect_pp=-6.0),
    Scenario("A/A, treatment's wrong outcomes 30 min late", "promote<=1%", wrong_delay_s=1800.0),
    Scenario("+3 pp hit rate, P&L 0.05 sd lower", "promote<=1%", effect_pp=3.0,
             pnl_treatment=1.0 - 0.05 * PNL_SD),
    Scenario("+2 pp hit rate, treatment latency +30 %", "promote<=1%,rollback>=90%", effect_pp=2.0,
             latency_factor=1.3),
    Scenario("+2 pp hit rate, treatment latency +5 %", "promote>=80%", effect_pp=2.0, latency_factor=1.05),
)
AnyScenario = Scenario | TrafficScenario
TRAFFIC_SCENARIOS = tuple(TrafficScenario(f"{world} at {rate:g} req/s, trading day", target, rate, world)
                          for rate in TRAFFIC_RATES for world, target in TRAFFIC_TARGETS.items())


def experiment(scenario: Scenario) -> Experiment:
    """The production design: 90/10, 40 looks, 60 s label horizon, default margins."""
    unit = "route" if scenario.units and not scenario.episode_s else "request_id"
    return Experiment("validate", "m", 1, 2, treatment_share=0.10, unit=unit, label_horizon_s=60.0,
                      created_at=0.0)


def observations(s: Scenario, rng: np.random.Generator) -> Observations:
    """One simulated experiment: a table of exposures and outcomes, as a bot fleet would produce."""
    n = rng.poisson(RATE_PER_S * MINUTES * 60)
    t = np.sort(rng.uniform(0, MINUTES * 60, n))
    if s.units and not s.episode_s:  # randomised by unit (route), Zipf-weighted traffic
        weights = 1 / np.arange(1, s.units + 1)
        unit = rng.choice(s.units, n, p=weights / weights.sum())
        arm = (rng.random(s.units) < 0.10).astype(np.int8)[unit]
    else:  # randomised by request
        unit = np.arange(n)
        arm = (rng.random(n) < 0.10).astype(np.int8)
    correct = _correct(s, rng, t, unit, arm)
    delay = rng.uniform(5, 55, n) + s.wrong_delay_s * ((arm == 1) & (correct == 0))
    pnl = np.where(arm == 1, s.pnl_treatment, 1.0) + 2.0 * rng.standard_t(3, n)
    latency = rng.lognormal(math.log(3.0), 0.4, n) * np.where(arm == 1, s.latency_factor, 1.0)
    return Observations.build(t_s=t, unit=unit, arm=arm, error=rng.random(n) < ERROR_RATE, latency_ms=latency,
                              outcome_t_s=t + delay, correct=correct, pnl=pnl, start_s=0.0)


def _correct(s: Scenario, rng: np.random.Generator, t: np.ndarray, unit: np.ndarray,
             arm: np.ndarray) -> np.ndarray:
    n = len(t)
    p = 0.55 + s.effect_pp / 100 * (arm == 1)
    if s.units and not s.episode_s:
        p = p + rng.normal(0, s.unit_sd_pp / 100, s.units)[unit]
    own = (rng.random(n) < np.clip(p, 0, 1)).astype(float)
    if not s.episode_s:
        return own
    # Overlapping labels: a symbol's requests inside one episode share the label's fate.
    symbol = rng.integers(0, s.units, n)
    episode = symbol * (MINUTES * 60 // int(s.episode_s) + 1) + (t // s.episode_s).astype(np.int64)
    shared = rng.random(int(episode.max()) + 1) < 0.55
    return np.where(rng.random(n) < 0.7, shared[episode].astype(float), own)


def run_one(args: tuple[AnyScenario, int]) -> tuple[str, float, float]:
    """One simulated experiment → (final decision, information fraction at it, minute of it)."""
    scenario, seed = args
    if isinstance(scenario, TrafficScenario):
        return traffic_power.run_detail((scenario.rate_per_s, scenario.world, seed))
    e = experiment(scenario)
    decisions = replay(e, observations(scenario, np.random.default_rng(seed)), until_s=MINUTES * 60)
    last = decisions[-1]
    return last.decision, last.info_fraction, last.now_s / 60


def error_coverage(sims: int, seed: int) -> float:
    """Share of runs whose treatment error-rate sequence covers the true 0.1 % at every analysis."""
    rng = np.random.default_rng(seed)
    per_minute = RATE_PER_S * 60 * 0.10
    covered = 0
    for _ in range(sims):
        n = np.cumsum(rng.poisson(per_minute, COVERAGE_LOOKS))
        x = np.cumsum(rng.binomial(np.diff(n, prepend=0), ERROR_RATE))
        bounds = (S.bernoulli_confidence_sequence(int(a), int(b), 0.025) for a, b in zip(x, n, strict=True))
        covered += all(lo <= ERROR_RATE <= hi for lo, hi in bounds)
    return covered / sims


def _rate(k: int, n: int) -> str:
    ci = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
    return f"{k / n:6.2%} [{ci.low:.2%}, {ci.high:.2%}]"


def _meets(target: str, rates: dict[str, float]) -> bool:
    ok = True
    for clause in target.split(","):
        name, op, value = (clause.partition("<=") if "<=" in clause else clause.partition(">="))
        limit = float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
        ok &= rates[name] <= limit if op == "<=" else rates[name] >= limit
    return ok


def evaluate_scenario(s: AnyScenario, sims: int, seed: int, pool: Callable) -> tuple[bool, str]:
    """Run one scenario's simulations and format its line."""
    results = list(pool(run_one, [(s, seed * 1_000_003 + i) for i in range(sims)], chunksize=8))
    counts = Counter(d for d, _, _ in results)
    rollback_info = [f for d, f, _ in results if d == "ROLLBACK"]
    rates = {"promote": counts["PROMOTE"] / sims, "halt": counts["HALT"] / sims,
             "rollback": counts["ROLLBACK"] / sims,
             "median_info": float(np.median(rollback_info)) if rollback_info else math.inf}
    ok = _meets(s.target, rates)
    shown = "  ".join(f"{d.lower()} {_rate(counts[d], sims)}"
                      for d in ("PROMOTE", "HALT", "ROLLBACK", "KEEP"))
    extra = f"  rollback at median {rates['median_info']:.0%} of planned info" if rollback_info else ""
    return ok, f"{'ok  ' if ok else 'MISS'} {s.name:<52} target {s.target}\n       {shown}{extra}"


def main(argv: list[str] | None = None) -> int:
    """Run every scenario; print each rate with its 95 % interval; exit 1 if a target is missed."""
    parser = argparse.ArgumentParser(prog="python -m experiments.validate", description=__doc__)
    parser.add_argument("--sims", type=int, default=2000)
    parser.add_argument("--traffic-sims", type=int, default=400, help="simulated days per traffic scenario")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workers", type=int, default=0, help="processes (0: one per CPU)")
    parser.add_argument("--only", help="run the scenarios whose name contains this text")
    args = parser.parse_args(argv)
    design = experiment(SCENARIOS[0])
    planned = S.sample_size_two_proportions(0.55, 0.02, alpha=design.alpha, power=design.power, looks=40,
                                            treatment_share=0.10)
    factor = feasibility.planned_information(design, hit_rate=0.55) / (plan.ESTIMATED_VARIANCE_ALLOWANCE * (
        S.max_information(0.02, alpha=design.alpha, power=design.power, looks=40)))
    print(f"design: 90/10, 40 looks, one-sided alpha {design.alpha}, power {design.power} for +2 pp on 55 %: "
          f"{planned.treatment} treatment / {planned.control} control outcomes if independent for the "
          f"primary alone, {factor:.3g} times that for the whole rule (P&L within 0.05 sd, beta shared); "
          f"{MINUTES} analyses, {RATE_PER_S:g} requests/s, {args.sims} simulations each")
    print(f"trading days ({traffic_power.DAY_MINUTES} min, 90/10 by request, {args.traffic_sims} each) at "
          f"{', '.join(f'{r:g}' for r in TRAFFIC_RATES)} requests/s: experiments.traffic_power's world")
    ok = True
    every: tuple[AnyScenario, ...] = (*SCENARIOS, *TRAFFIC_SCENARIOS)
    scenarios = [(s, args.traffic_sims if isinstance(s, TrafficScenario) else args.sims)
                 for s in every if not args.only or args.only in s.name]
    with ProcessPoolExecutor(args.workers or None) as executor:
        for s, sims in scenarios:
            passed, line = evaluate_scenario(s, sims, args.seed, executor.map)
            ok &= passed
            print(line, flush=True)
    if not args.only or "error" in args.only:
        coverage = error_coverage(args.sims, args.seed)
        ok &= coverage >= 0.975
        print(f"{'ok  ' if coverage >= 0.975 else 'MISS'} error-rate confidence sequence at 0.1 %, "
              f"{COVERAGE_LOOKS} looks: coverage {_rate(round(coverage * args.sims), args.sims)} "
              "(target >= 97.5%)")
    print("OK" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
