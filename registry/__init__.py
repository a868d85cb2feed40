"""Model registry: versions, stages and content-addressed artifacts in Redis hashes."""

from registry.artifacts import sha256_of
from registry.store import STAGES, ModelVersion, Registry

__all__ = ["STAGES", "ModelVersion", "Registry", "sha256_of"]
