"""``make validate-stats``: simulate the promotion rule. Prints the rates it is judged by.

A/A (no effect) over 40 looks must promote in at most 1 % of experiments; a
true +2 pp hit-rate effect at the planned sample size must be promoted in at
least 75 %. Naive peeking (p < 0.05 at every look) is shown for contrast.
"""

from __future__ import annotations

import argparse
import sys

from experiments.stats import sample_size_two_proportions, simulate_promotions


def main(argv: list[str] | None = None) -> int:
    """Run both simulations; exit 1 if a target is missed."""
    parser = argparse.ArgumentParser(prog="python -m experiments.validate", description=__doc__)
    parser.add_argument("--sims", type=int, default=10_000)
    parser.add_argument("--looks", type=int, default=40)
    parser.add_argument("--alpha", type=float, default=0.005, help="one-sided, for promotion")
    parser.add_argument("--power", type=float, default=0.8)
    parser.add_argument("--p-control", type=float, default=0.55)
    parser.add_argument("--effect", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    n = sample_size_two_proportions(args.p_control, args.effect, alpha=args.alpha, power=args.power,
                                    looks=args.looks)
    common = {"looks": args.looks, "alpha": args.alpha, "sims": args.sims, "seed": args.seed}
    null = simulate_promotions(args.p_control, 0.0, n, **common)
    alt = simulate_promotions(args.p_control, args.effect, n, **common)
    print(f"planned sample size: {n} per arm ({args.looks} looks, one-sided alpha {args.alpha}, "
          f"power {args.power} for +{args.effect * 100:.1f} pp on {args.p_control:.0%})")
    print(f"A/A false promotions:    sequential {null['sequential']:.2%} (target <= 1%), "
          f"naive p<0.05 at every look {null['naive_peeking_p05']:.2%}")
    print(f"+{args.effect * 100:.1f} pp promoted:         sequential {alt['sequential']:.2%} (target >= 75%)")
    ok = null["sequential"] <= 0.01 and alt["sequential"] >= 0.75
    print("OK" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
