"""Experiment state in Redis: one experiment per model at a time, running, paused or stopped."""

from __future__ import annotations

import json
import math
import re
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import redis
from pydantic import TypeAdapter

from experiments.assignment import assign
from protocol import keys
from protocol.errors import RegistryError
from protocol.values import text, text_dict
from registry import Registry
from registry.rollout import publish_reload

if TYPE_CHECKING:
    from protocol.values import Fields, RawHash

_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")  # it becomes part of Redis keys
MODES = ("split", "shadow")
UNITS = ("route", "request_id")
PRIMARY_METRICS = ("hit_rate", "pnl")
STATUSES = ("running", "paused", "stopped")
MAX_LATENCY_RELATIVE = 10.0  # a relative latency margin above this is a percentage typed as a fraction


@dataclass(frozen=True)
class Margins:
    """Guardrails as non-inferiority margins: how much worse than control the treatment may be.

    ``pnl_per_trade`` is in the outcomes' P&L units; ``None`` means no margin: P&L
    only must not be *shown* worse (set one to require non-inferiority by an interval).
    The margin of the primary metric is not used: it must be shown better.

    The latency margin of a minute is the larger of ``latency_p95_ms`` and
    ``latency_p95_relative`` of control's p95 in that minute: a desk states a latency
    budget relative to what it has (+20 %), and the absolute floor keeps scheduling
    jitter of sub-millisecond models from reading as a regression.
    """

    latency_p95_ms: float = 0.5  # absolute floor of the latency margin, ms
    error_rate_pp: float = 0.5  # treatment error rate at most this many points above control's
    accuracy_pp: float = 5.0  # treatment hit rate at most this many points below control's
    pnl_per_trade: float | None = None
    latency_p95_relative: float = 0.2  # treatment p95 at most this fraction above control's, same minutes

    def latency_margin_ms(self, control_p95_ms: float) -> float:
        """How far above control's p95 (of the same minute) the treatment's p95 may be."""
        return max(self.latency_p95_ms, self.latency_p95_relative * control_p95_ms)

    def latency_text(self) -> str:
        """The latency margin in words, for status and analyze lines."""
        return f"max({self.latency_p95_ms:g} ms, {self.latency_p95_relative:.0%} of control's p95)"


@dataclass(frozen=True)
class Experiment:
    """An A/B or shadow test between two versions of one model."""

    id: str
    model: str
    control_version: int
    treatment_version: int
    treatment_share: float = 0.10
    mode: str = "split"
    unit: str = "route"
    salt: str = ""
    planned_looks: int = 40
    primary: str = "hit_rate"  # or "pnl": what PROMOTE must show better
    min_effect_pp: float = 2.0  # hit rate effect the design is powered for
    min_effect_pnl: float = 0.0  # P&L per trade effect the design is powered for (primary "pnl")
    alpha: float = 0.005
    power: float = 0.8
    label_horizon_s: float = 60.0  # an outcome is due this long after its request
    min_units_per_arm: int = 5  # randomisation units each arm needs before any decision but HALT
    margins: Margins = field(default_factory=Margins)
    status: str = "running"
    created_at: float = 0.0
    stopped_reason: str = ""

    def arm(self, route: str, request_id: str) -> str:
        """``control`` or ``treatment`` for a request (sticky per randomization unit)."""
        unit = route if self.unit == "route" and route else request_id
        return assign(self.salt, self.id, unit, self.treatment_share)

    def to_hash(self) -> Fields:
        """Redis hash fields."""
        data = asdict(self)
        data["margins"] = json.dumps(data["margins"])
        return {k: str(v) for k, v in data.items()}

    @classmethod
    def from_hash(cls, data: RawHash) -> Experiment:
        """Inverse of :meth:`to_hash`, type-checked and validated: ``RegistryError`` if malformed."""
        try:
            d = text_dict(data)
            values: dict[str, Any] = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
            values["margins"] = json.loads(values.get("margins", "{}"))
            experiment = _EXPERIMENT_ADAPTER.validate_python(values)
        except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError and ValidationError too
            summary = " ".join(str(e).splitlines()[:3])[:300]
            raise RegistryError(f"experiment hash is malformed: {summary}") from e
        _validate(experiment)
        return experiment


_EXPERIMENT_ADAPTER = TypeAdapter(Experiment)


