"""Deterministic, sticky assignment of a randomization unit to an arm.

A salted hash of (experiment id, unit) picks one of 10,000 buckets; the first
``treatment_share`` of them go to the treatment. The same symbol therefore
always sees the same arm for the life of the experiment, different salts give
independent assignments, and the realized split tracks the configured one.
"""

from __future__ import annotations

import hashlib

BUCKETS = 10_000
CONTROL, TREATMENT = "control", "treatment"


def bucket(salt: str, experiment_id: str, unit: str) -> int:
    """The unit's bucket in [0, BUCKETS)."""
    digest = hashlib.sha256(f"{salt}\x1f{experiment_id}\x1f{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def assign(salt: str, experiment_id: str, unit: str, treatment_share: float) -> str:
    """``control`` or ``treatment`` for this unit, the same every time."""
    return TREATMENT if bucket(salt, experiment_id, unit) < round(treatment_share * BUCKETS) else CONTROL
