"""The bot's asyncio client: the same calls as :class:`producer.Client`, awaitable."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import redis
import redis.asyncio as aioredis

from producer import _core
from producer.health import Health
from protocol import connection, keys, messages, presence
from protocol.errors import ReplyError
from protocol.messages import Prediction
from protocol.values import text


class AsyncClient:
    """Asyncio client; many concurrent ``predict`` calls share one connection pool.

    The same conversation with Redis as :class:`producer.Client` (``producer._core``):
    ``timeout_s`` honoured to the millisecond, replies read without removing them until
    they are in hand, the request never re-sent on a lost connection; the same
    ``fail_fast`` and ``max_timeout_s``.
    """

    def __init__(self, client: aioredis.Redis, *, timeout_s: float = 1.0, fail_fast: bool = True,
                 max_timeout_s: float = 60.0) -> None:
        self.redis = client
        self.timeout_s = _core.check_call(timeout_s, max_timeout_s)
        self.fail_fast, self.max_timeout_s = fail_fast, max_timeout_s
        self._finished = _core.Finished()
        self._router = _core.Router()
        self._clock = _core.ServerClock()
        self._cluster = connection.is_cluster(client)
        # One server: connections between calls, most recent last. Taken from the pool once and
        # kept (as the sync client keeps one per thread): the pool's checkout and release (a lock,
        # observability records, a task) cost more than the rest of a call's client code.
        self._idle: list[Any] = []

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 1.0, fail_fast: bool = True,
                 max_timeout_s: float = 60.0, **redis_kwargs: Any) -> AsyncClient:
        """A client for ``redis://host:port/db``, or a Redis Cluster with ``redis+cluster://host:port``."""
        return cls(connection.connect_async(url, **redis_kwargs), timeout_s=timeout_s, fail_fast=fail_fast,
                   max_timeout_s=max_timeout_s)

    async def predict(self, model: str, features: _core.Features, *, route: str = "",
                      timeout_s: float | None = None, sample_ndim: int | None = None,
                      request_id: str | None = None, lane: str = "live", resend: bool = False,
                      experiment: bool = True) -> Prediction:
        """One request; the XADD and the wait in one round trip. Same arguments, reply shapes
        and errors as :meth:`producer.Client.predict`."""
        timeout_s = _core.check_call(timeout_s or self.timeout_s, self.max_timeout_s, request_id, resend)
        deadline_s = time.time() + timeout_s  # the caller's clock starts now, before the state read
        target = await self._target(model, route, lane, timeout_s)
        pending = _core.prepare(target, features, route=route, timeout_s=timeout_s,
                                sample_ndim=sample_ndim, request_id=request_id, resend=resend,
                                deadline_s=deadline_s, experiment=experiment)
        return _core.unwrap((await self._exchange(target, [pending], timeout_s))[0])

    async def predict_many(self, model: str, batch: Sequence[_core.Features], *, route: str = "",
                           timeout_s: float | None = None, return_exceptions: bool = False,
                           lane: str = "live", request_ids: Sequence[str] | None = None,
                           resend: bool = False, experiment: bool = True) -> list[Prediction | ReplyError]:
        """Many single-sample requests: every XADD in one pipelined round trip, replies gathered.

        Same contract as :meth:`producer.Client.predict_many`.
        """
        timeout_s = _core.check_call(timeout_s or self.timeout_s, self.max_timeout_s)
        deadline_s = time.time() + timeout_s
        if not batch:
            return []
        target = await self._target(model, route, lane, timeout_s)
        pendings = _core.prepare_many(target, batch, route=route, timeout_s=timeout_s,
                                      request_ids=request_ids, resend=resend, deadline_s=deadline_s,
                                      experiment=experiment)
        results = await self._exchange(target, pendings, timeout_s)
        return results if return_exceptions else [_core.unwrap(r) for r in results]

    async def _target(self, model: str, route: str, lane: str, timeout_s: float) -> _core.Target:
        """See :meth:`producer.Client._target`."""
        if self._router.layout_stale(model):
            await self._read_state(model, timeout_s)
        if self.fail_fast and self._router.refusal(model) is not None:
            if self._router.answer_age_s(model) > _core.NEGATIVE_RECHECK_S:
                await self._read_state(model, timeout_s)  # a worker may have just started
            if (refusal := self._router.refusal(model)) is not None:
                raise refusal
        target = self._router.target(model, route, lane)
        self._router.check(target, timeout_s)
        return target

    async def _read_state(self, model: str, timeout_s: float) -> None:
        """See :meth:`producer.Client._read_state`."""
        trip = self._router.state_trip(model, time.time() + min(timeout_s, _core.STATE_READ_MAX_S))
        answers = None
        try:
            answers = await self._round_trip(trip)
        except _core.NotConnected:
            if self._cluster:  # its node is gone (a failover?): the next read goes to the new master
                await self._refresh_slots_quietly()
        except _core.RETRYABLE:
            pass  # the last state stands until the next read
        self._router.set_state(model, answers)

    async def _exchange(self, target: _core.Target, pendings: list[_core.Pending],
                        timeout_s: float) -> list[Prediction | ReplyError]:
        slot = connection.slot(pendings[0].reply_key) if self._cluster else None
        load = self._router.load_command(target)
        exchange = _core.Exchange(pendings, timeout_s, self._finished.take(slot), [load] if load else [],
                                  clock=self._clock, horizon_s=self.max_timeout_s)
        try:
            while not exchange.done():
                trip = exchange.trip()
                sent_to = self._node_name(trip.key)
                try:
                    exchange.receive(await self._round_trip(trip))
                except _core.RETRYABLE as e:
                    if self._cluster and isinstance(e, _core.NotConnected) and not exchange.queued:
                        # Nothing sent, its node unreachable: a failover may be under way; the slot
                        # map is re-read and the request sent (to the new master) within the deadline.
                        await self._refresh_slots_quietly()
                        await asyncio.sleep(exchange.refused_for_now(e))
                        continue
                    wait_s = exchange.lost(e)
                    if self._cluster and not exchange.done():
                        await self._after_loss(exchange, sent_to)
                    await asyncio.sleep(wait_s)
                except _core.NotQueued as e:
                    await asyncio.sleep(exchange.refused_for_now(e))
                except _core.Redirected as e:
                    await self.redis.nodes_manager.initialize()  # type: ignore[attr-defined]  # cluster only
                    if exchange.queued:  # the wait moved (a failover or a migration): is the request there?
                        await self._look_on_new_master(exchange, sent_to)
                    await asyncio.sleep(exchange.redirected(e))
            return exchange.outcome()
        finally:
            self._finished.add(exchange.reply_key)
            self._router.set_load(target, exchange.extra_answers)

    async def _after_loss(self, exchange: _core.Exchange, sent_to: str) -> None:
        """See :meth:`producer.Client._after_loss`."""
        await self._refresh_slots_quietly()
        await self._look_on_new_master(exchange, sent_to)

    async def _refresh_slots_quietly(self) -> None:
        """Re-read the cluster's slot map; a failure leaves the old one."""
        with contextlib.suppress(redis.RedisError):
            await self.redis.nodes_manager.initialize()  # type: ignore[attr-defined]  # cluster only

    async def _look_on_new_master(self, exchange: _core.Exchange, sent_to: str) -> None:
        """See :meth:`producer.Client._look_on_new_master`."""
        if self._node_name(exchange.reply_key) in ("", sent_to):
            return
        with contextlib.suppress(*_core.RETRYABLE):
            exchange.verified(await self._round_trip(exchange.verify_trip()))

    def _node_name(self, key: str) -> str:
        """See :meth:`producer.Client._node_name`."""
        return _core.node_name(self.redis, key) if self._cluster else ""

    async def _round_trip(self, trip: _core.Trip) -> list[Any]:
        """See :meth:`producer.Client._round_trip`; a cancelled call closes its connection."""
        if self._cluster:
            return await self._cluster_round_trip(trip)
        pool: Any = self.redis.connection_pool  # Any: redis-py leaves these methods untyped
        try:
            conn: Any = self._idle.pop() if self._idle else pool.get_available_connection()
        except _core.RETRYABLE as e:  # the pool's max_connections
            raise _core.NotConnected(str(e)) from e
        try:
            await _open(conn, trip, pool.ensure_connection)
            return await _send(conn, trip)
        finally:
            self._idle.append(conn)  # closed if the trip failed: opened again on its next use

    async def _cluster_round_trip(self, trip: _core.Trip) -> list[Any]:
        """The same on the connection of the node that serves ``trip.key``'s slot."""
        cluster: Any = self.redis  # an asyncio RedisCluster
        try:
            await cluster.initialize()  # a no-op once the slot map is known
            node = cluster.get_node_from_key(trip.key)
            conn: Any = node.acquire_connection()
        except redis.RedisError as e:
            raise _core.NotConnected(str(e)) from e
        try:
            await _open(conn, trip, _connect)
            return await _send(conn, trip)
        finally:
            node.release(conn)

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
        """Delete the reply keys of finished calls (best effort), release the connection pool."""
        try:
            # Bounded: a hung or unreachable server must not hold the bot; keys left expire.
            for trip in _core.unlink_trips(self._finished.take(), time.time() + _core.CLOSE_MAX_S):
                await self._round_trip(trip)
        except redis.RedisError:
            pass  # they expire with the reply TTL
        finally:
            idle, self._idle = self._idle, []
            for conn in idle:  # back to the pool, which closes them with the rest
                await self.redis.connection_pool.release(conn)
            await self.redis.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()



