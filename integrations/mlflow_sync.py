"""Keep an MLflow registered model's aliases in step with the registry's stages, both ways.

The registry here is the source of truth for stages: only it knows whether the fleet
could load and serve a version. Each pass (:func:`sync_once`):

1. An alias of :data:`STAGE_ALIASES` that a person moved in MLflow (it differs from
   where the last pass pointed it, recorded in the registered model's tag
   ``streamserve.alias.<alias>``) is a request: the version is imported if needed and
   promoted through the normal path (:func:`promote_checked`: for Production, the
   fleet's acknowledgement with the golden check, and a rollback when it fails).
   A request that cannot be applied is refused with the tag ``streamserve.refused``
   on that MLflow version saying why.
2. Our stages are mirrored: ``production`` and ``champion`` name our Production
   version, ``staging`` and ``challenger`` our Staging one (exported first if MLflow
   does not have it), so a refused request's alias moves back.
3. Our history since the last pass (promotions, rollbacks, experiment decisions) is
   written on the MLflow versions as the tags ``streamserve.stage`` and
   ``streamserve.last_change``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from integrations.mlflow_registry import (
    OUR_STAGE,
    STAGE_ALIASES,
    STATE_TAG,
    MlflowRegistryError,
    export_version,
    import_version,
    mlflow_version_of,
    point_aliases,
)
from protocol.errors import RegistryError, StreamserveError
from protocol.presence import DEFAULT_TTL_S
from registry.rollout import wait_for_fleet
from registry.store import PRIMARY, ModelVersion, Registry

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import RegisteredModel

ALIAS_STAGE = {alias: stage for stage, aliases in STAGE_ALIASES.items() for alias in aliases}
HISTORY_TAG = "streamserve.history_ms"  # on the registered model: the last history entry mirrored
REFUSED_TAG, APPLIED_TAG = "streamserve.refused", "streamserve.applied"
FLEET_TAG, LAST_CHANGE_TAG = "streamserve.fleet", "streamserve.last_change"
MAX_TAG_CHARS = 500


@dataclass
class SyncReport:
    """What one pass did, one line per change; ``refused``: the requests it could not apply."""

    lines: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Pass:
    registry: Registry
    client: MlflowClient
    name: str
    target: str  # the MLflow registered model
    tracking_uri: str
    fleet_timeout_s: float
    ttl_s: float


def promote_checked(registry: Registry, mv: ModelVersion, stage: str, *, reason: str,
                    fleet_timeout_s: float, ttl_s: float = DEFAULT_TTL_S) -> tuple[str, str]:
    """Promote as ``registry promote --wait --rollback-on-failure`` does: (what happened, fleet note).

    Production: every live worker must load the version, reproduce its golden outputs and serve
    it within ``fleet_timeout_s``; if one fails (or serves it only through a fallback, or has not
    switched by then), the previous Production is restored and ``MlflowRegistryError`` says why.
    With no live worker there is nothing to acknowledge: the promotion stands (a worker that
    starts later loads Production from the registry and runs the golden check before serving).
    Staging: refused for the version in Production (it would demote it).
    """
    if mv.stage == stage:
        return f"{mv.name} {mv.title} is already in {stage}", ""
    if stage != "Production":
        if mv.stage == "Production":
            raise MlflowRegistryError(f"{mv.name} {mv.title} is in Production here; moving it to {stage} "
                                      "would leave no Production: promote another version first")
        registry.promote(mv.name, mv.version, stage, reason=reason)
        return f"{mv.name} {mv.title} moved to {stage}", ""
    previous = _production(registry, mv.name)
    promoted = registry.promote(mv.name, mv.version, "Production", reason=reason, allow_archived=True)
    report = wait_for_fleet(registry.redis, mv.name, mv.version, timeout_s=fleet_timeout_s, ttl_s=ttl_s,
                            variant=promoted.serving_variant or PRIMARY, label=promoted.label)
    if not (report.switched or report.failed or report.pending or report.fallback or report.unloaded):
        return f"{mv.name} {mv.title} promoted to Production", "no live worker: nothing to acknowledge yet"
    if report.ok:
        return f"{mv.name} {mv.title} promoted to Production", report.lines()[-1]
    _undo(registry, mv, previous, report.lines()[-1])
    back = registry.title(mv.name, previous) if previous is not None else "no Production version"
    raise MlflowRegistryError(f"the fleet did not serve {mv.name} {mv.title} ({report.lines()[-1]}); "
                              f"back to {back}")


def _production(registry: Registry, name: str) -> int | None:
    try:
        return registry.production(name).version
    except RegistryError:
        return None


def _undo(registry: Registry, mv: ModelVersion, previous: int | None, why: str) -> None:
    reason = f"automatic rollback: {mv.title} not served: {why}"[:MAX_TAG_CHARS]
    if previous is not None and previous != mv.version:
        registry.promote(mv.name, previous, "Production", allow_archived=True, reason=reason)
    else:
        registry.promote(mv.name, mv.version, "Staging", reason=reason)


def registered_model(client: MlflowClient, mlflow_name: str) -> RegisteredModel:
    """The registered model, created if MLflow has none of that name."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(mlflow_name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    client.create_registered_model(mlflow_name)
    return client.get_registered_model(mlflow_name)


def human_moves(model: RegisteredModel) -> list[tuple[str, str]]:
    """(alias, version) for each stage alias that points elsewhere than the last pass left it."""
    aliases: dict[str, Any] = dict(model.aliases or {})
    tags: dict[str, str] = dict(model.tags or {})
    return [(alias, str(aliases[alias])) for alias in ALIAS_STAGE
            if alias in aliases and str(aliases[alias]) != tags.get(STATE_TAG + alias)]


