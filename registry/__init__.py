"""Model registry: versions, stages and content-addressed artifacts in Redis hashes."""

from registry.artifacts import sha256_of
from registry.store import PRIMARY, STAGES, ModelVersion, Registry

__all__ = ["PRIMARY", "STAGES", "ModelVersion", "Registry", "sha256_of"]
