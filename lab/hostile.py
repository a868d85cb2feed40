"""Hostile stream entries for ``streamserve chaos``: what an attacker or a broken bot would XADD.

Every kind is answered with ``INVALID_INPUT`` when it carries a usable request id,
and dead-lettered when it does not; none may crash a worker or cost it more than
about twice the entry's size.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import cast

import msgpack
import numpy as np
from redis import Redis

from protocol import codec, keys, messages

ID_PREFIX = "h-"
CHUNK = 50
REPLY_WAIT_S = 30.0
_X = np.zeros((1, 60, 110), dtype=np.float32)


def _valid(request_id: str, **changes: bytes | str) -> dict:
    deadline_ms = int(time.time() * 1000) + 60_000
    fields = messages.encode_request(request_id, {"features": _X}, deadline_ms=deadline_ms)
    return {**fields, **changes}


def _nested_bomb() -> bytes:
    tree = b"\x90"
    for _ in range(5):  # 8**5 one-byte lists, 37 KB: 64x that as Python objects in a naive decoder
        tree = b"\x98" + tree * 8
    return b"\x81\xa8features\x98" + tree * 8


KINDS: dict[str, Callable[[str, random.Random], dict]] = {
    "random bytes": lambda i, rng: _valid(i, inputs=rng.randbytes(rng.randint(0, 4096))),
    "nested-array bomb": lambda i, rng: _valid(i, inputs=_nested_bomb()),
    "NaN features": lambda i, rng: messages.encode_request(
        i, {"features": np.full((1, 60, 110), np.nan, np.float32)}, deadline_ms=0),
    "wrong dtype": lambda i, rng: messages.encode_request(
        i, {"features": _X.astype(np.float64)}, deadline_ms=0),
    "fractional deadline": lambda i, rng: _valid(i, deadline_ms="1.5e12"),
    "huge shape": lambda i, rng: _valid(i, inputs=codec.pack(
        {"features": {"dtype": "<f4", "shape": [1 << 30, 1 << 30], "data": b""}})),
    "ext type": lambda i, rng: _valid(i, inputs=msgpack.packb({"features": msgpack.ExtType(1, b"x")})),
    "protocol v99": lambda i, rng: _valid(i, v="99"),
    "id with newline": lambda i, rng: _valid(i, id=f"{i}\n"),
    "no id": lambda i, rng: {k: v for k, v in _valid(i).items() if k != "id"},
}
NO_REPLY = {"id with newline", "no id"}  # no usable address: dead-lettered, not answered


class Fuzzer:
    """Push ``total`` hostile entries in chunks, collect their replies, count the outcomes."""

    def __init__(self, url: str, model: str, total: int, seed: int, stop: threading.Event) -> None:
        self.url, self.model, self.total, self.stop = url, model, total, stop
        self.rng = random.Random(seed)
        self.sent: Counter[str] = Counter()
        self.replies: Counter[str] = Counter()
        self.dead_before = 0

    def run(self) -> None:
        """Until ``total`` are sent (or the run stops)."""
        with Redis.from_url(self.url) as client:
            self.dead_before = int(client.xlen(keys.dead_letter_stream(self.model)))
            n = 0
            while n < self.total and not self.stop.is_set():
                chunk = [(f"{ID_PREFIX}{n + j}", self.rng.choice(sorted(KINDS)))
                         for j in range(min(CHUNK, self.total - n))]
                self._send(client, chunk)
                n += len(chunk)

    def _send(self, client: Redis, chunk: list[tuple[str, str]]) -> None:
        pipe = client.pipeline(transaction=False)
        for request_id, kind in chunk:
            pipe.xadd(keys.request_stream(self.model), KINDS[kind](request_id, self.rng))
            self.sent[kind] += 1
        pipe.execute()
        for request_id, kind in chunk:
            if kind in NO_REPLY:
                continue
            popped = cast("tuple[bytes, bytes] | None",
                          client.blpop([keys.reply_key(self.model, request_id)], timeout=REPLY_WAIT_S))
            if popped is None:
                self.replies["unanswered"] += 1
                continue
            reply = codec.unpack(popped[1], max_bytes=1 << 20)
            self.replies[reply.get("error", {}).get("code", "OK") if not reply.get("ok") else "OK"] += 1

    def counts(self, client: Redis) -> dict[str, int]:
        """Sent, replies by code, and entries dead-lettered while the fuzzer ran."""
        if not self.sent:
            return {}
        dead = int(client.xlen(keys.dead_letter_stream(self.model))) - self.dead_before
        return {"sent": sum(self.sent.values()), **{f"reply {k}": v for k, v in sorted(self.replies.items())},
                "expected dead letters": sum(self.sent[k] for k in NO_REPLY), "dead-lettered": dead}
