"""Resolve model → Production version → verified artifact → backend."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from protocol.errors import ConfigError
from protocol.settings import Settings
from registry import ModelVersion, Registry
from worker.backend import Backend, InputSpec, OnnxBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A version ready to serve: registry record, backend, and its input contract."""

    version: ModelVersion
    backend: Backend
    spec: InputSpec


def load_version(registry: Registry, mv: ModelVersion, settings: Settings) -> LoadedModel:
    """Verify the artifact's sha256, load it, and warm it up on one zero sample."""
    path = registry.artifact_path(mv)  # raises ArtifactIntegrityError on mismatch
    if mv.format != "onnx":
        raise ConfigError(f"{mv!r}: format {mv.format!r} has no backend yet")
    backend = OnnxBackend(path, intra_op_threads=settings.intra_op_threads)
    spec = InputSpec(mv.input_spec)
    warm = {n: np.zeros((1, *shape), dtype=dt) for n, (dt, shape) in spec.fields.items()}
    backend.run(warm)
    log.info("loaded %r from %s", mv, path)
    return LoadedModel(mv, backend, spec)
