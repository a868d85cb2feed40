"""Model registry: versions, stages and content-addressed artifacts in Redis hashes."""

from registry.artifacts import sha256_of
from registry.contract import Contract, ContractError, check_onnx, register_onnx
from registry.store import PRIMARY, STAGES, ModelVersion, Registry, version_title

__all__ = ["PRIMARY", "STAGES", "Contract", "ContractError", "ModelVersion", "Registry", "check_onnx",
           "register_onnx", "sha256_of", "version_title"]
