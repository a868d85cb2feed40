"""Model registry in Redis hashes: versions, stages, aliases, history, artifacts.

Every stage or alias change is appended to the model's history stream (who,
when, from, to, reason), so "what was in Production at time T" has an answer.
A promotion to Production also publishes a reload command on the control
channel; the registry hash stays the truth for workers that missed it.
"""

from __future__ import annotations

import getpass
import io
import json
import re
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import numpy as np
import redis
from pydantic import AfterValidator, Field, StringConstraints, TypeAdapter, ValidationError
from typing_extensions import TypedDict  # pydantic validates typing's own only from Python 3.12

from protocol import codec, control, keys
from protocol.errors import RegistryError
from protocol.values import text, text_dict
from registry import artifacts
from registry.rollout import publish_reload

if TYPE_CHECKING:
    from protocol.values import Fields, RawHash, StreamRows

STAGES = ("None", "Staging", "Production", "Archived")
FORMATS = ("onnx", "torch_export")
PRIMARY = "primary"  # the variant name of a version's registered artifact
HISTORY_MAXLEN = 100_000  # stage and alias changes kept per model: decades of releases
# Allowed stage moves; Archived → Production is a rollback and must be asked for.
TRANSITIONS = {
    "None": {"Staging", "Production", "Archived"},
    "Staging": {"None", "Production", "Archived"},
    "Production": {"Staging", "Archived"},
    "Archived": {"Staging"},
}
_JSON_FIELDS = ("input_spec", "output_names", "labels", "metrics", "tags", "alternates", "output_spec")
# A version label ("1.1.0", "2026-03-rc1"): what a model name may be, plus "+" (semver build metadata).
LABEL_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.+\-]{0,63}"
_LABEL = re.compile(LABEL_PATTERN)
MAX_OUTPUTS = 64


def _wire_dtype(value: str) -> str:
    if value not in codec.DTYPES:
        raise ValueError(f"dtype {value[:32]!r} is not a wire dtype")
    return value


class OutputField(TypedDict):
    """One output of a version: wire dtype, per-sample shape, and whether it holds class probabilities."""

    dtype: Annotated[str, AfterValidator(_wire_dtype)]
    shape: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=codec.MAX_NDIM - 1)]
    kind: Literal["probabilities", "value"]


OutputSpec = Annotated[dict[str, OutputField], Field(max_length=MAX_OUTPUTS)]


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model, as stored in its registry hash."""

    name: str
    version: int
    stage: str
    format: str
    artifact: str
    sha256: str
    size_bytes: int
    input_spec: dict[str, dict[str, Any]]
    output_names: list[str]
    labels: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""
    created_at: float = 0.0
    golden: str = ""
    golden_sha256: str = ""
    golden_atol: float = 1e-4
    # variant name → {artifact, sha256, size_bytes, format, …}: torch fallback, optimized builds
    alternates: dict[str, dict[str, Any]] = field(default_factory=dict)
    serving_variant: str = ""  # "" = the primary artifact
    # A human label, unique among the model's versions ("" = none); resolves like a version number.
    label: Annotated[str, StringConstraints(pattern=f"^(|{LABEL_PATTERN})$")] = ""
    # output name → {dtype, shape (per sample), kind}; {} for versions registered without a check
    output_spec: OutputSpec = field(default_factory=dict)

    @property
    def load_order(self) -> list[str]:
        """Variants a worker tries: the selected one, the primary, then the rest (fallbacks)."""
        order = [self.serving_variant] if self.serving_variant else []
        return order + [v for v in (PRIMARY, *self.alternates) if v not in order]

    def variant_format(self, variant: str) -> str:
        """The artifact format of a variant."""
        if variant == PRIMARY:
            return self.format
        return self.alternates[variant].get("format", variant)

    def to_hash(self) -> Fields:
        """The Redis hash fields (JSON for structured values)."""
        data = asdict(self)
        return {k: json.dumps(v) if k in _JSON_FIELDS else str(v) for k, v in data.items()}

    @classmethod
    def from_hash(cls, data: RawHash) -> ModelVersion:
        """Inverse of :meth:`to_hash`, every field type-checked; fields added later take their defaults.

        The hash comes from Redis, so it is untrusted: anything malformed raises
        ``RegistryError`` naming the field, never a bare ``ValueError`` or ``KeyError``.
        """
        fields = {k.decode(errors="replace") if isinstance(k, bytes) else k: v for k, v in data.items()}
        where = f"{fields.get('name', b'?')!r} v{fields.get('version', b'?')!r}"[:100]
        try:
            known = {f for f in cls.__dataclass_fields__}
            values: dict[str, Any] = {k: json.loads(text(v)) if k in _JSON_FIELDS else text(v)
                                      for k, v in fields.items() if k in known}
            mv = _VERSION_ADAPTER.validate_python(values)
        except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError and ValidationError too
            raise RegistryError(f"registry hash of {where} is malformed: {_first_line(e)}") from e
        return mv

    @property
    def title(self) -> str:
        """``v3 (1.1.0)``, or ``v3`` without a label: how commands name the version."""
        return version_title(self.version, self.label)

    def __repr__(self) -> str:
        return f"ModelVersion({self.name} {self.title} {self.stage} {self.format} {self.sha256[:10]})"


def version_title(version: int | None, label: str = "") -> str:
    """``v3 (1.1.0)``, ``v3`` without a label, ``none`` without a version."""
    if version is None:
        return "none"
    return f"v{version} ({label})" if label else f"v{version}"


@dataclass(frozen=True)
class Change:
    """One history entry."""

    at_ms: int
    kind: str  # "stage" | "alias" | "delete"
    version: int
    source: str
    target: str
    who: str
    reason: str


_VERSION_ADAPTER = TypeAdapter(ModelVersion)


def _first_line(error: Exception) -> str:
    """A validation error's summary, bounded: hostile values must not flood logs and heartbeats."""
    lines = str(error).splitlines()
    return " ".join(lines[:3])[:300]


