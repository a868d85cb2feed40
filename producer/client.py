"""The bot's synchronous client."""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from producer import _connect, _core
from producer.health import Health, read_health
from protocol import connection, keys, messages
from protocol.errors import ReplyError
from protocol.messages import Prediction

SELECT_MAX_FD = 1024  # FD_SETSIZE: select() refuses higher descriptors
PRECISE_WAIT_S = 0.002  # the end of a wait is timed with select(), to the microsecond


class Client:
    """Send feature tensors to a model's stream and wait for the replies.

    Thread-safe: each thread keeps a connection of redis-py's pool for its calls (on a
    cluster, each call takes one from the node's pool). ``timeout_s``
    is honoured to the millisecond whatever the connection's ``socket_timeout`` and the
    server's timer: no read waits past the call's deadline, and with :meth:`from_url` no
    connection takes longer to open (a ``redis.Redis`` passed in opens with its own
    timeouts). A connection lost while waiting
    is re-opened and the wait repeated (the request is not re-sent) until the deadline.

    ``fail_fast`` (default): a model the registry does not know raises ``ModelNotFound``,
    one no live worker serves raises ``Unavailable``, before anything is sent; with
    ``fail_fast=False`` such a request is queued (and trimmed once older than
    ``max_timeout_s``). ``max_timeout_s`` is the longest ``timeout_s`` allowed: every
    XADD trims its stream to entries younger than that (by the server's clock). See
    docs/protocol.md §4.
    """

    def __init__(self, client: redis.Redis, *, timeout_s: float = 1.0, spin_ms: float = 0.0,
                 fail_fast: bool = True, max_timeout_s: float = 60.0) -> None:
        self.redis = client
        self.timeout_s = _core.check_call(timeout_s, max_timeout_s)
        self.fail_fast, self.max_timeout_s = fail_fast, max_timeout_s
        # Low-latency mode: poll the socket this long for the answers before sleeping in the kernel.
        self.spin_s = spin_ms / 1000
        self._finished = _core.Finished()
        self._router = _core.Router()
        self._clock = _core.ServerClock()
        self._cluster = connection.is_cluster(client)
        self._leases = threading.local()  # one server: this thread's kept connection (_Lease)

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 1.0, spin_ms: float = 0.0, fail_fast: bool = True,
                 max_timeout_s: float = 60.0, **redis_kwargs: Any) -> Client:
        """A client for ``redis://host:port/db``, or a Redis Cluster with ``redis+cluster://host:port``.

        ``spin_ms`` > 0 is the low-latency mode: each call polls its socket for the reply
        for up to that long before it sleeps, trading a busy core for one wake-up fewer.
        """
        redis_kwargs.setdefault("connection_class", _connect.connection_class(url))
        return cls(connection.connect(url, **redis_kwargs), timeout_s=timeout_s, spin_ms=spin_ms,
                   fail_fast=fail_fast, max_timeout_s=max_timeout_s)

    def predict(self, model: str, features: _core.Features, *, route: str = "",
                timeout_s: float | None = None, sample_ndim: int | None = None,
                request_id: str | None = None, lane: str = "live", resend: bool = False,
                experiment: bool = True) -> Prediction:
        """One request (one sample, or N if ``sample_ndim`` says the array has a batch axis).

        One sample (a bare array or dict of arrays, the batch axis added here): the reply's
        ``outputs`` have their per-sample shapes and ``p.value`` / ``p.label`` read them. N rows:
        the outputs keep their axis of N, and ``p.values`` / ``p.labels`` hold one entry per row.
        The XADD and the wait go in one round trip. Raises the ``ReplyError`` subclass
        matching the reply's code, ``DeadlineExceeded`` when no reply came within
        ``timeout_s``, ``Overloaded`` at once when Redis is out of memory or when the
        shard's backlog cannot drain within ``timeout_s`` (nothing is sent then), and
        ``Unavailable`` when Redis cannot be reached (at once if nothing was sent), and
        its subclass ``Interrupted`` when a cluster failover lost the request (re-send it).
        Before anything is sent, ``ModelNotFound`` / ``Unavailable`` if nobody serves the
        model (``fail_fast``); ``InvalidInput`` for a ``timeout_s`` over ``max_timeout_s``.
        ``request_id`` defaults to a random one; a given one is checked. ``route`` (e.g.
        the symbol) picks the shard, so one symbol's requests stay in order; ``lane`` is
        the priority: ``live`` is always served before ``backfill``. ``resend=True`` with the
        ``request_id`` of an ``Interrupted`` call sends it again (computed once, §4).
        ``experiment=False`` keeps the request out of the model's experiment (tests, debugging,
        anything that will never report an outcome): the Production version answers, nothing is
        journaled, and the reply's ``variant`` is ``none``. A worker that predates this ignores it
        and serves the request as any other: then ``variant`` names the arm that journaled it.
        """
        timeout_s = _core.check_call(timeout_s or self.timeout_s, self.max_timeout_s, request_id, resend)
        deadline_s = time.time() + timeout_s  # the caller's clock starts now, before the state read
        target = self._target(model, route, lane, timeout_s)
        pending = _core.prepare(target, features, route=route, timeout_s=timeout_s,
                                sample_ndim=sample_ndim, request_id=request_id, resend=resend,
                                deadline_s=deadline_s, experiment=experiment)
        return _core.unwrap(self._exchange(target, [pending], timeout_s)[0])

    def predict_many(self, model: str, batch: Sequence[_core.Features], *, route: str = "",
                     timeout_s: float | None = None, return_exceptions: bool = False,
                     lane: str = "live", request_ids: Sequence[str] | None = None,
                     resend: bool = False, experiment: bool = True) -> list[Prediction | ReplyError]:
        """Many single-sample requests: every XADD in one pipelined round trip, replies gathered.

        One ``Prediction`` per sample, each as a single-sample :meth:`predict` returns it (outputs
        without the batch axis). The requests share one reply list, so collecting N replies costs a few round
        trips, not N; they all go to one shard (``route``'s, or the next round-robin
        one). With ``return_exceptions`` a failed request's error takes its place in the
        list; otherwise the first error is raised. ``Overloaded`` and ``Unavailable``
        (Redis itself failing, or a backlog too long for ``timeout_s``) are always raised;
        after ``Interrupted`` (a failover lost them) the same samples may be sent again with
        ``request_ids=e.request_ids``-matching ids and ``resend=True``. ``experiment=False``:
        every sample outside the experiment, as in :meth:`predict`.
        """
        timeout_s = _core.check_call(timeout_s or self.timeout_s, self.max_timeout_s)
        deadline_s = time.time() + timeout_s
        if not batch:
            return []
        target = self._target(model, route, lane, timeout_s)
        pendings = _core.prepare_many(target, batch, route=route, timeout_s=timeout_s,
                                      request_ids=request_ids, resend=resend, deadline_s=deadline_s,
                                      experiment=experiment)
        results = self._exchange(target, pendings, timeout_s)
        return results if return_exceptions else [_core.unwrap(r) for r in results]

    def _target(self, model: str, route: str, lane: str, timeout_s: float) -> _core.Target:
        """The shard and lane, after refreshing a stale state; ``Overloaded`` if it cannot keep up,
        ``ModelNotFound`` / ``Unavailable`` (fail-fast) if nobody would serve it."""
        if self._router.layout_stale(model):
            self._read_state(model, timeout_s)
        if self.fail_fast and self._router.refusal(model) is not None:
            if self._router.answer_age_s(model) > _core.NEGATIVE_RECHECK_S:
                self._read_state(model, timeout_s)  # a worker may have just started
            if (refusal := self._router.refusal(model)) is not None:
                raise refusal
        target = self._router.target(model, route, lane)
        self._router.check(target, timeout_s)
        return target

    def _read_state(self, model: str, timeout_s: float) -> None:
        """Re-read the model's layout, registry entry and presence: one round trip, bounded by
        ``STATE_READ_MAX_S``; unreadable (Redis down, a node failing over) keeps the last state,
        and is tried again after the refresh interval, not on every call."""
        trip = self._router.state_trip(model, time.time() + min(timeout_s, _core.STATE_READ_MAX_S))
        answers = None
        try:
            answers = self._round_trip(trip)
        except _core.NotConnected:
            if self._cluster:  # its node is gone (a failover?): the next read goes to the new master
                self._refresh_slots_quietly()
        except _core.RETRYABLE:
            pass  # the last state stands until the next read
        self._router.set_state(model, answers)

    def _exchange(self, target: _core.Target, pendings: list[_core.Pending],
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
                    exchange.receive(self._round_trip(trip))
                except _core.RETRYABLE as e:
                    if self._cluster and isinstance(e, _core.NotConnected) and not exchange.queued:
                        # Nothing sent, its node unreachable: a failover may be under way; the slot
                        # map is re-read and the request sent (to the new master) within the deadline.
                        self._refresh_slots_quietly()
                        time.sleep(exchange.refused_for_now(e))
                        continue
                    wait_s = exchange.lost(e)
                    if self._cluster and not exchange.done():
                        self._after_loss(exchange, sent_to)
                    time.sleep(wait_s)
                except _core.NotQueued as e:
                    time.sleep(exchange.refused_for_now(e))
                except _core.Redirected as e:
                    self._refresh_slots()
                    if exchange.queued:  # the wait moved (a failover or a migration): is the request there?
                        self._look_on_new_master(exchange, sent_to)
                    time.sleep(exchange.redirected(e))
            return exchange.outcome()
        finally:
            self._finished.add(exchange.reply_key)
            self._router.set_load(target, exchange.extra_answers)

    def _after_loss(self, exchange: _core.Exchange, sent_to: str) -> None:
        """A cluster trip lost once the request may be queued: re-read the slot map; if the slot has a
        new master (a failover), look for the request there (``Interrupted`` if it is not)."""
        self._refresh_slots_quietly()
        self._look_on_new_master(exchange, sent_to)

    def _refresh_slots_quietly(self) -> None:
        """Re-read the cluster's slot map; a failure leaves the old one."""
        with contextlib.suppress(redis.RedisError):
            self._refresh_slots()

    def _look_on_new_master(self, exchange: _core.Exchange, sent_to: str) -> None:
        """If the slot's master is no longer ``sent_to``, raise ``Interrupted`` unless the request's
        entries or replies are there (then the wait goes on there)."""
        if self._node_name(exchange.reply_key) in ("", sent_to):
            return  # the same node (a blip, or not failed over yet): the wait is retried there
        with contextlib.suppress(*_core.RETRYABLE):
            exchange.verified(self._round_trip(exchange.verify_trip()))

    def _node_name(self, key: str) -> str:
        """The node serving ``key``'s slot now ("" without a cluster, or while none does)."""
        return _core.node_name(self.redis, key) if self._cluster else ""

    def _refresh_slots(self) -> None:
        """Re-read the cluster's slot map after MOVED/ASK (a slot migrated or failed over)."""
        self.redis.nodes_manager.initialize()  # type: ignore[attr-defined]  # RedisCluster only

    def _pool(self, key: str) -> Any:
        """The connection pool of the node serving ``key`` (the only one without a cluster)."""
        if not self._cluster:
            return self.redis.connection_pool
        node = self.redis.get_node_from_key(key)  # type: ignore[attr-defined]  # RedisCluster only
        return node.redis_connection.connection_pool

    def _round_trip(self, trip: _core.Trip) -> list[Any]:
        """Send ``trip`` on one connection and read every answer; no redis-py retry (it would
        re-send the XADD). A connection left with unread answers is closed, never reused."""
        try:
            pool = self._pool(trip.key)
        except redis.RedisError as e:
            raise _core.NotConnected(str(e)) from e
        opening = _connect.CONNECT_BY.set(trip.deadline_s)  # a connection (re)opened here ends by then
        try:
            conn = self._connection(pool, trip)
            try:
                # One buffer, one send: every send on loopback costs a system call and a server wake-up.
                conn.send_packed_command([connection.pack(trip.commands)])
                spin_until_s = time.monotonic() + self.spin_s
                answers = [_answer(conn, trip, spin_until_s) for _ in range(trip.head)]
                if trip.check is not None:
                    trip.check(answers)  # may raise: a refused XADD, with the wait still blocked
                return answers + [_answer(conn, trip, spin_until_s) for _ in trip.commands[trip.head:]]
            except BaseException:
                conn.disconnect()  # a kept connection reconnects on its next send
                raise
            finally:
                if self._cluster:
                    pool.release(conn)
        finally:
            _connect.CONNECT_BY.reset(opening)  # whatever ended the trip: later opens are redis-py's

    def _connection(self, pool: Any, trip: _core.Trip) -> Any:
        """The trip's connection, open (``Any``: redis-py leaves its low-level methods untyped).
        Not open by the deadline: ``DeadlineReached``, as a wait on a wedged server ends; else
        unreachable: ``NotConnected`` (nothing was sent)."""
        try:
            return pool.get_connection() if self._cluster else self._kept_connection()
        except _core.RETRYABLE as e:
            if isinstance(e, redis.TimeoutError) and time.time() >= trip.deadline_s:
                raise _core.DeadlineReached(f"Redis did not open the connection by the call's deadline: "
                                            f"{e}") from e
            raise _core.NotConnected(str(e)) from e

    def _kept_connection(self) -> Any:
        """This thread's connection, taken from the pool once and kept: redis-py 8's checkout and
        release (a lock, set updates, observability hooks) cost more CPU than the rest of a
        call's Python. Given back when the thread ends; a forked child takes its own."""
        lease = getattr(self._leases, "lease", None)
        if lease is None or lease.pid != os.getpid():
            pool = self.redis.connection_pool
            lease = self._leases.lease = _Lease(pool, pool.get_connection())
        # As the pool's checkout does, before anything is sent: (re)connect, and a connection with
        # something to read between calls (the server closed it: restarted, or an idle timeout) is
        # replaced. A server that is down then fails the call as "nothing sent", at once, not as an
        # answer lost in flight to be waited for until the deadline.
        conn = lease.conn
        try:
            stale = _readable(conn, 0)  # one poll; redis-py's can_read when not connected (connects)
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            stale = True
        if stale:
            conn.disconnect()
            conn.connect()
        return conn

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
        pipe = self.redis.pipeline(transaction=False)  # one slot: the model's outcomes stream
        for fields in encoded:
            pipe.xadd(keys.outcomes_stream(model), fields, maxlen=_core.OUTCOMES_MAXLEN, approximate=True)
        return [entry.decode() for entry in pipe.execute()]

    def health(self, model: str) -> Health:
        """Live workers of ``model`` (from their heartbeats) and the versions they serve."""
        return read_health(self.redis, model)

    def close(self) -> None:
        """Delete the reply keys of finished calls (best effort), release the connection pool."""
        try:
            # Bounded: a hung or unreachable server must not hold the bot; keys left expire.
            for trip in _core.unlink_trips(self._finished.take(), time.time() + _core.CLOSE_MAX_S):
                self._round_trip(trip)
        except (redis.RedisError, _core.NotConnected):
            pass  # they expire with the reply TTL
        finally:
            self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Lease:
    """A connection a thread keeps; back to its pool when the thread (or the client) is gone."""

    def __init__(self, pool: Any, conn: Any) -> None:
        self.pool, self.conn, self.pid = pool, conn, os.getpid()

    def __del__(self) -> None:
        if self.pid == os.getpid():  # never touch a parent's socket after a fork
            with contextlib.suppress(Exception):  # the pool may be gone at interpreter exit
                self.pool.release(self.conn)


def _await_answer(conn: Any, trip: _core.Trip, *, buffered: bool = True) -> bool:
    """Sleep until an answer can be read, or raise ``DeadlineReached`` at the trip's deadline;
    whether it can (False: no socket, or one ``select`` cannot take, left to a read with a
    socket timeout, which ``poll`` keeps to the millisecond). Without ``buffered``, bytes in
    the parser do not count (they are part of an answer): only the socket's.

    A socket timeout (``poll``) is rounded up to the next whole millisecond, so the wait is an
    ordinary one until ``PRECISE_WAIT_S`` before the deadline (where almost every answer has
    come), and ``select``, which takes microseconds, for the rest: the caller's deadline is
    kept to about 0.1 ms.
    """
    left_s = trip.deadline_s - time.time()
    if left_s > PRECISE_WAIT_S and _readable(conn, left_s - PRECISE_WAIT_S, buffered=buffered):
        return True
    if _readable(conn, 0, buffered=buffered):  # buffered already (or TLS bytes the socket no longer shows)
        return True
    sock = getattr(conn, "_sock", None)
    if sock is None or sock.fileno() >= SELECT_MAX_FD:
        return False
    if not select.select([sock], [], [], max(0.0, trip.deadline_s - time.time()))[0]:
        raise _core.DeadlineReached("no answer from Redis by the call's deadline")
    return True


def _readable(conn: Any, timeout_s: float, *, buffered: bool = True) -> bool:
    """An answer is buffered (``buffered``), or the socket turns readable within ``timeout_s``:
    one ``poll``.

    redis-py's ``can_read`` also peeks at a readable socket to tell a closed one apart (a
    non-blocking switch and a peek: three more system calls per wait); here the read that
    follows finds the end of the stream and raises the same ``ConnectionError``. Without
    hiredis's reader, a socket not connected yet, or TLS (bytes buffered in the TLS layer),
    redis-py's own check decides.
    """
    reader: Any = getattr(getattr(conn, "_parser", None), "_reader", None)
    sock = getattr(conn, "_sock", None)
    if sock is None or not hasattr(reader, "has_data") or hasattr(sock, "pending"):
        return bool(conn.can_read(timeout=timeout_s))
    if buffered and reader.has_data():
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


def _buffered_answer(take: Callable[[], Any] | None) -> Any:
    """The next answer if it has arrived already (with an earlier one, in the same read), as
    :func:`_answer` gives it; :data:`protocol.connection.NOT_IN` otherwise (or without ``take``,
    the connection's :func:`protocol.connection.buffered_reader`). No wait and no socket timeout
    to set: the first trip's answers to ``UNLINK`` and ``XADD`` usually come together."""
    return _core.settled(take() if take is not None else connection.NOT_IN)


def _answer(conn: Any, trip: _core.Trip, spin_until_s: float = 0.0) -> Any:
    """One command's answer, raw bytes; an error answer is returned (the connection is fine).

    Until ``spin_until_s`` (monotonic; the low-latency mode) the socket is polled rather
    than slept on, so a reply arriving by then finds this thread running. No read waits
    past the trip's deadline (``DeadlineReached``; the caller closes the connection).
    """
    take = connection.buffered_reader(conn)
    buffered = _buffered_answer(take)
    if buffered is not connection.NOT_IN:
        return buffered
    while time.monotonic() < spin_until_s and not conn.can_read(timeout=0):
        pass
    if take is not None and _plain_socket(conn):
        return _read_directly(conn, trip, take)
    _await_answer(conn, trip)
    return _timed_read(conn, trip)


def _read_directly(conn: Any, trip: _core.Trip, take: Callable[[], Any]) -> Any:
    """The answer read straight into the parser: each receive follows a wait for the socket (to
    the deadline), so it cannot block, and the next comes only when the answer is not complete.
    redis-py's timed read sets and restores a socket timeout around each (two system calls)."""
    while _await_answer(conn, trip, buffered=False):
        conn._parser.read_from_socket()  # one receive; a closed connection raises ConnectionError
        answer = _buffered_answer(take)
        if answer is not connection.NOT_IN:
            return answer
    return _timed_read(conn, trip)  # a descriptor beyond select's reach: the wait ends by poll


def _timed_read(conn: Any, trip: _core.Trip) -> Any:
    """The answer by redis-py's read, under a socket timeout at the trip's deadline."""
    try:
        # disconnect_on_error=False: an error answer (even LOADING, which redis-py raises as a
        # ConnectionError) leaves the rest readable; on anything else _round_trip closes it.
        return conn.read_response(disable_decoding=True, timeout=trip.read_timeout_s(),
                                  disconnect_on_error=False)
    except _core.ERROR_ANSWERS as e:
        return e
    except redis.TimeoutError as e:
        raise _core.DeadlineReached(f"no answer from Redis by the call's deadline: {e}") from e


def _plain_socket(conn: Any) -> bool:
    """A plain socket, where "readable" means bytes to receive (with TLS it may mean a partial
    record, and a read could block)."""
    sock = getattr(conn, "_sock", None)
    return sock is not None and not hasattr(sock, "pending")
