"""The peers ``streamserve bench-peers`` runs beside us: FastAPI with a raw float32 body, and Celery.

Both serve the same ONNX file with the same ONNX Runtime settings as our workers
(one intra-op thread, sequential execution), one process per core:

- **FastAPI** (``uvicorn lab.peers:app --workers N``): ``POST /predict`` with the
  C-ordered float32 window as the body; the answer is the float32 output row.
  The fastest design a plain HTTP server allows: no JSON, no framing beyond HTTP.
- **Celery** (``celery -A lab.peers worker``): a task on a Redis broker with
  ``acks_late`` (acknowledged after it ran, as our workers ack with the reply),
  the Redis result backend, msgpack for tasks and results (never pickle), and a
  prefetch of one.

The model file comes from ``STREAMSERVE_PEER_MODEL`` and the broker from
``STREAMSERVE_PEER_REDIS``: these servers are started by the bench as separate
programs and read their configuration there, not from our settings.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoint's annotations as objects.
import os
from functools import cache
from typing import Any

import numpy as np
import onnxruntime as ort

WINDOW_SHAPE = (1, 60, 110)
MODEL_ENV, REDIS_ENV = "STREAMSERVE_PEER_MODEL", "STREAMSERVE_PEER_REDIS"


@cache
def _session() -> tuple[ort.InferenceSession, str]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(os.environ[MODEL_ENV], options, providers=["CPUExecutionProvider"])
    return session, session.get_inputs()[0].name


def predict_bytes(body: bytes) -> bytes:
    """One window (raw float32 bytes) → the model's output row (raw float32 bytes)."""
    session, name = _session()
    x = np.frombuffer(body, dtype=np.float32).reshape(WINDOW_SHAPE)
    return session.run(None, {name: x})[0].astype(np.float32).tobytes()


@cache
def _fastapi_app() -> Any:
    from fastapi import FastAPI, Request, Response

    api = FastAPI()

    @api.post("/predict")
    async def predict(request: Request) -> Response:  # the model call blocks: as a sync server would
        return Response(predict_bytes(await request.body()), media_type="application/octet-stream")

    return api


def make_celery(url: str) -> Any:
    """A Celery app on ``url`` (broker and result backend) with the ``predict`` task; one per client
    thread, since a result backend's connection is not shared between threads."""
    from celery import Celery

    celery = Celery("streamserve_peer", broker=url, backend=url)
    celery.conf.update(task_serializer="msgpack", result_serializer="msgpack", accept_content=["msgpack"],
                       task_acks_late=True, worker_prefetch_multiplier=1, result_expires=60,
                       broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
    celery.task(name="predict")(predict_bytes)
    return celery


def __getattr__(name: str) -> Any:
    """``app`` (uvicorn) and ``celery`` (the Celery CLI) are built on first use, so importing this
    module for its helpers needs neither FastAPI nor Celery."""
    if name == "app":
        return _fastapi_app()
    if name == "celery":
        return make_celery(os.environ.get(REDIS_ENV, "redis://localhost:6379/0"))
    raise AttributeError(name)
