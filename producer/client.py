"""The bot's synchronous client."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, cast

import redis

from producer import _core
from producer.health import Health, read_health
from protocol import keys, messages
from protocol.errors import ReplyError
from protocol.messages import Prediction


class Client:
    """Send feature tensors to a model's stream and wait for the replies.

    Thread-safe: redis-py's connection pool hands each call its own connection.
    """

    def __init__(self, client: redis.Redis, *, timeout_s: float = 1.0) -> None:
        self.redis = client
        self.timeout_s = timeout_s

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 1.0, **redis_kwargs: Any) -> Client:
        """A client for ``redis://host:port/db``."""
        return cls(redis.Redis.from_url(url, **redis_kwargs), timeout_s=timeout_s)

    def predict(self, model: str, features: _core.Features, *, route: str = "",
                timeout_s: float | None = None, sample_ndim: int | None = None,
                request_id: str | None = None) -> Prediction:
        """One request (one sample, or N if ``sample_ndim`` says the array has a batch axis).

        XADD and BLPOP go in one pipeline: one round trip to Redis.
        Raises the ``ReplyError`` subclass matching the reply's code.
        """
        timeout_s = timeout_s or self.timeout_s
        pending = _core.prepare(model, features, route=route, timeout_s=timeout_s,
                                sample_ndim=sample_ndim, request_id=request_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(keys.request_stream(model), pending.fields)
        pipe.blpop([pending.reply_key], timeout=_core.block_s(pending.deadline_s))
        _, popped = pipe.execute()
        if popped is None:
            raise _core.timed_out(pending, timeout_s)
        return _core.unwrap(_core.parse(popped[1]))

    def predict_many(self, model: str, batch: Sequence[_core.Features], *, route: str = "",
                     timeout_s: float | None = None,
                     return_exceptions: bool = False) -> list[Prediction | ReplyError]:
        """Many single-sample requests: every XADD in one pipelined round trip, replies gathered.

        The requests share one reply list, so collecting N replies costs a few
        LPOP/BLPOP calls, not N. With ``return_exceptions`` a failed request's error
        takes its place in the list; otherwise the first error is raised.
        """
        timeout_s = timeout_s or self.timeout_s
        pendings = _core.prepare_many(model, batch, route=route, timeout_s=timeout_s)
        if not pendings:
            return []
        gatherer = _core.Gatherer(pendings, timeout_s)
        pipe = self.redis.pipeline(transaction=False)
        for p in pendings:
            pipe.xadd(keys.request_stream(model), p.fields)
        pipe.blpop([gatherer.reply_key], timeout=_core.block_s(gatherer.deadline_s))
        first = pipe.execute()[-1]
        gatherer.take([first[1]] if first else None)
        # LPOP with a count gives a list; replies are bytes (redis-py's types also cover decode_responses).
        while first and not gatherer.done():
            popped = cast("list[bytes] | None", self.redis.lpop(gatherer.reply_key, gatherer.remaining))
            if popped:
                gatherer.take(popped)
                continue
            first = cast("tuple[bytes, bytes] | None",
                         self.redis.blpop([gatherer.reply_key], timeout=_core.block_s(gatherer.deadline_s)))
            gatherer.take([first[1]] if first else None)
        results = gatherer.outcome()
        return results if return_exceptions else [_core.unwrap(r) for r in results]

    def record_outcome(self, model: str, request_id: str, *, correct: bool | None = None,
                       label: str | None = None, pnl: float | None = None) -> str:
        """Report what happened after a prediction (for experiments); returns the entry id.

        Give ``correct`` (was the prediction right), or the true ``label``, and/or the
        ``pnl`` of the trade it led to. Outcomes may arrive long after the reply.
        """
        return self.record_outcomes(model, [(request_id, {"correct": correct, "label": label,
                                                          "pnl": pnl})])[0]

    def record_outcomes(self, model: str, outcomes: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        """Many outcomes in one pipelined round trip: ``[(request_id, {"label": "up"}), …]``."""
        at_ms = int(time.time() * 1000)
        encoded = [messages.encode_outcome(rid, at_ms=at_ms, **kw) for rid, kw in outcomes]
        pipe = self.redis.pipeline(transaction=False)
        for fields in encoded:
            pipe.xadd(keys.outcomes_stream(model), fields, maxlen=_core.OUTCOMES_MAXLEN, approximate=True)
        return [entry.decode() for entry in pipe.execute()]

    def health(self, model: str) -> Health:
        """Live workers of ``model`` (from their heartbeats) and the versions they serve."""
        return read_health(self.redis, model)

    def close(self) -> None:
        """Release the connection pool."""
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

