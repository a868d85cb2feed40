"""Wire protocol v1: Redis keys, message schema, tensor codec, errors, settings.

Imports nothing else of streamserve, so any client can depend on it alone.
"""

from protocol.errors import (
    ArtifactIntegrityError,
    ConfigError,
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    RegistryError,
    ReplyError,
    StreamserveError,
    Unavailable,
)
from protocol.messages import PROTOCOL_VERSION, Prediction, Request
from protocol.settings import Settings

__all__ = [
    "PROTOCOL_VERSION",
    "ArtifactIntegrityError",
    "ConfigError",
    "DeadlineExceeded",
    "InternalError",
    "InvalidInput",
    "ModelNotFound",
    "Overloaded",
    "Prediction",
    "RegistryError",
    "ReplyError",
    "Request",
    "Settings",
    "StreamserveError",
    "Unavailable",
]
