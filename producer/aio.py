"""The bot's asyncio client: the same calls as :class:`producer.Client`, awaitable."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, cast

import redis.asyncio as aioredis

from producer import _core
from producer.health import Health
from protocol import keys, messages, presence
from protocol.errors import ReplyError
from protocol.messages import Prediction
from protocol.values import text


class AsyncClient:
    """Asyncio client; many concurrent ``predict`` calls share one connection pool."""

    def __init__(self, client: aioredis.Redis, *, timeout_s: float = 1.0) -> None:
        self.redis = client
        self.timeout_s = timeout_s

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 1.0, **redis_kwargs: Any) -> AsyncClient:
        """A client for ``redis://host:port/db``."""
        return cls(aioredis.Redis.from_url(url, **redis_kwargs), timeout_s=timeout_s)

    async def predict(self, model: str, features: _core.Features, *, route: str = "",
                      timeout_s: float | None = None, sample_ndim: int | None = None,
                      request_id: str | None = None) -> Prediction:
        """One request; XADD + BLPOP in one pipelined round trip."""
        timeout_s = timeout_s or self.timeout_s
        pending = _core.prepare(model, features, route=route, timeout_s=timeout_s,
                                sample_ndim=sample_ndim, request_id=request_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(keys.request_stream(model), pending.fields)
            pipe.blpop([pending.reply_key], timeout=_core.block_s(pending.deadline_s))
            _, popped = await pipe.execute()
        if popped is None:
            raise _core.timed_out(pending, timeout_s)
        return _core.unwrap(_core.parse(popped[1]))

    async def predict_many(self, model: str, batch: Sequence[_core.Features], *, route: str = "",
                           timeout_s: float | None = None,
                           return_exceptions: bool = False) -> list[Prediction | ReplyError]:
        """Many single-sample requests: every XADD in one pipelined round trip, replies gathered.

        Same contract as :meth:`producer.Client.predict_many`.
        """
        timeout_s = timeout_s or self.timeout_s
        pendings = _core.prepare_many(model, batch, route=route, timeout_s=timeout_s)
        if not pendings:
            return []
        gatherer = _core.Gatherer(pendings, timeout_s)
        async with self.redis.pipeline(transaction=False) as pipe:
            for p in pendings:
                pipe.xadd(keys.request_stream(model), p.fields)
            pipe.blpop([gatherer.reply_key], timeout=_core.block_s(gatherer.deadline_s))
            first = (await pipe.execute())[-1]
        gatherer.take([first[1]] if first else None)
        # LPOP with a count gives a list; replies are bytes (redis-py's types also cover decode_responses).
        while first and not gatherer.done():
            popped = cast("list[bytes] | None", await self.redis.lpop(gatherer.reply_key, gatherer.remaining))
            if popped:
                gatherer.take(popped)
                continue
            first = cast("tuple[bytes, bytes] | None", await self.redis.blpop(
                [gatherer.reply_key], timeout=_core.block_s(gatherer.deadline_s)))
            gatherer.take([first[1]] if first else None)
        results = gatherer.outcome()
        return results if return_exceptions else [_core.unwrap(r) for r in results]

    async def record_outcome(self, model: str, request_id: str, *, correct: bool | None = None,
                             label: str | None = None, pnl: float | None = None) -> str:
        """Report what happened after a prediction; see :meth:`producer.Client.record_outcome`."""
        fields = messages.encode_outcome(request_id, correct=correct, label=label, pnl=pnl,
                                         at_ms=int(time.time() * 1000))
        entry = await self.redis.xadd(keys.outcomes_stream(model), fields, maxlen=_core.OUTCOMES_MAXLEN,
                                      approximate=True)
        return cast(bytes, entry).decode()  # a bytes client: the entry id is bytes

    async def health(self, model: str) -> Health:
        """Live workers of ``model`` and the versions they serve."""
        # Without withscores, ZRANGEBYSCORE gives plain members (redis-py's type also allows pairs).
        members = cast("list[bytes | str]", await self.redis.zrangebyscore(*presence.members_query(model)))
        async with self.redis.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.hgetall(keys.worker_hash(model, text(member)))
            hashes = await pipe.execute() if members else []
        return Health(model, presence.parse_live(hashes))

    async def close(self) -> None:
        """Release the connection pool."""
        await self.redis.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

