"""The bot's client: depends on ``protocol`` only (no onnxruntime, no torch).

>>> client = Client.from_url("redis://localhost:6379/0")
>>> p = client.predict("hybrid_cnn_lstm", window, route="BTCUSDT", timeout_s=0.05)
>>> p.label, p.confidence, p.outputs["probs"], p.model_version  # probs: shape (3,), one sample
>>> r = client.predict("ret_model", window)           # a regression model, no labels
>>> r.value, r.outputs["ret_5m"]                      # the first output as a float; any output by name
"""

from producer.aio import AsyncClient
from producer.client import Client
from producer.health import Health, WorkerInfo
from protocol.errors import (
    DeadlineExceeded,
    InternalError,
    Interrupted,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    ReplyError,
    StreamserveError,
    Unavailable,
)
from protocol.messages import Prediction

__all__ = [
    "AsyncClient",
    "Client",
    "DeadlineExceeded",
    "Health",
    "InternalError",
    "Interrupted",
    "InvalidInput",
    "ModelNotFound",
    "Overloaded",
    "Prediction",
    "ReplyError",
    "StreamserveError",
    "Unavailable",
    "WorkerInfo",
]