def default_actor() -> str:
    """``user@host``, recorded in the history when no one is named."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


class Registry:
    """Register, look up, stage, alias and delete model versions."""

    def __init__(self, client: redis.Redis, artifact_dir: Path, *, actor: str | None = None,
                 control_secret: control.Secret | None = None) -> None:
        self.redis = client
        self.artifact_dir = Path(artifact_dir)
        self.actor = actor or default_actor()
        self.control_secret = control_secret  # signs the reloads it publishes (docs/security.md)

    # ---- versions ------------------------------------------------------------------------

    def register(
        self, name: str, source: Path, *, input_spec: dict[str, dict[str, Any]],
        output_names: list[str], labels: list[str] | None = None, fmt: str = "onnx",
        metrics: dict[str, float] | None = None, description: str = "",
        tags: dict[str, str] | None = None, golden: dict[str, np.ndarray] | None = None,
        golden_atol: float = 1e-4, alternates: dict[str, Path] | None = None,
        label: str | None = None, output_spec: dict[str, dict[str, Any]] | None = None,
    ) -> ModelVersion:
        """Copy the artifact (and golden inputs/outputs) into the store; new version in ``None``.

        ``golden`` maps ``input:<name>`` and ``output:<name>`` to arrays; a worker
        refuses to serve the version unless it reproduces the outputs within ``golden_atol``.
        ``label`` (e.g. ``1.1.0``) must be unused among the model's versions. Nothing here runs
        the model: ``registry.contract.register_onnx`` checks an ONNX model and its spec first.
        """
        keys.check_model_name(name)
        for f in (fmt, *(alternates or {})):
            if f not in FORMATS:
                raise RegistryError(f"unsupported format {f!r}; supported: {FORMATS}")
        self.check_label(name, label)
        outputs = _checked_output_spec(output_spec or {})
        relative, sha256, size = artifacts.store(Path(source), self.artifact_dir)
        stored = {f: self._artifact_record(Path(p), f) for f, p in (alternates or {}).items()}
        golden_rel, golden_sha = self._store_golden(golden) if golden else ("", "")
        mv = ModelVersion(
            name, 0, "None", fmt, relative, sha256, size, input_spec, list(output_names),
            list(labels or []), dict(metrics or {}), dict(tags or {}), description, time.time(),
            golden_rel, golden_sha, golden_atol, stored, label=label or "", output_spec=outputs,
        )
        # The index is another cluster slot, so it is not in the model's transaction: added first,
        # a crash in between lists a model with no version (harmless), never hides one.
        self.redis.sadd(keys.models_set(), name)
        return self._insert(mv)

    def _insert(self, template: ModelVersion) -> ModelVersion:
        """Number the version and write it, with its label claimed, in one transaction.

        Under WATCH of the model hash and the label index: two registrations never get one
        number, and of two claiming one label, the second is refused.
        """
        name, label = template.name, template.label
        model_key, labels_key = keys.model_hash(name), keys.labels_hash(name)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(model_key, labels_key)
                    if label and pipe.hexists(labels_key, label):
                        raise RegistryError(f"model {name!r} already has a version labelled {label!r}")
                    mv = replace(template, version=_latest(name, pipe.hget(model_key, "latest_version")) + 1)
                    pipe.multi()
                    pipe.hset(model_key, "latest_version", str(mv.version))
                    pipe.hset(keys.version_hash(name, mv.version), mapping=mv.to_hash())
                    pipe.hsetnx(model_key, "created_at", str(mv.created_at))
                    if label:
                        pipe.hset(labels_key, label, str(mv.version))
                    pipe.execute()
                    return mv
                except redis.WatchError:
                    continue

    def check_label(self, name: str, label: str | None) -> None:
        """``RegistryError`` unless ``label`` is None, or a well-formed label no version of ``name`` has."""
        if label is None:
            return
        if not isinstance(label, str) or not _LABEL.fullmatch(label):
            raise RegistryError(f"invalid label {str(label)[:70]!r}: use [A-Za-z0-9_.+-], at most 64 chars, "
                                "starting with a letter or digit")
        if label.isdigit() or label == "production":
            raise RegistryError(f"label {label!r} would read as a version number or 'production'")
        if label in self.aliases(name):
            raise RegistryError(f"model {name!r} has an alias {label!r}; a label must differ from its "
                                "aliases")
        if self.redis.hexists(keys.labels_hash(name), label):
            raise RegistryError(f"model {name!r} already has a version labelled {label!r}")

    def _artifact_record(self, path: Path, fmt: str, **extra: Any) -> dict[str, Any]:
        relative, sha256, size = artifacts.store(path, self.artifact_dir)
        record = {"artifact": relative, "sha256": sha256, "size_bytes": size, "format": fmt}
        if record.keys() & extra.keys():  # extra metadata must not redirect the artifact
            raise RegistryError(f"variant metadata may not set {sorted(record.keys() & extra.keys())}")
        return {**record, **extra}

    def add_variant(self, name: str, version: int, variant: str, path: Path, *, fmt: str = "onnx",
                    metrics: dict[str, float] | None = None, **extra: Any) -> ModelVersion:
        """Attach another artifact (e.g. an INT8 build) to a version, with its metrics."""
        if fmt not in FORMATS or variant == PRIMARY:
            raise RegistryError(f"bad variant {variant!r} of format {fmt!r}")
        keys.check_model_name(variant)
        record = self._artifact_record(Path(path), fmt, **extra)
        self._modify(name, version, lambda mv: {"alternates": json.dumps({**mv.alternates, variant: record})})
        return self.update(name, version, metrics=metrics) if metrics else self.get(name, version)

    def select_variant(self, name: str, version: int, variant: str, *, reason: str = "") -> ModelVersion:
        """Serve ``variant`` of this version (``primary`` for the registered artifact)."""
        mv = self.get(name, version)
        if variant != PRIMARY and variant not in mv.alternates:
            raise RegistryError(f"{mv!r} has no variant {variant!r}; it has {[PRIMARY, *mv.alternates]}")
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.version_hash(name, version), "serving_variant", "" if variant == PRIMARY else variant)
        self._queue_history(pipe, name, "variant", version, mv.serving_variant or PRIMARY, variant, reason)
        pipe.execute()
        if mv.stage == "Production":
            publish_reload(self.redis, name, version, secret=self.control_secret)
        return self.get(name, version)

    def _store_golden(self, golden: dict[str, np.ndarray]) -> tuple[str, str]:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "golden.npz"
            # Any, not ndarray: mypy matches a **dict against savez's allow_pickle: bool as well.
            arrays: dict[str, Any] = {k: np.asarray(v) for k, v in golden.items()}
            np.savez(path, **arrays)
            relative, sha256, _ = artifacts.store(path, self.artifact_dir)
        return relative, sha256

    def get(self, name: str, version: int) -> ModelVersion:
        """One version; ``RegistryError`` if it does not exist."""
        data = self.redis.hgetall(keys.version_hash(name, version))
        if not data:
            raise RegistryError(f"model {name!r} has no version {version}")
        return ModelVersion.from_hash(data)

    def models(self) -> list[str]:
        """Registered model names, sorted."""
        return sorted(text(m) for m in self.redis.smembers(keys.models_set()))

    def versions(self, name: str) -> list[ModelVersion]:
        """Every existing version of ``name``, oldest first."""
        latest = int(self.redis.hget(keys.model_hash(name), "latest_version") or 0)
        pipe = self.redis.pipeline(transaction=False)
        for v in range(1, latest + 1):
            pipe.hgetall(keys.version_hash(name, v))
        return [ModelVersion.from_hash(d) for d in pipe.execute() if d]

    def production(self, name: str) -> ModelVersion:
        """The version in Production; ``RegistryError`` if there is none."""
        version = self.redis.hget(keys.model_hash(name), "production_version")
        if not version:
            raise RegistryError(f"model {name!r} has no version in Production")
        try:
            number = int(version)
        except ValueError as e:
            raise RegistryError(f"model {name!r}: production_version {version[:32]!r} is not a number") from e
        return self.get(name, number)

    # ---- metadata ------------------------------------------------------------------------

    def update(self, name: str, version: int, *, metrics: dict[str, float] | None = None,
               tags: dict[str, str] | None = None, description: str | None = None) -> ModelVersion:
        """Merge metrics and tags into a version, or replace its description."""
        return self._modify(name, version, lambda mv: {
            "metrics": json.dumps({**mv.metrics, **(metrics or {})}),
            "tags": json.dumps({**mv.tags, **(tags or {})}),
            "description": mv.description if description is None else description,
        })

    def _modify(self, name: str, version: int,
                change: Callable[[ModelVersion], Fields]) -> ModelVersion:
        """Read-modify-write of a version hash under WATCH (retried if someone else wrote)."""
        key = keys.version_hash(name, version)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    fields = change(self.get(name, version))
                    pipe.multi()
                    pipe.hset(key, mapping=fields)
                    pipe.execute()
                    return self.get(name, version)
                except redis.WatchError:
                    continue

    def compare(self, name: str, v1: int, v2: int) -> dict[str, Any]:
        """Metrics side by side with deltas (v2 − v1), and the other facts that differ."""
        a, b = self.get(name, v1), self.get(name, v2)
        metrics = {k: {"a": a.metrics.get(k), "b": b.metrics.get(k),
                       "delta": (b.metrics[k] - a.metrics[k]) if k in a.metrics and k in b.metrics else None}
                   for k in sorted(set(a.metrics) | set(b.metrics))}
        facts = {f: {"a": getattr(a, f), "b": getattr(b, f)}
                 for f in ("label", "stage", "format", "size_bytes", "input_spec", "output_names",
                           "output_spec", "labels", "sha256")}
        return {"name": name, "a": v1, "b": v2, "metrics": metrics, "facts": facts}

    # ---- stages and aliases --------------------------------------------------------------

    def promote(self, name: str, version: int, stage: str = "Production", *, reason: str = "",
                allow_archived: bool = False, publish: bool = True) -> ModelVersion:
        """Move a version to ``stage``; a new Production archives the previous one.

        Archived → Production (a rollback) needs ``allow_archived``. Promotion to
        Production publishes a reload command unless ``publish`` is False.
        """
        if stage not in STAGES:
            raise RegistryError(f"unknown stage {stage!r}; choose one of {STAGES}")
        model_key, version_key = keys.model_hash(name), keys.version_hash(name, version)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(model_key, version_key)
                    current_stage = self.get(name, version).stage
                    self._check_transition(current_stage, stage, allow_archived, name, version)
                    production = pipe.hget(model_key, "production_version")
                    pipe.multi()
                    self._queue_stage(pipe, name, version, current_stage, stage, production, reason)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        if stage == "Production" and publish:
            publish_reload(self.redis, name, version, secret=self.control_secret)
        return self.get(name, version)

    @staticmethod
    def _check_transition(source: str, target: str, allow_archived: bool, name: str, version: int) -> None:
        if source == target:
            return
        rollback = source == "Archived" and target == "Production" and allow_archived
        if target not in TRANSITIONS[source] and not rollback:
            hint = " (a rollback: pass allow_archived / --allow-archived)" if source == "Archived" else ""
            raise RegistryError(f"{name} v{version}: {source} → {target} is not allowed{hint}")

    def _queue_stage(self, pipe, name: str, version: int, source: str, target: str,
                     production, reason: str) -> None:
        current = int(production) if production else None
        if target == "Production" and current not in (None, version):
            # Archive the old one first: the history then reads old-out, new-in.
            pipe.hset(keys.version_hash(name, current), "stage", "Archived")
            self._queue_history(pipe, name, "stage", current, "Production", "Archived",
                                f"replaced by v{version}")
        pipe.hset(keys.version_hash(name, version), "stage", target)
        self._queue_history(pipe, name, "stage", version, source, target, reason)
        if target == "Production":
            pipe.hset(keys.model_hash(name), "production_version", str(version))
        elif current == version:
            pipe.hdel(keys.model_hash(name), "production_version")

    def _queue_history(self, pipe, name: str, kind: str, version: int, source: str, target: str,
                       reason: str) -> None:
        pipe.xadd(keys.history_stream(name), {
            "kind": kind, "version": version, "from": source, "to": target,
            "who": self.actor, "reason": reason, "at_ms": int(time.time() * 1000)},
            maxlen=HISTORY_MAXLEN, approximate=False)

    def set_alias(self, name: str, alias: str, version: int, *, reason: str = "") -> None:
        """Point ``alias`` (e.g. ``champion``) at a version; a version may hold several."""
        keys.check_model_name(alias)
        self.get(name, version)
        if self.redis.hexists(keys.labels_hash(name), alias):
            raise RegistryError(f"model {name!r} has a version labelled {alias!r}; an alias must differ "
                                "from its labels")
        previous = self.redis.hget(keys.aliases_hash(name), alias)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.aliases_hash(name), alias, str(version))
        self._queue_history(pipe, name, "alias", version, f"{alias}@{text(previous) if previous else '-'}",
                            f"{alias}@{version}", reason)
        pipe.execute()

    def remove_alias(self, name: str, alias: str, *, reason: str = "") -> None:
        """Drop an alias."""
        previous = self.redis.hget(keys.aliases_hash(name), alias)
        if previous is None:
            raise RegistryError(f"model {name!r} has no alias {alias!r}")
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(keys.aliases_hash(name), alias)
        self._queue_history(pipe, name, "alias", int(previous), f"{alias}@{text(previous)}", "-", reason)
        pipe.execute()

    def aliases(self, name: str) -> dict[str, int]:
        """alias → version."""
        return {text(k): int(v) for k, v in self.redis.hgetall(keys.aliases_hash(name)).items()}

    def resolve(self, name: str, ref: str | int) -> ModelVersion:
        """A version by number, alias, label (e.g. ``1.1.0``), or the word ``production``."""
        if isinstance(ref, int) or str(ref).isdigit():
            return self.get(name, int(ref))
        if ref == "production":
            return self.production(name)
        version = self.aliases(name).get(str(ref))
        if version is not None:
            return self.get(name, version)
        labelled = _number(self.redis.hget(keys.labels_hash(name), str(ref)))
        if labelled is not None:
            mv = self.get(name, labelled)
            if mv.label == ref:  # the version hash is the truth; the index only finds it
                return mv
        raise RegistryError(f"model {name!r} has no alias or label {str(ref)[:70]!r}")

    def title(self, name: str, version: int | None) -> str:
        """``v3 (1.1.0)``: the version with its label, ``v3`` if it has none or cannot be read."""
        if version is None:
            return version_title(None)
        try:
            return self.get(name, version).title
        except RegistryError:  # deleted, or a malformed hash: the number alone still says which
            return version_title(version)

    # ---- history -------------------------------------------------------------------------

    def history(self, name: str, count: int = 1000) -> list[Change]:
        """The newest ``count`` changes, oldest first."""
        rows = cast("StreamRows", self.redis.xrevrange(keys.history_stream(name), count=count))
        return [_change(fields) for _, fields in reversed(rows)]

    def production_at(self, name: str, at_s: float) -> int | None:
        """The version that was in Production at Unix time ``at_s`` (None if none was)."""
        end = f"{int(at_s * 1000)}-18446744073709551615"
        cursor = end
        while True:
            rows = cast("StreamRows", self.redis.xrevrange(keys.history_stream(name), max=cursor, count=100))
            for _entry_id, fields in rows:
                change = _change(fields)
                if change.kind == "stage" and change.target == "Production":
                    return change.version
                if change.kind in ("stage", "delete") and change.source == "Production":
                    return None
            if len(rows) < 100:
                return None
            cursor = f"({text(rows[-1][0])}"

    # ---- deletion and garbage collection -------------------------------------------------

    def delete(self, name: str, version: int, *, reason: str = "") -> None:
        """Delete a version's record; refused while it is in Production or holds an alias."""
        mv = self.get(name, version)
        if mv.stage == "Production":
            raise RegistryError(f"{name} v{version} is in Production; promote another version first")
        held = [a for a, v in self.aliases(name).items() if v == version]
        if held:
            raise RegistryError(f"{name} v{version} holds aliases {held}; move or remove them first")
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(keys.version_hash(name, version))
        if mv.label:  # its label is free again
            pipe.hdel(keys.labels_hash(name), mv.label)
        self._queue_history(pipe, name, "delete", version, mv.stage, "deleted", reason)
        pipe.execute()

    def referenced_artifacts(self) -> set[str]:
        """Store paths that some version of some model still points at."""
        return {path for name in self.models() for mv in self.versions(name)
                for path in (mv.artifact, mv.golden, *(a["artifact"] for a in mv.alternates.values()))
                if path}

    def gc(self, *, dry_run: bool = False) -> list[Path]:
        """Remove store files no version references; returns what was (or would be) removed."""
        referenced = self.referenced_artifacts()
        root = self.artifact_dir / "sha256"
        candidates = sorted(root.glob("*/*")) if root.exists() else []
        # Only files that really lie in the store: a symlinked folder must not take gc outside it.
        orphans = [p for p in candidates if p.is_file()
                   and (relative := str(p.relative_to(self.artifact_dir))) not in referenced
                   and artifacts.inside(self.artifact_dir, relative)]
        if not dry_run:
            for path in orphans:
                path.unlink()
        return orphans

    # ---- artifacts -----------------------------------------------------------------------

    def artifact_path(self, mv: ModelVersion, variant: str = PRIMARY) -> Path:
        """The verified local path of one of ``mv``'s artifacts (default: the primary one).

        Raises ``ArtifactIntegrityError`` (naming the version and variant) when the
        recorded location leaves the artifact directory or the bytes do not match the
        recorded sha256. To load an artifact use :meth:`artifact_bytes` instead.
        """
        relative, sha256 = self._artifact_ref(mv, variant)
        return artifacts.verified_path(self.artifact_dir, relative, sha256, what=_what(mv, variant))

    def artifact_bytes(self, mv: ModelVersion, variant: str = PRIMARY) -> bytes:
        """The bytes of one of ``mv``'s artifacts, read once and verified: what is checked is what loads."""
        relative, sha256 = self._artifact_ref(mv, variant)
        return artifacts.read_verified(self.artifact_dir, relative, sha256, what=_what(mv, variant))

    def _artifact_ref(self, mv: ModelVersion, variant: str) -> tuple[str, str]:
        if variant == PRIMARY:
            return mv.artifact, mv.sha256
        if variant not in mv.alternates:
            raise RegistryError(f"{mv!r} has no {variant} artifact")
        record = mv.alternates[variant]
        return str(record.get("artifact", "")), str(record.get("sha256", ""))

    def golden(self, mv: ModelVersion) -> dict[str, np.ndarray]:
        """The version's verified golden inputs and outputs (``input:x`` / ``output:y``)."""
        data = artifacts.read_verified(self.artifact_dir, mv.golden, mv.golden_sha256,
                                       what=_what(mv, "golden"))
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return {k: arrays[k] for k in arrays.files}