async def _open(conn: Any, trip: _core.Trip, ready: Callable[[Any], Awaitable[None]]) -> None:
    """``ready(conn)`` (open it, or check an open one as the pool's checkout does), a connection
    not yet open opened by the trip's deadline: redis-py's own timeouts (5 s each by default)
    would hold a call to a server that accepts connections but never answers. Not open in time:
    ``DeadlineReached``; refused: ``NotConnected`` (nothing was sent); the half-open connection
    closed either way. An open one takes no timer (the usual case; one the server has closed
    is re-opened untimed)."""
    try:
        if conn.is_connected:
            await ready(conn)
            return
        async with asyncio.timeout_at(asyncio.get_running_loop().time() + trip.read_timeout_s()):
            await ready(conn)
    except TimeoutError as e:  # the builtin (asyncio's): the deadline came first
        await conn.disconnect()
        # The caller's time ran out, as on a wedged server's open connection: DeadlineExceeded.
        raise _core.DeadlineReached("Redis did not open the connection by the call's deadline") from e
    except _core.RETRYABLE as e:
        await conn.disconnect()
        raise _core.NotConnected(str(e)) from e
    except BaseException:
        await conn.disconnect()
        raise


async def _connect(conn: Any) -> None:
    await conn.connect()  # a cluster node's connection: opened if it is not