class ExperimentStore:
    """Create, read and change experiments; validates versions against the registry."""

    def __init__(self, client: redis.Redis, registry: Registry) -> None:
        self.redis = client
        self.registry = registry

    def create(self, model: str, control_version: int, treatment_version: int, **options) -> Experiment:
        """Start an experiment; refused while another one of the model is running or paused."""
        current = self.get(model)
        if current is not None and current.status != "stopped":
            raise RegistryError(f"{model} already has experiment {current.id} ({current.status}); "
                                "stop it first")
        for version in (control_version, treatment_version):
            self.registry.get(model, version)  # raises if absent
        experiment = Experiment(uuid.uuid4().hex[:12], model, control_version, treatment_version,
                                salt=options.pop("salt", None) or secrets.token_hex(8),
                                created_at=time.time(), **options)
        _validate(experiment)
        # The index is another cluster slot: added first, outside the model's transaction.
        self.redis.sadd(keys.experiments_set(), model)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(keys.experiment_hash(model))
        pipe.hset(keys.experiment_hash(model), mapping=experiment.to_hash())
        pipe.execute()
        self._nudge(model)
        return experiment

    def get(self, model: str) -> Experiment | None:
        """The model's current or last experiment."""
        data = self.redis.hgetall(keys.experiment_hash(model))
        return Experiment.from_hash(data) if data else None

    def list(self) -> list[Experiment]:
        """The current or last experiment of every model that had one."""
        raw = self.redis.smembers(keys.experiments_set())
        models = sorted(text(m) for m in raw)
        return [e for e in (self.get(m) for m in models) if e is not None]

    def set_status(self, model: str, status: str, reason: str = "") -> Experiment:
        """Pause, resume (``running``) or stop; a stopped experiment stays stopped."""
        current = self.get(model)
        if current is None:
            raise RegistryError(f"{model} has no experiment")
        if status not in STATUSES or current.status == "stopped":
            raise RegistryError(f"cannot move experiment {current.id} from {current.status} to {status}")
        updated = replace(current, status=status, stopped_reason=reason if status == "stopped" else "")
        self.redis.hset(keys.experiment_hash(model), mapping=updated.to_hash())
        self._nudge(model)
        return updated

    def _nudge(self, model: str) -> None:
        """Workers re-read their model's state now rather than at the next reconcile."""
        publish_reload(self.redis, model, secret=self.registry.control_secret)


def _validate(e: Experiment) -> None:
    problems = []
    if not _ID.fullmatch(e.id):
        problems.append("id must be 1-64 of [A-Za-z0-9_-]")
    if e.mode not in MODES:
        problems.append(f"mode must be one of {MODES}")
    if e.unit not in UNITS:
        problems.append(f"unit must be one of {UNITS}")
    if not 0 < e.treatment_share < 1:
        problems.append("treatment_share must be in (0, 1)")
    if e.control_version == e.treatment_version:
        problems.append("control and treatment must be different versions")
    if e.status not in STATUSES:
        problems.append(f"status must be one of {STATUSES}")
    if e.planned_looks < 1 or not 0 < e.alpha < 0.5 or not 0 < e.power < 1:
        problems.append("planned_looks >= 1, 0 < alpha < 0.5, 0 < power < 1")
    problems += _design_problems(e)
    if problems:
        raise RegistryError("; ".join(problems))


def _design_problems(e: Experiment) -> list[str]:
    """What is wrong with the statistical design: primary metric, effect, horizon, units, margins."""
    problems = []
    if e.primary not in PRIMARY_METRICS:
        problems.append(f"primary must be one of {PRIMARY_METRICS}")
    effect_name = "min_effect_pnl" if e.primary == "pnl" else "min_effect_pp"
    if not (math.isfinite(getattr(e, effect_name)) and getattr(e, effect_name) > 0):
        problems.append(f"the primary metric's minimum effect ({effect_name}) must be > 0")
    if not (math.isfinite(e.label_horizon_s) and 0 < e.label_horizon_s <= 7 * 86400):
        problems.append("label_horizon_s must be in (0, 1 week]")
    if e.min_units_per_arm < 1:
        problems.append("min_units_per_arm must be >= 1")
    m = e.margins
    values = (m.latency_p95_ms, m.latency_p95_relative, m.error_rate_pp, m.accuracy_pp,
              m.pnl_per_trade or 0.0)
    if not all(math.isfinite(v) and v >= 0 for v in values):
        problems.append("margins must be finite and >= 0")
    if m.latency_p95_relative > MAX_LATENCY_RELATIVE:
        problems.append(f"latency_p95_relative must be at most {MAX_LATENCY_RELATIVE:g} "
                        "(a fraction of control's p95: 0.2 is 20 %)")
    return problems