def sync_once(registry: Registry, client: MlflowClient, name: str, *, tracking_uri: str,
              mlflow_name: str | None = None, fleet_timeout_s: float = 60.0,
              ttl_s: float = DEFAULT_TTL_S) -> SyncReport:
    """One pass: apply the aliases people moved in MLflow, then mirror our stages and history there."""
    run = _Pass(registry, client, name, mlflow_name or name, tracking_uri, fleet_timeout_s, ttl_s)
    report = SyncReport()
    for alias, version in human_moves(registered_model(client, run.target)):
        _apply(run, alias, version, report)
    _mirror_stages(run, client.get_registered_model(run.target), report)
    _mirror_history(run, client.get_registered_model(run.target), report)
    return report


def _apply(run: _Pass, alias: str, version: str, report: SyncReport) -> None:
    from mlflow.exceptions import MlflowException

    stage = ALIAS_STAGE[alias]
    what = f"MLflow alias {alias} → version {version}"
    try:
        mv = import_version(run.registry, run.client, f"models:/{run.target}/{version}",
                            tracking_uri=run.tracking_uri, as_name=run.name).version
        done, fleet = promote_checked(run.registry, mv, stage, reason=f"{what} (moved in MLflow)",
                                      fleet_timeout_s=run.fleet_timeout_s, ttl_s=run.ttl_s)
    # Import refusals, contract and integrity errors, refused promotions; and a version MLflow cannot
    # serve (its artifacts deleted, a bad run): refused and tagged, so the pass goes on to the others.
    except (StreamserveError, MlflowException, OSError) as e:
        message = f"{what}: not applied: {' '.join(str(e).split())}"[:MAX_TAG_CHARS]
        _tag_version(run, version, {REFUSED_TAG: message})
        report.refused.append(message)
        report.lines.append(f"refused {message}")
        return
    _tag_version(run, version, {APPLIED_TAG: f"{what}: {done}"[:MAX_TAG_CHARS],
                                **({FLEET_TAG: fleet[:MAX_TAG_CHARS]} if fleet else {})})
    report.lines.append(f"applied {what}: {done}" + (f"; fleet: {fleet}" if fleet else ""))


def _tag_version(run: _Pass, version: str, tags: dict[str, str]) -> bool:
    """Set tags on an MLflow version; False if MLflow no longer has it (deleted there)."""
    from mlflow.exceptions import MlflowException

    try:
        for key, value in tags.items():
            run.client.set_model_version_tag(run.target, version, key, value)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False
    return True


def _in_stage(registry: Registry, name: str, stage: str) -> ModelVersion | None:
    """Our version in ``stage``: the Production one, or the one most recently moved to Staging."""
    staged = {mv.version: mv for mv in registry.versions(name) if mv.stage == stage}
    if not staged:
        return None
    for change in reversed(registry.history(name)):
        if change.kind == "stage" and change.target == stage and change.version in staged:
            return staged[change.version]
    return staged[max(staged)]


def _mirror_stages(run: _Pass, model: RegisteredModel, report: SyncReport) -> None:
    aliases: dict[str, Any] = dict(model.aliases or {})
    tags: dict[str, str] = dict(model.tags or {})
    for stage, names in STAGE_ALIASES.items():
        mv = _in_stage(run.registry, run.name, stage)
        if mv is None:
            _drop_aliases(run, [a for a in names if a in aliases], tags, stage, report)
            continue
        mv, version, created = export_version(run.registry, run.client, run.name, mv.version,
                                              tracking_uri=run.tracking_uri, mlflow_name=run.target)
        if created:
            report.lines.append(f"exported {run.name} {mv.title} as MLflow version {version}")
        stale = [a for a in names if str(aliases.get(a)) != version or tags.get(STATE_TAG + a) != version]
        if stale and not created:  # an export points them itself
            point_aliases(run.client, run.target, stage, version, only=stale)
            report.lines.append(f"{', '.join(stale)} → MLflow version {version} "
                                f"({run.name} {mv.title}, {stage})")


def _drop_aliases(run: _Pass, aliases: list[str], tags: dict[str, str], stage: str,
                  report: SyncReport) -> None:
    for alias in aliases:
        run.client.delete_registered_model_alias(run.target, alias)
        if STATE_TAG + alias in tags:
            run.client.delete_registered_model_tag(run.target, STATE_TAG + alias)
    if aliases:
        report.lines.append(f"removed {', '.join(aliases)}: {run.name} has no version in {stage}")


def _mirror_history(run: _Pass, model: RegisteredModel, report: SyncReport) -> None:
    raw = dict(model.tags or {}).get(HISTORY_TAG, "0")
    since = int(raw) if raw.isdigit() else 0
    changes = [c for c in run.registry.history(run.name) if c.at_ms > since]
    latest = {c.version: c for c in changes}  # the last change of each version
    for number, change in latest.items():
        try:
            mv = run.registry.get(run.name, number)
        except RegistryError:  # deleted here since
            continue
        version = mlflow_version_of(mv, run.target)
        if version is None:
            continue
        when = dt.datetime.fromtimestamp(change.at_ms / 1000, dt.UTC).isoformat(timespec="seconds")
        note = f"{when} {change.kind} {change.source} → {change.target} by {change.who}: {change.reason}"
        if _tag_version(run, version, {OUR_STAGE: mv.stage, LAST_CHANGE_TAG: note[:MAX_TAG_CHARS]}):
            report.lines.append(f"MLflow version {version}: {OUR_STAGE}={mv.stage} "
                                f"({change.kind} {change.target})")
    if changes:
        run.client.set_registered_model_tag(run.target, HISTORY_TAG, str(changes[-1].at_ms))
