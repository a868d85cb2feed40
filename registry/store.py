"""Model registry in Redis hashes: models, versions, stages, metadata, artifacts."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from protocol import keys
from protocol.errors import RegistryError
from registry import artifacts

STAGES = ("None", "Staging", "Production", "Archived")
FORMATS = ("onnx",)
_JSON_FIELDS = ("input_spec", "output_names", "labels", "metrics", "tags")


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

    def to_hash(self) -> dict[str, str]:
        """The Redis hash fields (JSON for structured values)."""
        data = asdict(self)
        return {k: json.dumps(v) if k in _JSON_FIELDS else str(v) for k, v in data.items()}

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> ModelVersion:
        """Inverse of :meth:`to_hash`."""
        values: dict[str, Any] = {k: json.loads(data[k]) if k in _JSON_FIELDS else data[k] for k in data}
        values["version"], values["size_bytes"] = int(values["version"]), int(values["size_bytes"])
        values["created_at"] = float(values["created_at"])
        return cls(**values)

    def __repr__(self) -> str:
        return f"ModelVersion({self.name} v{self.version} {self.stage} {self.format} {self.sha256[:10]})"


class Registry:
    """Register, look up and stage model versions; artifacts go to a content-addressed store."""

    def __init__(self, client: redis.Redis, artifact_dir: Path) -> None:
        self.redis = client
        self.artifact_dir = Path(artifact_dir)

    def register(
        self, name: str, source: Path, *, input_spec: dict[str, dict[str, Any]],
        output_names: list[str], labels: list[str] | None = None, fmt: str = "onnx",
        metrics: dict[str, float] | None = None, description: str = "",
        tags: dict[str, str] | None = None,
    ) -> ModelVersion:
        """Copy the artifact into the store and record a new version in stage ``None``."""
        keys.check_model_name(name)
        if fmt not in FORMATS:
            raise RegistryError(f"unsupported format {fmt!r}; supported: {FORMATS}")
        relative, sha256, size = artifacts.store(Path(source), self.artifact_dir)
        version = int(self.redis.hincrby(keys.model_hash(name), "latest_version", 1))
        mv = ModelVersion(
            name, version, "None", fmt, relative, sha256, size, input_spec, list(output_names),
            list(labels or []), dict(metrics or {}), dict(tags or {}), description, time.time(),
        )
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.version_hash(name, version), mapping=mv.to_hash())
        pipe.hsetnx(keys.model_hash(name), "created_at", str(mv.created_at))
        pipe.sadd(keys.models_set(), name)
        pipe.execute()
        return mv

    def get(self, name: str, version: int) -> ModelVersion:
        """One version; ``RegistryError`` if it does not exist."""
        data = _decoded(self.redis.hgetall(keys.version_hash(name, version)))
        if not data:
            raise RegistryError(f"model {name!r} has no version {version}")
        return ModelVersion.from_hash(data)

    def models(self) -> list[str]:
        """Registered model names, sorted."""
        return sorted(_text(m) for m in self.redis.smembers(keys.models_set()))

    def versions(self, name: str) -> list[ModelVersion]:
        """Every version of ``name``, oldest first."""
        latest = int(self.redis.hget(keys.model_hash(name), "latest_version") or 0)
        pipe = self.redis.pipeline(transaction=False)
        for v in range(1, latest + 1):
            pipe.hgetall(keys.version_hash(name, v))
        return [ModelVersion.from_hash(_decoded(d)) for d in pipe.execute() if d]

    def production(self, name: str) -> ModelVersion:
        """The version in Production; ``RegistryError`` if there is none."""
        version = self.redis.hget(keys.model_hash(name), "production_version")
        if not version:
            raise RegistryError(f"model {name!r} has no version in Production")
        return self.get(name, int(version))

    def promote(self, name: str, version: int, stage: str = "Production") -> ModelVersion:
        """Move a version to ``stage``; a new Production archives the previous one."""
        if stage not in STAGES[1:]:
            raise RegistryError(f"cannot promote to {stage!r}; choose one of {STAGES[1:]}")
        model_key = keys.model_hash(name)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(model_key, keys.version_hash(name, version))
                    self.get(name, version)  # raises if absent
                    current = pipe.hget(model_key, "production_version")
                    pipe.multi()
                    self._queue_stage(pipe, name, version, stage, current)
                    pipe.execute()
                    return self.get(name, version)
                except redis.WatchError:
                    continue

    def _queue_stage(self, pipe, name: str, version: int, stage: str, current) -> None:
        model_key = keys.model_hash(name)
        pipe.hset(keys.version_hash(name, version), "stage", stage)
        if stage == "Production":
            if current and int(current) != version:
                pipe.hset(keys.version_hash(name, int(current)), "stage", "Archived")
            pipe.hset(model_key, "production_version", str(version))
        elif current and int(current) == version:
            pipe.hdel(model_key, "production_version")

    def artifact_path(self, mv: ModelVersion) -> Path:
        """The verified local path of ``mv``'s artifact; ``ArtifactIntegrityError`` on mismatch."""
        return artifacts.verified_path(self.artifact_dir, mv.artifact, mv.sha256)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decoded(data: dict) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in data.items()}
