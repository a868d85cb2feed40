"""The simplest correct Redis-streams loop: the reference ``streamserve bench-peers`` measures us against.

The same design as streamserve with the same happy-path guarantees and none of its
features: what a competent engineer writes in an afternoon.

- bot: ``XADD`` the entry streamserve's client would send (:func:`protocol.messages.encode_request`:
  the same fields, the same msgpack tensor bytes; no ``reply_to``, so the id names the reply list),
  then ``BLPOP`` its reply list;
- worker: ``XREADGROUP … COUNT 32 BLOCK``, one ``session.run`` on the stacked inputs (ONNX Runtime
  with our workers' settings), then one ``MULTI``: per request ``LPUSH`` + ``PEXPIRE`` of its reply,
  ``XACK`` + ``XDEL`` of the batch, ``EXEC``. The reply is the outputs in our tensor codec.

No deadlines, retries, reclaim of a dead worker's entries, error replies, heartbeats, backpressure or
experiments: a malformed entry stops the worker. Run a worker with
``python -m lab.reference_loop REDIS_URL MODEL_NAME ONNX_FILE``.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import cast

import numpy as np
import onnxruntime as ort
import redis

from protocol import codec, keys, messages

BATCH_MAX = 32  # as streamserve's worker in the bench (--max-batch 32)
BLOCK_MS = 1000
REPLY_TTL_MS = 60_000
MAX_MESSAGE_BYTES = 16 << 20  # streamserve's max_message_bytes default
Entries = list[tuple[bytes, dict[bytes, bytes]]]


class LoopClient:
    """The bot side: one call at a time on one connection."""

    def __init__(self, url: str, model: str, timeout_s: float) -> None:
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout_s + 5)
        self.stream, self.model, self.timeout_s = keys.request_stream(model), model, timeout_s

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``inputs`` (each with its batch axis) → the model's outputs; ``TimeoutError`` past the timeout."""
        request_id = uuid.uuid4().hex
        deadline_ms = int((time.time() + self.timeout_s) * 1000)
        self.redis.xadd(self.stream, messages.encode_request(request_id, inputs, deadline_ms=deadline_ms))
        answer = cast("tuple[bytes, bytes] | None",
                      self.redis.blpop([keys.reply_key(self.model, request_id)], self.timeout_s))
        if answer is None:
            raise TimeoutError(f"no reply to {request_id} within {self.timeout_s} s")
        return messages.decode_inputs(answer[1], MAX_MESSAGE_BYTES)  # same codec: a map of tensors

    def close(self) -> None:
        """Close the connection."""
        self.redis.close()


def session(model_path: str) -> ort.InferenceSession:
    """ONNX Runtime as streamserve's workers open it by default (one thread, sequential)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])


def serve(url: str, model: str, model_path: str, batches: int | None = None) -> None:
    """Answer ``model``'s stream until killed (or for ``batches`` batches: tests)."""
    r, model_session = redis.Redis.from_url(url), session(model_path)
    stream, group, consumer = keys.request_stream(model), keys.consumer_group(model), f"loop-{os.getpid()}"
    try:
        r.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as e:  # BUSYGROUP: another worker made it first
        if "BUSYGROUP" not in str(e):
            raise
    r.xgroup_createconsumer(stream, group, consumer)  # visible before its first entry (Redis < 7.2)
    while batches is None or batches > 0:
        answer = cast("list[tuple[bytes, Entries]] | None",  # RESP2 from a bytes client
                      r.xreadgroup(group, consumer, {stream: ">"}, count=BATCH_MAX, block=BLOCK_MS))
        if answer:
            answer_batch(r, model, model_session, answer[0][1])
            batches = None if batches is None else batches - 1


def answer_batch(r: redis.Redis, model: str, model_session: ort.InferenceSession,
                 entries: Entries) -> None:
    """One model call for ``entries``, then their replies, ack and delete in one ``MULTI``."""
    requests = [(f[b"id"].decode(), messages.decode_inputs(f[b"inputs"], MAX_MESSAGE_BYTES))
                for _, f in entries]
    stacked = {name: np.concatenate([inputs[name] for _, inputs in requests]) for name in requests[0][1]}
    names = [o.name for o in model_session.get_outputs()]
    outputs = dict(zip(names, model_session.run(names, stacked), strict=True))
    pipe, row = r.pipeline(transaction=True), 0
    for request_id, inputs in requests:
        rows = len(next(iter(inputs.values())))
        reply = codec.pack({n: codec.encode_tensor(a[row:row + rows]) for n, a in outputs.items()})
        key, row = keys.reply_key(model, request_id), row + rows
        pipe.lpush(key, reply)
        pipe.pexpire(key, REPLY_TTL_MS)
    ids = [entry_id for entry_id, _ in entries]
    pipe.xack(keys.request_stream(model), keys.consumer_group(model), *ids)
    pipe.xdel(keys.request_stream(model), *ids)
    pipe.execute()

if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], sys.argv[3])