async def _send(conn: Any, trip: _core.Trip) -> list[Any]:
    """Write the trip's commands and read every answer by the call's deadline; a connection left
    mid-answer (an error, a refused XADD, a cancellation, the deadline) is closed, never reused."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + trip.read_timeout_s()
    # The event loop's selector rounds a wait up to whole milliseconds twice (selectors, then
    # epoll): a long wait can end 2 ms late. So the timer is set NUDGE_S before the deadline, and
    # from there to the deadline: that last wait of 1 or 2 ms rounds exactly. One timer a trip
    # (each costs heap work in the loop), and one timer for the whole trip, not one per read.
    timer = asyncio.timeout(None)
    arming = loop.call_at(deadline - NUDGE_S, timer.reschedule, deadline)
    try:
        async with timer:
            await _write(conn, connection.pack(trip.commands))  # packed in C, one buffer
            direct = _direct(conn)  # once a trip: the connection is open from here to its end
            answers = [await _answer(conn, direct) for _ in range(trip.head)]
            if trip.check is not None:
                trip.check(answers)  # may raise: a refused XADD, with the wait still blocked
            return answers + [await _answer(conn, direct) for _ in trip.commands[trip.head:]]
    except TimeoutError as e:  # the builtin (asyncio's): the call's deadline came first
        await conn.disconnect(nowait=True)  # not waiting for the close: the caller's time is up
        raise _core.DeadlineReached("no answer from Redis by the call's deadline") from e
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        arming.cancel()


NUDGE_S = 0.002  # how long before the deadline the trip's timer is set to the deadline itself


async def _write(conn: Any, data: bytes) -> None:
    """Hand ``data`` to the connection's transport, waiting only while its buffer is over the
    high-water mark. redis-py's send runs each write as a task under its socket timeout (the
    trip's deadline bounds this one)."""
    writer = getattr(conn, "_writer", None)
    if writer is None:  # not redis-py's stream connection: its own send
        await conn.send_packed_command(data, check_health=False)
        return
    try:
        writer.write(data)
        await writer.drain()  # at once unless the transport is paused
    except OSError as e:
        raise redis.ConnectionError(f"Error while writing to Redis: {e}") from e


async def _answer(conn: Any, direct: bool) -> Any:
    """One command's answer, raw bytes; an error answer is returned (the connection is fine).

    Read straight from the connection's hiredis reader, receiving only while the answer is
    incomplete: redis-py's read wraps each answer in several layers of checks. A push between
    answers (RESP3) goes to the parser's push handler, as redis-py's own read does."""
    if not direct:  # see _direct
        return await _read_by_redis_py(conn)
    reader = conn._parser._reader
    push = conn._parser._hiredis_PushNotificationType
    try:
        while True:
            answer = reader.gets(False)
            while answer is connection.NOT_IN:
                await conn._parser.read_from_socket()  # one receive; a closed connection: ConnectionError
                answer = reader.gets(False)
            if push is None or not isinstance(answer, push):
                return _core.settled(answer)
            await conn._parser.handle_push_response(answer)
    except OSError as e:
        raise redis.ConnectionError(f"Error while reading from Redis: {e}") from e


def _direct(conn: Any) -> bool:
    """Whether ``conn``'s answers can be read straight from its hiredis reader: redis-py's asyncio
    hiredis parser, and on RESP3 a reader that tells pushes from answers (hiredis 3.2 or later)."""
    parser = getattr(conn, "_parser", None)
    pushes_told = getattr(parser, "_hiredis_PushNotificationType", None) is not None
    return (type(parser) is connection.ASYNC_PARSER and getattr(parser, "_reader", None) is not None
            and connection.NOT_IN is not None and (str(conn.protocol) == "2" or pushes_told))


async def _read_by_redis_py(conn: Any) -> Any:
    try:
        # inf: no timeout of its own (the trip's deadline covers it); None would mean socket_timeout.
        return await conn.read_response(disable_decoding=True, timeout=math.inf, disconnect_on_error=False)
    except _core.ERROR_ANSWERS as e:
        return e
