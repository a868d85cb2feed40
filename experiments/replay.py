"""Replay observations through the live decision rule, one analysis at a time.

This is the code path ``streamserve experiment analyze`` takes, minus Redis: the
same :func:`experiments.analysis.decide` on the same summaries, with each look's
boundary tested once. Used by ``experiment simulate`` and ``make validate-stats``.
"""

from __future__ import annotations

from experiments.analysis import Decision, decide
from experiments.data import Observations
from experiments.store import Experiment
from experiments.summary import Accumulator

FINAL = ("PROMOTE", "ROLLBACK", "HALT", "KEEP")


def replay(e: Experiment, obs: Observations, *, every_s: float = 60.0, until_s: float | None = None,
           stop: bool = True) -> list[Decision]:
    """Analyse ``obs`` every ``every_s`` from its start until ``until_s`` (default: its last outcome is due).

    With ``stop`` the replay ends at the first decision other than CONTINUE, as
    ``experiment watch --apply`` would.
    """
    accumulator = Accumulator(e, obs)
    last_s = float(obs.t_s[-1]) if len(obs) else obs.start_s
    end = until_s if until_s is not None else last_s + e.label_horizon_s
    history: list[dict] = []
    decisions: list[Decision] = []
    now = obs.start_s + every_s
    while now <= end + 1e-9:
        decision = decide(e, accumulator.advance(now), history)
        decisions.append(decision)
        history.append(decision.memo())
        if stop and decision.decision in FINAL:
            break
        now += every_s
    return decisions
