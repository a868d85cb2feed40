"""Outcome entries as bots report them (docs/protocol.md §9), parsed as untrusted input.

An outcome names a request id and at least one of ``correct`` (``0``/``1``),
``label`` and ``pnl`` (a finite decimal). Anyone who may XADD can write here, so
a malformed entry is skipped and counted, never fatal, and a request's first
outcome is the one that counts: a bot that reports the same request 50 times
moves the analysis once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocol.errors import InvalidInput
from protocol.keys import check_request_id

MAX_LABEL_CHARS = 64


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened after one prediction."""

    request_id: str
    at_ms: int
    correct: bool | None = None
    label: str | None = None
    pnl: float | None = None


def parse(fields: dict[str, str]) -> Outcome:
    """One outcome entry; ``InvalidInput`` naming the first bad field."""
    request_id = check_request_id(fields.get("id", ""))
    at_ms = fields.get("at_ms", "")
    if not (at_ms.isascii() and at_ms.isdigit() and len(at_ms) <= 16):
        raise InvalidInput(f"outcome {request_id}: at_ms {at_ms[:32]!r} is not whole Unix milliseconds")
    correct = fields.get("correct")
    if correct not in (None, "0", "1"):
        raise InvalidInput(f"outcome {request_id}: correct must be 0 or 1")
    label = fields.get("label")
    if label is not None and not 0 < len(label) <= MAX_LABEL_CHARS:
        raise InvalidInput(f"outcome {request_id}: label must be 1-{MAX_LABEL_CHARS} characters")
    pnl = _pnl(request_id, fields.get("pnl"))
    if correct is None and label is None and pnl is None:
        raise InvalidInput(f"outcome {request_id}: needs correct, label or pnl")
    return Outcome(request_id, int(at_ms), None if correct is None else correct == "1", label, pnl)


def _pnl(request_id: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError as e:
        raise InvalidInput(f"outcome {request_id}: pnl {text[:32]!r} is not a number") from e
    if not math.isfinite(value):
        raise InvalidInput(f"outcome {request_id}: pnl must be finite")
    return value
