"""Feed the analysis from what workers and bots recorded, keep the audit trail, apply decisions.

Outcomes are joined to the arm that answered through the experiment's journal
(request id → arm, predicted label, and in shadow mode the treatment's label).
Only matured outcomes count; a request without an outcome yet is not a failure.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import redis

from experiments.analysis import ArmData, Decision, analyze, planned_sample_size
from experiments.assignment import CONTROL, TREATMENT
from experiments.outcomes import Outcome, first_per_request
from experiments.store import Experiment, ExperimentStore
from protocol import keys
from protocol.values import text
from registry import Registry

if TYPE_CHECKING:
    from protocol.values import StreamRows

STREAM_PAGE = 10_000
DECISIONS_MAXLEN = 100_000  # analyses kept per experiment: a month of `watch` every 30 s


@dataclass
class Snapshot:
    """Both arms' data at one moment, and the outcome entries that were left out."""

    control: ArmData
    treatment: ArmData
    outcomes_malformed: int = 0
    outcomes_duplicate: int = 0
    records_malformed: int = 0  # counter, latency or journal values that did not parse


def _read_stream(client: redis.Redis, key: str, start: str = "-") -> list[dict[str, str]]:
    rows, cursor = [], start
    while True:
        page = cast("StreamRows", client.xrange(key, min=cursor, count=STREAM_PAGE))
        rows += [_text_fields(fields) for _, fields in page]
        if len(page) < STREAM_PAGE:
            return rows
        cursor = "(" + text(page[-1][0])


def _text_fields(fields: dict[bytes, bytes]) -> dict[str, str]:
    # Undecodable bytes become U+FFFD, so the entry fails validation instead of the whole read.
    return {_lenient(k): _lenient(v) for k, v in fields.items()}


def _floats(values: Iterable[bytes | str]) -> tuple[list[float], int]:
    """The finite numbers among ``values``, and how many were not."""
    parsed, bad = [], 0
    for v in values:
        try:
            number = float(v)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            parsed.append(number)
        else:
            bad += 1
    return parsed, bad


def _counts(raw: dict) -> tuple[dict[str, int], int]:
    """The experiment's counters; a value that is not a whole number is left out and counted."""
    lenient = {_lenient(k): _lenient(v) for k, v in raw.items()}
    counts = {k: int(v) for k, v in lenient.items() if v.isascii() and v.isdigit() and len(v) <= 18}
    return counts, len(raw) - len(counts)


def _lenient(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _arm_data(client: redis.Redis, e: Experiment, arm: str, counts: dict[str, int]) -> tuple[ArmData, int]:
    latencies, bad = _floats(client.lrange(keys.experiment_latency(e.model, e.id, arm), 0, -1))
    return ArmData(exposures=counts.get(f"{arm}:requests", 0),
                   errors=sum(n for k, n in counts.items() if k.startswith(f"{arm}:errors:")),
                   latencies_ms=latencies), bad


def snapshot(client: redis.Redis, e: Experiment) -> Snapshot:
    """Exposures, errors, latency samples and matured outcomes per arm (first outcome per request)."""
    counts, bad = _counts(client.hgetall(keys.experiment_counts(e.model, e.id)))
    arms: dict[str, ArmData] = {}
    for arm in (CONTROL, TREATMENT):
        arms[arm], bad_latencies = _arm_data(client, e, arm, counts)
        bad += bad_latencies
    journal = {j.get("id", ""): j for j in _read_stream(client, keys.experiment_journal(e.model, e.id))}
    outcomes = first_per_request(
        _read_stream(client, keys.outcomes_stream(e.model), f"{int(e.created_at * 1000)}-0"))
    for outcome in outcomes.first.values():
        entry = journal.get(outcome.request_id)
        if entry is not None:
            bad += not _count_outcome(arms, entry, outcome, e.mode)
    return Snapshot(arms[CONTROL], arms[TREATMENT], outcomes.malformed, outcomes.duplicates, bad)


def _right(predicted: str, outcome: Outcome) -> bool | None:
    if outcome.label is not None and predicted:
        return predicted.split(",")[0] == outcome.label
    return outcome.correct


def _count_outcome(arms: dict[str, ArmData], entry: dict, outcome: Outcome, mode: str) -> bool:
    """Count one matured outcome for its arm; False if the journal entry is not one of ours."""
    arm = arms.get(entry.get("arm", ""))
    if arm is None:
        return False
    right = _right(entry.get("label", ""), outcome)
    if right is not None:
        arm.outcomes += 1
        arm.correct += right
    if outcome.pnl is not None:
        arm.pnl.append(outcome.pnl)
    if mode == "shadow" and "shadow_label" in entry and outcome.label is not None:
        treatment_right = entry["shadow_label"].split(",")[0] == outcome.label
        arms[TREATMENT].outcomes += 1
        arms[TREATMENT].correct += treatment_right
        if right is not None and right != treatment_right:  # discordant pair, for McNemar
            (arms[CONTROL] if right else arms[TREATMENT]).only_right += 1
    return True


def look_number(e: Experiment, data: Snapshot, planned_n: int) -> int:
    """Which planned look the data has reached (1 … planned_looks)."""
    done = min(data.control.outcomes, data.treatment.outcomes) / max(planned_n, 1)
    return max(1, min(e.planned_looks, math.floor(done * e.planned_looks)))


def run_analysis(client: redis.Redis, registry: Registry, model: str, *, apply: bool = False) -> Decision:
    """Analyze the model's experiment now, append the decision to its audit trail, maybe apply it."""
    store = ExperimentStore(client, registry)
    e = store.get(model)
    if e is None:
        raise ValueError(f"{model} has no experiment")
    data = snapshot(client, e)
    p_control = data.control.hit_rate if data.control.outcomes else 0.5
    planned_n = planned_sample_size(e, min(max(p_control, 0.05), 0.95 - e.min_effect_pp / 100))
    look = look_number(e, data, planned_n)
    earlier = [r.get("decision") for r in decisions(client, e) if r["look"] == look]
    earlier_at_look = ("PROMOTE" if "PROMOTE" in earlier else "NOT_CROSSED") if earlier else None
    decision = analyze(e, data.control, data.treatment, look, planned_n, earlier_at_look=earlier_at_look)
    record = decision.to_dict() | {"planned_n_per_arm": planned_n, "applied": apply}
    client.xadd(keys.experiment_decisions(model, e.id), {"record": json.dumps(record)},
                maxlen=DECISIONS_MAXLEN, approximate=False)
    if apply and e.status == "running":
        _apply(store, registry, e, decision)
    return decision


def _apply(store: ExperimentStore, registry: Registry, e: Experiment, decision: Decision) -> None:
    if decision.decision == "PROMOTE":
        registry.promote(e.model, e.treatment_version, reason=f"experiment {e.id}: {decision.reason}")
    if decision.decision in ("PROMOTE", "ROLLBACK", "HALT", "KEEP"):
        store.set_status(e.model, "stopped", reason=f"{decision.decision}: {decision.reason}")


def decisions(client: redis.Redis, e: Experiment) -> list[dict]:
    """The audit trail, oldest first (a record that does not parse is left out)."""
    records = []
    for row in _read_stream(client, keys.experiment_decisions(e.model, e.id)):
        try:
            record = json.loads(row.get("record", ""))
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("look"), int):
            records.append(record)
    return records