def _number(value: bytes | str | None) -> int | None:
    """A version number read from Redis (untrusted), or None if it is not one."""
    raw = value.decode(errors="replace") if isinstance(value, bytes) else value
    return int(raw) if raw is not None and re.fullmatch(r"[0-9]{1,18}", raw) else None


def _latest(name: str, value: bytes | str | None) -> int:
    number = _number(value or b"0")
    if number is None:  # untrusted: a malformed counter must not number a version
        raise RegistryError(f"model {name!r}: latest_version {str(value)[:32]} is not a number")
    return number


def _checked_output_spec(spec: dict[str, dict[str, Any]]) -> dict[str, OutputField]:
    try:
        return _OUTPUT_SPEC_ADAPTER.validate_python(spec)
    except ValidationError as e:
        raise RegistryError(f"output_spec is malformed: {_first_line(e)}") from e


_OUTPUT_SPEC_ADAPTER: TypeAdapter[dict[str, OutputField]] = TypeAdapter(OutputSpec)


def _what(mv: ModelVersion, variant: str) -> str:
    """How an artifact error names its artifact: the model version and variant, no path or hash."""
    return f"{mv.name} v{mv.version} {variant}"


def _change(fields: RawHash) -> Change:
    d = text_dict(fields)
    return Change(int(d["at_ms"]), d["kind"], int(d["version"]), d["from"], d["to"], d["who"], d["reason"])


