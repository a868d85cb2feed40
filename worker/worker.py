"""The worker: read models' streams through their consumer groups, micro-batch, infer, reply, ack.

One process serves a set of models (one, with ``--model``; :mod:`worker.selection`),
each a :class:`~worker.served.ServedModel`. The loop is single-threaded on purpose: a batch
is read, computed and answered in order, so "finish the in-flight batch" on
SIGTERM is "finish this iteration, then read the answers still owed". Under load
(``overlap_io``) the next batch's read is sent before the model call and each reply
transaction's answer is read after the next call, so Redis works while the model
does; nothing is acked outside the transaction that carries its reply. The parts
it ties together:
:class:`~worker.consumer.StreamConsumer` (read, reclaim, one MULTI/EXEC for
replies and acks), :class:`~worker.slot.ModelSlot` (the served version and its
background reload), :class:`~worker.arms.ExperimentArms` (the experiment's
treatment) and :class:`~worker.processing.BatchProcessor` (entries → replies).

Between models: one XREADGROUP reads every model's streams that have room in hand (one
per node: a cluster puts each model in hash slots of its own); the schedule
(:class:`~worker.scheduler.DeficitScheduler`) picks whose entries go next, live lane
before backfill, in rows; a batch is always one (model, shard)'s. Models load on their
first request (a pinned one at start-up) into an LRU cache under a budget of measured
sizes (:class:`~worker.cache.ModelCache`); a request that cannot wait for the load is
answered OVERLOADED at once.

A worker reading several shards or models (on a cluster, on several nodes) contains a
node's failure to the shards it holds: a Redis error on one shard puts that shard on a
backoff of its own, its reads skipped and its unwritten reply transactions kept on
its consumer and written first when it is tried again, while the other shards are
served; the model's own slot (heartbeat, take-over, reconcile) failing is reported
and retried without holding them. With one shard, a failure is the worker's: it
waits with backoff, and its write is retried in place until it lands.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis

from protocol import connection, keys, presence
from protocol.connection import REDIS_ERRORS
from protocol.control import Command
from protocol.errors import StreamserveError
from protocol.settings import Settings
from registry import Registry
from worker.arms import ExperimentArms
from worker.cache import ModelCache, keep_batch_memory, release_memory
from worker.consumer import Entry, Outbox, StreamConsumer, read_many, read_on_node
from worker.control import ControlListener
from worker.load import LoadMeter, publish_many
from worker.processing import BatchProcessor
from worker.scheduler import DeficitScheduler
from worker.selection import ModelSelector
from worker.served import ServedModel, hopeless
from worker.slot import ModelSlot

log = logging.getLogger(__name__)
RELOAD_POLL_MS = 20
MIB = 1 << 20
# A model never loaded in this process, and none other measured yet: how long its first load is
# expected to take (a request with less time to its deadline is answered OVERLOADED at once).
DEFAULT_LOAD_MS = 1000.0
# While a model loads on request, an idle worker looks for new entries (and the load's end) this
# often: the load's first request should not wait a whole block_ms more.
LOAD_POLL_MS = 2
# Take-over passes look only at groups with entries pending beyond this worker's own, but every
# this many passes at all of them: a dead worker's consumers without entries are removed then.
TAKEOVER_FULL_EVERY = 10
# A model whose load on request failed answers MODEL_NOT_FOUND; it is tried again after this long.
LOAD_RETRY_S = 10.0
# Reading several shards: each idle wait blocks on one shard for at most this long, then the next,
# so an idle worker answers a request on any of its shards within about this delay.
MULTI_SHARD_BLOCK_MS = 5
BACKOFF_FIRST_S = 0.05  # after a failed step or write; doubles per failure in a row
BACKOFF_MAX_S = 2.0  # also bounds how long after a Redis restart serving resumes
# A worker reading several shards puts a failing shard on a backoff of its own, capped lower: a
# master that failed over is read again soon after its replica takes over (an attempt on a node
# that refuses connections costs milliseconds).
SHARD_BACKOFF_MAX_S = 0.5
# ... but after a timeout (a node that does not answer at all), at least this many times as long
# as the attempt took: such a shard gets at most a fifth of the loop's time.
SHARD_BACKOFF_TIME_RATIO = 4.0
# A failed heartbeat, take-over or reconcile (several shards) is retried on a backoff capped at this:
# the first heartbeat after a failover of the model's own slot lands soon, before it looks stale.
MAINTENANCE_BACKOFF_MAX_S = 0.25
# A worker's cluster client: a command to a node that is down fails within the longest blocking
# read plus this, instead of waiting out the library's retries (``connection.connect``).
FAIL_FAST_MARGIN_S = 2.0


class Backoff:
    """Exponential delays for failures in a row: 50 ms, 100 ms … capped (at 2 s); reset on success."""

    def __init__(self, max_s: float = BACKOFF_MAX_S) -> None:
        self.max_s = max_s
        self.failures = 0
        self.retry_at_s = 0.0  # monotonic: the next attempt is due then (:meth:`fail`)

    def next_delay_s(self) -> float:
        """The delay before the next attempt, counting this failure."""
        self.failures += 1
        return min(self.max_s, BACKOFF_FIRST_S * 2 ** (self.failures - 1))

    def fail(self, at_least_s: float = 0.0) -> float:
        """Count a failure; the next attempt is due after the delay returned (``at_least_s`` or more)."""
        delay_s = max(at_least_s, self.next_delay_s())
        self.retry_at_s = time.monotonic() + delay_s
        return delay_s

    def reset(self) -> None:
        """The last attempt worked."""
        self.failures = 0
        self.retry_at_s = 0.0


class Pulse:
    """While a batch computes, calls ``beat`` about every ``interval_s`` from a thread of its own.

    The loop beats between batches; a model call longer than the heartbeat TTL would
    otherwise make a live worker look dead, and the fleet would take its batch over and
    compute it a second time. ``beat`` decides whether a beat is due.
    """

    def __init__(self, beat: Callable[[], None], interval_s: float) -> None:
        self.beat, self.interval_s = beat, interval_s
        # A plain flag, set and read whole under the GIL: entering a block costs an assignment,
        # not an Event's lock and notify (this brackets every batch).
        self._busy = False
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (a daemon: it never holds the process up)."""
        self._stopped.clear()
        self._thread = threading.Thread(target=self._run, name="pulse", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()

    def busy(self) -> Pulse:
        """Beat while the ``with`` block runs."""
        return self

    def __enter__(self) -> None:
        self._busy = True

    def __exit__(self, *exc: object) -> None:
        self._busy = False

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s / 4):
            if not self._busy:
                continue
            try:
                self.beat()
            except REDIS_ERRORS as e:  # Redis down: the loop reports it; beat again next time
                log.debug("heartbeat during a model call failed: %s", e)
            except Exception:  # never let the thread die: the next call would look dead
                log.exception("heartbeat during a model call failed")


class Worker:
    """Serve a set of models (one, with ``--model``) from their request streams until stopped (or
    drained, with ``burst``)."""

    def __init__(self, settings: Settings, model: str | ModelSelector, *, burst: bool = False,
                 max_queue_ms: float = 0.0, worker_id: str | None = None,
                 shards: Sequence[int] | None = None, pins: Sequence[str] = ()) -> None:
        self.settings, self.burst, self.max_queue_ms = settings, burst, max_queue_ms
        self.selector = model if isinstance(model, ModelSelector) \
            else ModelSelector((keys.check_model_name(model),))
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # The client name lets an operator find (and tests cut) a worker's connections in CLIENT LIST.
        # TCP keepalive notices a peer gone silent on an idle connection; a Unix socket (unix://,
        # same host) has no such option, and redis-py refuses the argument for it.
        keepalive = {} if settings.redis_url.startswith("unix:") else {"socket_keepalive": True}
        # On a cluster, a command to a dead master fails fast (the worker backs off that shard
        # and serves the others); the longest read the worker sends blocks for block_ms.
        self.redis = connection.connect(settings.redis_url, **keepalive,
                                        fail_fast_s=settings.block_ms / 1000 + FAIL_FAST_MARGIN_S,
                                        client_name=f"ss-worker:{self.worker_id}"[:120])
        self.registry = Registry(self.redis, settings.artifact_dir)
        # Pinned shards (``--shards``) are read whatever the layout says; otherwise the layout decides.
        shards = shards or settings.shard_list
        self.pinned = tuple(keys.check_shard(k) for k in shards) if shards else None
        # One model (``--model``) is pinned: loaded at start-up, never evicted, as a one-model worker was.
        one = self.selector.names if self.selector.is_static and len(self.selector.names) == 1 else ()
        self.pins = frozenset(keys.check_model_name(m) for m in (*pins, *one))
        self.cache = ModelCache(int(settings.model_memory_mb * MIB), settings.max_loaded_models, self.pins)
        self.scheduler = DeficitScheduler(settings.max_batch)
        # Imported here: prometheus-client comes with the worker extra, not with every CLI install.
        from worker.metrics import start_metrics
        self.metrics = start_metrics(settings, self.worker_id)
        self.served: dict[str, ServedModel] = {}
        self._template: StreamConsumer | None = None  # the first consumer: the server's features
        self._started = False  # _start_up has checked the server
        for name in self.selector.names:
            self._add_model(name)
        self.reload_requested, self.stopping = threading.Event(), threading.Event()
        self.membership_changed = False  # a control command named a served model (a pattern's set)
        self.batches = self.requests = 0
        self.computed = self.replayed = 0  # entries that went into a model call; answered from a marker
        self._turn = 0  # which read group an idle worker on a cluster blocks on next
        self._takeovers = 0  # take-over passes so far
        self._due = {"heartbeat": 0.0, "reclaim": 0.0, "reconcile": 0.0, "load": 0.0}
        # What is wrong right now in the whole process, by area ("redis", "loop", …); each model's
        # own problems are its ServedModel's. Both go out in its heartbeat.
        self.problems: dict[str, str] = {}
        self._step_backoff, self._write_backoff = Backoff(), Backoff()
        # Several consumers: each (model, shard)'s failures in a row (one not listed has none), and
        # each maintenance area's (``_maintenance``).
        self._shard_backoff: dict[tuple[str, int], Backoff] = {}
        self._area_backoff: dict[str, Backoff] = {}
        self.listener: ControlListener | None = None
        self.pulse = Pulse(self._beat_if_due, settings.heartbeat_interval_s)
        self._beat_landed_s = -math.inf  # monotonic: when this worker's last heartbeat landed
        # Monotonic: no take-over or reclaim before this (after Redis was out of reach, _landed).
        self.takeover_after_s = 0.0

    # ---- the one-model view (``--model``): what a one-model worker's callers and tests use ----

    def _only(self) -> ServedModel:
        if len(self.served) != 1:
            raise AttributeError(f"{len(self.served)} models served: use worker.served[model]")
        return next(iter(self.served.values()))

    @property
    def model(self) -> str:
        """The model served (one-model workers only)."""
        return self._only().model

    @property
    def consumers(self) -> dict[int, StreamConsumer]:
        """The model's consumers by shard (one-model workers only)."""
        return self._only().consumers

    @property
    def consumer(self) -> StreamConsumer:
        """The consumer of the lowest shard read (one-model workers only)."""
        return self._only().consumer

    @property
    def slot(self) -> ModelSlot:
        """The model's slot (one-model workers only)."""
        return self._only().slot

    @property
    def arms(self) -> ExperimentArms:
        """The model's experiment arms (one-model workers only)."""
        return self._only().arms

    @property
    def processor(self) -> BatchProcessor:
        """The model's batch processor (one-model workers only)."""
        return self._only().processor

    @property
    def load(self) -> LoadMeter:
        """The model's load meter (one-model workers only)."""
        return self._only().load

    # ---- membership ----

    def _all_consumers(self) -> list[StreamConsumer]:
        return [c for s in list(self.served.values()) for c in list(s.consumers.values())]

    def _add_model(self, model: str) -> ServedModel:
        served = ServedModel(model, self.redis, self.registry, self.settings, self.worker_id,
                             self.metrics.model(model), max_queue_ms=self.max_queue_ms)
        self.served[model] = served
        self.cache.add(model)
        self._set_shards(served, self.pinned or (0,))
        return served

    def _drop_model(self, served: ServedModel) -> bool:
        """Stop serving a model the selector no longer selects, once nothing of it is in hand."""
        if served.busy or served.load_started_s is not None:
            return False
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(keys.workers_zset(served.model), self.worker_id)
        pipe.delete(keys.worker_hash(served.model, self.worker_id))
        pipe.execute()
        for shard in list(served.consumers):
            served.consumers[shard].leave()
            self._drop_shard(served, shard)
        served.unload("no longer served")
        del self.served[served.model]
        self.cache.remove(served.model)
        self.scheduler.forget(served.model)
        log.info("%s is no longer served here (no Production version matches)", served.model)
        return True

    def _reconcile_membership(self) -> None:
        """A pattern or ``--all-models``: serve the models now selected; drop the others once idle."""
        if self.selector.is_static:
            return
        wanted = self.selector.resolve(self.redis)
        for model in wanted:
            if model not in self.served:
                self._add_model(model)
                self._due["heartbeat"] = 0.0  # bots fail fast until it is heard of: beat now
                log.info("serving %s too (%d models)", model, len(self.served))
        for model in [m for m in self.served if m not in wanted]:
            if not self._drop_model(self.served[model]):
                self.membership_changed = True  # entries still in hand: try again next step

    def _set_shards(self, served: ServedModel, shards: Sequence[int]) -> None:
        """Read exactly ``shards`` of ``served``: consumers are added (their groups created) or dropped."""
        for k in sorted(set(shards) - set(served.consumers)):
            consumer = served.add_shard(k, self._template)
            if self._template is None:
                if self._started:  # the first after start-up (a pattern that matched nothing then)
                    consumer.ensure_group()
                    consumer.detect_server()
                self._template = consumer
        for k in set(served.consumers) - set(shards):
            self._drop_shard(served, k)

    def _drop_shard(self, served: ServedModel, shard: int) -> None:
        if served.drop_shard(shard):
            self._shard_backoff.pop((served.model, shard), None)

    # ---- the loop ----

    def run(self) -> None:
        """Serve until ``stop()`` (or a signal); in burst mode, until the streams are drained."""
        keep_batch_memory(int(self.settings.batch_memory_mb * (1 << 20)))
        while not self._start_up():
            self.metrics.tick()
            if self.stopping.is_set():
                self.metrics.close()
                return
        self.reconcile()
        log.info("worker %s serving %s, shards %s (%s)", self.worker_id, self.selector.describe(),
                 sorted({c.shard for c in self._all_consumers()}),
                 ", ".join(f"{m} {s.slot.describe()}" for m, s in self.served.items()))
        self.listener = None if self.burst else ControlListener(
            self.settings.redis_url, self.selector.matches, self._on_command,
            secret=self.settings.control_secret).start()
        self.pulse.start()
        try:
            while not self.stopping.is_set() and self._step_or_wait():
                pass
            self._answer_held()
        finally:
            self.pulse.stop()
            if self.listener is not None:
                self.listener.stop()
            self._sign_off()
            self.metrics.close()

    def _on_command(self, command: Command | None) -> None:
        """From the listener's thread: reconcile the model named (every model on reconnect; the
        membership too, for a model this worker does not serve yet)."""
        served = None if command is None else self.served.get(command.model)
        if served is None:
            self.reload_requested.set()
            return
        served.reload_requested = True
        self.membership_changed = not self.selector.is_static  # promoted or retired: in the set or out

    def _answer_held(self) -> None:
        """Stopping: answer the entries read but not yet batched (held, or read ahead), then make
        sure every reply transaction sent has landed. Entries of a model not loaded stay pending:
        the fleet takes them over once this worker has signed off."""
        for consumer in self._all_consumers():
            self.settle(consumer)
            n, entries = self.settings.max_batch, consumer.take_unanswered()
            if self.served[consumer.model].slot.loaded is None:
                continue
            for i in range(0, len(entries), n):
                self.process(entries[i:i + n], consumer=consumer)  # its write retries until it lands
            self.settle(consumer)
        self._write_all_unwritten()
        for consumer in self._all_consumers():
            if consumer.link is not None:
                consumer.link.release()

    def _write_all_unwritten(self) -> None:
        """Stopping: every reply transaction kept to be written again is written, each shard retried
        on its backoff until all have landed (a stopping worker owes them; the grace period bounds
        the wait)."""
        while owing := [c for c in self._all_consumers() if c.unwritten]:
            for consumer in owing:
                self._write_unwritten(consumer)
            retry_at_s = min((self._retry_at_s(c) for c in owing if c.unwritten), default=0.0)
            time.sleep(max(0.0, min(BACKOFF_MAX_S, retry_at_s - time.monotonic())))

    def _start_up(self) -> bool:
        """Group and server checks; False (after a backoff) while Redis refuses them."""
        try:
            self._reconcile_membership()
            consumers = self._all_consumers()
            for consumer in consumers:
                consumer.ensure_group()
            if consumers:
                consumers[0].detect_server()
            for consumer in consumers:
                consumer.has_xackdel = consumers[0].has_xackdel
                consumer.has_markers = consumers[0].has_markers
        except REDIS_ERRORS as e:  # down, OOM, READONLY: wait for it, never crash-loop
            self._failed("redis", f"start-up: {type(e).__name__}: {e}", log_traceback=False)
            return False
        self._resolved("redis")
        self._started = True
        return True

    def _step_or_wait(self) -> bool:
        """One iteration, never fatal: a failure is logged, reported and retried with backoff.

        Across a Redis outage the batch in hand stays pending and is reclaimed; any
        other error (a bug, a hostile value that got past validation) must not
        crash-loop the fleet, so the worker reports it and keeps serving what it can.
        """
        self.metrics.tick()
        try:
            more = self._step()
        except REDIS_ERRORS as e:  # down, OOM, READONLY, a race lost to another worker
            self._failed("redis", f"Redis unavailable: {type(e).__name__}: {e}", log_traceback=False)
            self._due["reclaim"] = 0.0  # a read may have been lost with the connection: recover it soon
            return True
        except Exception as e:
            self._failed("loop", f"{type(e).__name__}: {e}", log_traceback=True)
            return True
        if self._step_backoff.failures:
            self._step_backoff.reset()
            self._resolved("redis", "loop")
        return more

    def _failed(self, area: str, problem: str, *, log_traceback: bool) -> None:
        delay_s = self._step_backoff.next_delay_s()
        log.error("%s; retrying in %.2f s", problem, delay_s, exc_info=log_traceback)
        self.problems[area] = problem[:300]
        self.stopping.wait(delay_s)

    def _resolved(self, *areas: str) -> None:
        for area in areas:
            self.problems.pop(area, None)

    @property
    def isolating(self) -> bool:
        """Several consumers (shards, models): a Redis failure on one's node backs off that one only."""
        return sum(len(s.consumers) for s in self.served.values()) > 1

    def _retry_at_s(self, consumer: StreamConsumer) -> float:
        """When ``consumer``'s shard may be tried again (monotonic; 0 when it is not failing)."""
        backoff = self._shard_backoff.get((consumer.model, consumer.shard))
        return 0.0 if backoff is None else backoff.retry_at_s

    def _up(self, consumer: StreamConsumer) -> bool:
        """The shard may be read: it is not waiting out a failure, nor holding replies to write."""
        return not consumer.unwritten and time.monotonic() >= self._retry_at_s(consumer)

    def _up_consumers(self) -> list[StreamConsumer]:
        return [c for c in self._all_consumers() if self._up(c)]

    def _failing(self) -> bool:
        """Some shard is waiting out a failure, or holds replies still to be written."""
        return any(c.unwritten or self._retry_at_s(c) for c in self._all_consumers())

    @contextlib.contextmanager
    def _on_shard(self, consumer: StreamConsumer, *, isolate: bool | None = None) -> Iterator[None]:
        """The block's Redis work on ``consumer``'s shard. Several consumers (``isolate``): a Redis
        error puts that shard on a backoff of its own and ends the block, and the loop goes on with
        the others; success ends the shard's backoff once no reply of it is left to write. One
        consumer: the error is the step's, as before (the worker waits)."""
        if not (self.isolating if isolate is None else isolate):
            yield
            return
        started_s = time.monotonic()
        try:
            yield
        except REDIS_ERRORS as e:
            self._shard_failed(consumer, e, time.monotonic() - started_s)
            return
        self._shard_ok(consumer)

    def _shard_ok(self, consumer: StreamConsumer) -> None:
        """Redis work on ``consumer``'s shard succeeded: its backoff ends, once nothing is left to write."""
        backoff = self._shard_backoff.get((consumer.model, consumer.shard))
        if backoff is not None and backoff.failures and not consumer.unwritten:
            log.info("%s shard %d is served again after %d failures", consumer.model, consumer.shard,
                     backoff.failures)
            backoff.reset()
            self.served[consumer.model].problems.pop(f"shard {consumer.shard}", None)

    def _shard_failed(self, consumer: StreamConsumer, e: Exception, took_s: float) -> None:
        """Back ``consumer``'s shard off (after a timeout, a few times as long as the attempt took);
        what it holds stays in hand, and its lost reads are recovered when it is tried again."""
        backoff = self._shard_backoff.setdefault((consumer.model, consumer.shard),
                                                 Backoff(SHARD_BACKOFF_MAX_S))
        slow_s = took_s * SHARD_BACKOFF_TIME_RATIO if isinstance(e, redis.TimeoutError) else 0.0
        delay_s = backoff.fail(min(BACKOFF_MAX_S, slow_s))
        problem = f"Redis unavailable: {type(e).__name__}: {e}"
        _log_failure(backoff.failures, "%s shard %d: %s; serving the others, retrying it in %.2f s",
                     consumer.model, consumer.shard, problem, delay_s)
        self.served[consumer.model].problems[f"shard {consumer.shard}"] = problem[:300]
        # A read may have been lost with the connection: recover it as soon as the shard is tried.
        self._due["reclaim"] = min(self._due["reclaim"], backoff.retry_at_s)

    def _step(self) -> bool:
        """False when a burst worker has drained the streams."""
        self._maintain()
        consumers = self._all_consumers()
        for c in consumers:
            if c.unwritten and time.monotonic() >= self._retry_at_s(c):
                self._write_unwritten(c)
        for c in consumers:
            if not c.prefetched:  # the next read may wait: the last write lands, and is counted, first
                self.settle(c)
        consumer, batch = self._next_batch(0 if self.burst else self._idle_wait_ms())
        for c in consumers:  # a read may have settled the last write (overlap_io)
            self._collect(c)
        if batch and consumer is not None:
            # A full batch, or entries held back (backfill beyond its cap), says more is waiting: the
            # write brings back the next entries (one round trip per batch). Otherwise the next read
            # blocks anyway, and an empty read in the reply transaction only delays the reply.
            waiting = len(batch) >= self.settings.max_batch or bool(consumer.held)
            prefetch = self.settings.max_batch if waiting and not self.stopping.is_set() else 0
            if prefetch and consumer.link is not None:  # overlap_io: the read travels during the model call
                consumer.read_ahead(prefetch)
                prefetch = 0
            self.process(batch, consumer=consumer, prefetch=prefetch)
            return True
        # A burst worker has not drained a shard it cannot read (as on a failed step), nor entries
        # waiting for their model's load.
        return not self.burst or self.reclaim() > 0 or self._failing() or any(
            s.waiting for s in self.served.values())

    def _next_batch(self, wait_ms: float) -> tuple[StreamConsumer | None, list[Entry]]:
        """The next batch, of one (model, shard). One consumer of a loaded model: its read, waiting
        up to ``wait_ms``. Otherwise the consumers with room in hand are read first (one command per
        node: :meth:`_read_fresh`; without waiting while some model has entries it can answer), so
        every model's head is seen before the schedule picks whose buffer to serve. Shards backing
        off are skipped; while every shard is, this waits (up to ``wait_ms``)."""
        consumers = self._all_consumers()
        up = [c for c in consumers if self._up(c)]
        if not up:
            retry_at_s = min((self._retry_at_s(c) for c in consumers), default=math.inf)
            self.stopping.wait(max(0.0, min(wait_ms / 1000, retry_at_s - time.monotonic())))
            return None, []
        self._prepare_cold(up)  # what a take-over brought, or a load that ended, is acted on now
        if len(consumers) == 1 and self.served[up[0].model].slot.loaded is not None:
            batcher = self.served[up[0].model].batchers[up[0].shard]
            return up[0], batcher.next_batch(wait_ms)
        if self._ready(up):
            self._read_fresh(up, 0)
        elif any(s.load_started_s is not None for s in self.served.values()):
            # A load ends between two looks: poll, since a server times a short blocking read out
            # on its own timer (up to 100 ms late at the default hz), and wait a little between.
            if not self._read_fresh(up, 0):
                self.stopping.wait(LOAD_POLL_MS / 1000)
                return None, []
        elif not self._read_fresh(up, wait_ms):
            return None, []
        up = [c for c in up if self._up(c)]  # a read may have failed
        self._prepare_cold(up)
        ready = self._ready(up)
        model = self.scheduler.pick({m: cls for m, (cls, _) in ready.items()})
        if model is None:
            return None, []
        self.cache.touch(model)
        consumer = ready[model][1]
        shards = sorted(self.served[model].consumers)  # its next shard goes first next time
        self.served[model].turn = shards[(shards.index(consumer.shard) + 1) % len(shards)]
        return consumer, self._read_shard(consumer, 0)

    def _ready(self, up: Sequence[StreamConsumer]) -> dict[str, tuple[int, StreamConsumer]]:
        """Per model with entries in hand that it can answer now (loaded, or unable to load: its
        errors are answers too): the lane class of its best entries (0 live, 1 backfill only) and
        the consumer to serve, its shards taken in turn."""
        ready: dict[str, tuple[int, StreamConsumer]] = {}
        for c in up:
            buffered, served = c.buffered, self.served[c.model]
            if not buffered or self._waits_for_load(served):
                continue
            cls = 0 if any(e.lane == keys.LANES[0] for e in buffered) else 1
            rank, best = (cls, _behind(c.shard, served.turn)), ready.get(c.model)
            if best is None or rank < (best[0], _behind(best[1].shard, served.turn)):
                ready[c.model] = (cls, c)
        return ready

    def _waits_for_load(self, served: ServedModel) -> bool:
        """Not loaded, and a load on request is under way (or may start): its entries wait for it."""
        return served.slot.loaded is None and (served.load_started_s is not None or self._loadable(served))

    def _loadable(self, served: ServedModel) -> bool:
        """Not loaded, and a load on request may start: a target known, and no failure of that
        target in the last ``LOAD_RETRY_S``."""
        slot = served.slot
        if slot.loaded is not None or slot.target_version is None or slot.registry_error:
            return False
        return served.failed_target != slot.target_version or time.monotonic() >= served.retry_load_at_s

    def _read_fresh(self, up: Sequence[StreamConsumer], wait_ms: float) -> int:
        """Read, for the consumers with room in hand, what is new: one XREADGROUP for all of them on
        one server (they share the group ``workers``); on a cluster, where every (model, shard) is
        a hash slot of its own, one pipelined round trip per node, then a wait on one of them in
        turn (at most ``MULTI_SHARD_BLOCK_MS``). Returns how many entries came; with no room
        anywhere, it waits ``wait_ms`` instead (the entries in hand wait for their loads)."""
        wanting = [c for c in up if len(c.buffered) < self.settings.max_batch]
        if not wanting:
            self.stopping.wait(wait_ms / 1000)
            return 0
        if isinstance(self.redis, redis.Redis):  # one node: the whole set in one command
            try:
                return read_many(wanting, self.settings.max_batch, wait_ms)
            except redis.ResponseError:  # one stream refused (WRONGTYPE, NOPERM): read each on its own
                return self._read_each(wanting)
        before = sum(len(c.buffered) for c in wanting)
        for node, consumers in self._by_node(wanting).items():
            self._read_node(node, consumers)
        got = sum(len(c.buffered) for c in wanting) - before
        if got or not wait_ms:
            return got
        c = wanting[self._turn % len(wanting)]
        self._turn += 1
        with self._on_shard(c):
            got = read_many([c], self.settings.max_batch, min(wait_ms, MULTI_SHARD_BLOCK_MS))
        return got

    def _read_each(self, consumers: Sequence[StreamConsumer]) -> int:
        """One non-blocking read per consumer, each on its own backoff: the one whose stream the
        server refuses backs off, the others are read."""
        before = sum(len(c.buffered) for c in consumers)
        for c in consumers:
            with self._on_shard(c, isolate=True):
                read_many([c], self.settings.max_batch, 0)
        return sum(len(c.buffered) for c in consumers) - before

    def _by_node(self, consumers: Sequence[StreamConsumer]) -> dict[str, list[StreamConsumer]]:
        """A cluster's consumers by the node serving their slot ("" where that is unknown now)."""
        nodes: dict[str, list[StreamConsumer]] = {}
        cluster: Any = self.redis  # a RedisCluster here (typed as the standalone client it mimics)
        for c in consumers:
            try:
                name = str(cluster.get_node_from_key(c.stream).name)
            except redis.RedisError:  # the slot is uncovered (a failover): read it on its own
                name = ""
            nodes.setdefault(name, []).append(c)
        return nodes

    def _read_node(self, node: str, consumers: list[StreamConsumer]) -> None:
        """The non-blocking reads of ``consumers`` on cluster node ``node``, pipelined; a failure
        backs every one of them off (they share the node); a read the node redirected, or one
        whose node is unknown, goes through the cluster client."""
        redirected = consumers
        if node:
            started_s = time.monotonic()
            try:
                cluster: Any = self.redis
                client = cluster.get_node(node_name=node).redis_connection
                redirected = read_on_node(client, consumers, self.settings.max_batch)
            except REDIS_ERRORS as e:
                for c in consumers:
                    self._shard_failed(c, e, time.monotonic() - started_s)
                return
            for c in consumers:
                self._shard_ok(c)
        for c in redirected:
            with self._on_shard(c):
                read_many([c], self.settings.max_batch, 0)

    def _prepare_cold(self, up: Sequence[StreamConsumer]) -> None:
        """Models with entries in hand and nothing loaded: start their loads (evicting the least
        recently used as the cache requires) and answer at once, OVERLOADED, the entries whose
        deadline comes before the load is expected to end."""
        for model in {c.model for c in up if c.buffered}:
            served = self.served[model]
            if served.slot.loaded is not None:
                continue
            if served.load_started_s is None and self._loadable(served):
                if served.failed_target == served.slot.target_version:
                    served.slot.forget_failure()  # a failed load is tried again after LOAD_RETRY_S
                # Shed first: the load's thread may hold the interpreter while it opens the session.
                served.load_started_s = time.monotonic()
                self._shed_loading(served)
                self._start_load(served)
            elif served.load_started_s is not None:
                self._shed_loading(served)

    def _start_load(self, served: ServedModel) -> None:
        """Load ``served`` on request: in the background (in line for a burst worker), after
        evicting what the budget needs for the size it last measured."""
        self._fit_budget(served, self.cache.expected_size_bytes(served.model))
        self.cache.loading(served.model)
        if not self.burst:
            served.slot.request_load()
            return
        with self.pulse.busy():
            served.slot.reconcile(in_line=True)
        served.load_started_s = served.processor.loading_eta_ms = None
        if served.slot.loaded is None:
            self._load_failed(served)
        else:
            self._after_load(served)

    def _fit_budget(self, incoming: ServedModel, incoming_bytes: int = 0) -> None:
        """Evict the least recently used models the budget needs for ``incoming`` (never one with
        entries or replies in hand, or a load under way, nor ``incoming`` itself)."""
        busy = {s.model for s in self.served.values()
                if s.busy or s.slot.loading or s.arms.loader.loading or s.load_started_s is not None}
        busy.add(incoming.model)
        victims = self.cache.victims(incoming.model, incoming_bytes, busy.__contains__)
        for victim in victims:
            self._evict(self.served[victim])
        if victims:
            release_memory(collect=False)  # what the victims held, back to the system (cheap)

    def _shed_loading(self, served: ServedModel) -> None:
        """Answer, OVERLOADED "loading", the entries of ``served`` that cannot wait for its load."""
        expected_ms = self.cache.expected_load_ms(served.model, self._default_load_ms())
        started_s = served.load_started_s if served.load_started_s is not None else time.monotonic()
        eta_ms = max(0.0, expected_ms - (time.monotonic() - started_s) * 1000)
        served.processor.loading_eta_ms = eta_ms
        for consumer in served.consumers.values():
            late = {e.id for e in hopeless(consumer.buffered, eta_ms)}
            if late and self._up(consumer):
                entries = consumer.take_unanswered()
                consumer.deliver([e for e in entries if e.id not in late])  # they wait for the load
                self.process([e for e in entries if e.id in late], consumer=consumer)

    def _default_load_ms(self) -> float:
        """A never-loaded model's expected load time: the longest load measured in this process so
        far (models served together tend to be alike), else ``DEFAULT_LOAD_MS``."""
        measured = [s.slot.load_ms for s in self.served.values() if s.slot.load_ms]
        return max(measured, default=DEFAULT_LOAD_MS)

    def _evict(self, served: ServedModel) -> None:
        served.unload("evicted (least recently used)")
        self.cache.evicted(served.model)
        served.metrics.evicted()
        log.info("evicted %s (cache %.0f MB used)", served.model, self.cache.used_bytes() / MIB)

    def _load_ended(self, served: ServedModel) -> None:
        """A load on request ended: loaded (recorded), failed (retried after ``LOAD_RETRY_S``), or
        dropped because the target changed meanwhile (the next request loads the new one)."""
        served.load_started_s = served.processor.loading_eta_ms = None
        if served.slot.loaded is not None:
            self._after_load(served)
        elif served.slot.target_failed():
            self._load_failed(served)
        else:
            self.cache.evicted(served.model)

    def _after_load(self, served: ServedModel) -> None:
        served.failed_target = None
        self._cached(served)
        self._fit_budget(served)  # its size is measured now: the budget may need more room
        # Its experiment's treatment next (in the background; in line for a burst worker).
        self._maintenance("reconcile", lambda: self._reconcile_model(served))

    def _load_failed(self, served: ServedModel) -> None:
        """Report the failure (heartbeat ``cache: failed``); its entries are answered MODEL_NOT_FOUND
        until a retry after ``LOAD_RETRY_S`` or a new Production version."""
        served.failed_target = served.slot.target_version
        served.retry_load_at_s = time.monotonic() + LOAD_RETRY_S
        self.cache.failed(served.model, served.slot.problem())

    def _cached(self, served: ServedModel) -> None:
        """Record ``served`` loaded, its size that of both arms when an experiment runs."""
        slot, arms = served.slot, served.arms
        size_bytes = slot.size_bytes + (arms.loader.last_size_bytes if arms.treatment is not None else 0)
        self.cache.loaded(served.model, size_bytes, slot.load_ms, presence.now_in_ms())
        served.metrics.load_seconds(slot.load_ms / 1000)

    def _read_shard(self, consumer: StreamConsumer, wait_ms: float) -> list[Entry]:
        """A batch from ``consumer``, waiting up to ``wait_ms``; none when its Redis fails (it backs
        off; entries a failed read delivered stay pending on it, recovered by :meth:`reclaim`)."""
        batch: list[Entry] = []
        with self._on_shard(consumer):
            batch = self.served[consumer.model].batchers[consumer.shard].next_batch(wait_ms)
        return batch

    def process(self, entries: list[Entry], dead_letter: Sequence[Entry] = (),
                consumer: StreamConsumer | None = None, prefetch: int = 0) -> None:
        """Answer ``entries`` (all from ``consumer``'s shard) and ack them together with the replies;
        the write reads up to ``prefetch`` next entries per lane (``StreamConsumer.write``)."""
        consumer = consumer or self.consumer
        served = self.served[consumer.model]
        with self.pulse:
            out = served.processor.process(entries, dead_letter,
                                           markers=consumer.markers if consumer.has_markers else None)
        if consumer.link is None:
            self._write(out, consumer, prefetch)
        else:  # overlap_io: sent now, confirmed (and counted) once its answer is read
            consumer.send_write(out)
        # The bookkeeping after the send: the bot waits for the replies, not for the counts.
        answered = len(out.ack_ids)
        for counts in (self, served):
            counts.batches += 1
            counts.requests += answered
            counts.computed, counts.replayed = counts.computed + out.computed, counts.replayed + out.replayed
        # At least one per entry answered: a model whose entries all fail (not loadable, expired,
        # invalid) still pays for its turn, or it would keep it.
        self.scheduler.charge(served.model, max(sum(rows for _, rows, _ in out.calls), answered))
        if consumer.link is not None:
            self._collect(consumer)

    def settle(self, consumer: StreamConsumer | None = None) -> None:
        """Wait until every reply transaction sent on ``consumer``'s link (all, by default) has landed."""
        for c in [consumer] if consumer is not None else self._all_consumers():
            c.settle()
            self._collect(c)

    def _collect(self, consumer: StreamConsumer) -> None:
        """Count the writes whose answers came back; write again, until they land, those that failed."""
        confirmed, consumer.confirmed = consumer.confirmed, []
        for out in confirmed:
            self._count(out, consumer)
        failed, consumer.unconfirmed = consumer.unconfirmed, []
        if failed:
            log.error("%d reply transactions not confirmed (%s); writing them again",
                      len(failed), consumer.link_error)
        for out in failed:
            self._write(out, consumer)

    def _count(self, out: Outbox, consumer: StreamConsumer) -> None:
        """The batch in its model's metrics, once its transaction has landed."""
        metrics = self.served[consumer.model].metrics if consumer.model in self.served \
            else self.metrics.model(consumer.model)
        for (version, variant, code), n in Counter(out.codes).items():
            metrics.requests(version, variant, code, n)
        for lane, seconds in out.waits:
            metrics.queue_wait(lane, seconds)
        for version, rows, seconds in out.calls:
            metrics.inference(version, rows, seconds)
        if out.dead:
            metrics.dead_lettered(len(out.dead))
        if out.replayed:
            metrics.replayed(out.replayed)

    def _write(self, out: Outbox, consumer: StreamConsumer, prefetch: int = 0) -> None:
        """The batch's one transaction, retried with backoff until it lands (and then counted).

        OOM, READONLY (a failover) or a connection reset leave the replies in hand
        and the entries pending; a retry after an EXEC whose answer was lost can
        push a reply twice, which clients tolerate (they take one and drop the key).
        During a long outage the heartbeat lapses, a live worker takes the entries
        over, and whichever transaction lands first answers.

        Reading several consumers, the retries do not hold the loop: a write that fails is kept on
        its consumer and written again when its shard's backoff is over, while the others are
        served (:meth:`_write_unwritten`).
        """
        if self.isolating:
            consumer.unwritten.append(out)
            self._write_unwritten(consumer, prefetch)
            return
        while True:
            try:
                consumer.write(out, prefetch)
            except REDIS_ERRORS as e:
                delay_s = self._write_backoff.next_delay_s()
                self.problems["redis_write"] = f"reply transaction failed: {type(e).__name__}: {e}"[:300]
                log.error("reply transaction for %d entries failed (%s); retrying in %.2f s",
                          len(out.ack_ids), e, delay_s)
                time.sleep(delay_s)  # not stopping.wait: a stopping worker still owes these replies
                self._try_heartbeat()
                self._due["reclaim"] = 0.0  # the connection may have been lost with a read: recover
                prefetch = 0  # a retry writes only: whatever a lost answer read stays pending (reclaim)
                continue
            if self._write_backoff.failures:
                self._write_backoff.reset()
                self._resolved("redis_write")
            self._count(out, consumer)
            return

    def _write_unwritten(self, consumer: StreamConsumer, prefetch: int = 0) -> None:
        """Write ``consumer``'s kept reply transactions, oldest first, until one fails (its shard then
        backs off; the rest wait for its next try). The first may read ``prefetch`` next entries."""
        while consumer.unwritten and time.monotonic() >= self._retry_at_s(consumer):
            with self._on_shard(consumer, isolate=True):
                consumer.write(consumer.unwritten[0], prefetch)
                self._count(consumer.unwritten.pop(0), consumer)
            prefetch = 0

    def _try_heartbeat(self) -> None:
        """Report the problem if Redis takes writes at all (under OOM or READONLY it will not)."""
        with contextlib.suppress(*REDIS_ERRORS):
            self.heartbeat()

    def reclaim(self) -> int:
        """Recover this worker's own lost reads; then (unless Redis was just out of reach) take over
        entries idle past ``reclaim_min_idle_ms`` in any consumer's pending list."""
        reclaimed = 0
        for c in self._up_consumers():  # a shard backing off is recovered when it is tried again
            self.settle(c)  # nothing in flight: what is pending on it and not held was lost
        consumers = self._not_quiet(self._up_consumers())
        for c in consumers:
            with self._on_shard(c):
                reclaimed += self._counted(c, c.recover(self._handler(c)))
        if time.monotonic() >= self.takeover_after_s:
            for c in consumers:
                with self._on_shard(c):
                    reclaimed += self._counted(c, c.reclaim(self._handler(c)))
        return reclaimed

    def _not_quiet(self, consumers: list[StreamConsumer]) -> list[StreamConsumer]:
        """Of ``consumers``, those whose group holds pending entries beyond their own: the others
        need no recover, reclaim or take-over pass. One round trip for all on one server (a worker
        serving many models would otherwise pay several per model, in line with serving); every
        consumer, unchecked, on a cluster or when the check fails."""
        if not isinstance(self.redis, redis.Redis) or len(consumers) < 2:
            return consumers
        pipe = self.redis.pipeline(transaction=False)
        for c in consumers:
            c.queue_pending(pipe)
        try:
            answers = pipe.execute(raise_on_error=False)
        except REDIS_ERRORS:
            return consumers
        lanes = len(keys.LANES)
        return [c for i, c in enumerate(consumers) if not c.quiet(answers[i * lanes:(i + 1) * lanes])]

    def _counted(self, consumer: StreamConsumer, taken: int) -> int:
        if taken and consumer.model in self.served:
            self.served[consumer.model].metrics.reclaimed(taken)
        return taken

    def take_over(self) -> int:
        """Answer what is pending on workers whose heartbeat expired; remove their empty consumers.

        Not while Redis has just come back (``takeover_after_s``): the others' heartbeats
        look stale because nobody could beat, not because they died.
        """
        if time.monotonic() < self.takeover_after_s:
            return 0
        live = presence.live_ids_many(self.redis, list(self.served), self.settings.heartbeat_ttl_s)
        taken, consumers = 0, self._up_consumers()
        self._takeovers += 1
        if self._takeovers % TAKEOVER_FULL_EVERY:  # the others: a dead worker's empty consumers removed
            consumers = self._not_quiet(consumers)
        for c in consumers:  # a consumer never takes from itself
            with self._on_shard(c):
                taken += self._counted(c, c.take_over(live.get(c.model, set()), self._handler(c)))
        return taken

    def _handler(self, consumer: StreamConsumer) -> Callable[[list[Entry], list[Entry]], None]:
        """Answers claimed entries (fresh, and over-delivered to dead-letter) on ``consumer``'s shard.
        A model that is not loaded but can be keeps the fresh ones in hand, to answer once loaded."""
        def handle(fresh: list[Entry], over: list[Entry]) -> None:
            if self._waits_for_load(self.served[consumer.model]):
                consumer.deliver(fresh)
                fresh = []
            if fresh or over:
                self.process(fresh, over, consumer)
        return handle

    def reconcile(self) -> None:
        """Converge on the selected models, and for each on the registry's Production version, the
        shard layout and the model's experiment."""
        self._reconcile_membership()
        for served in list(self.served.values()):
            self._reconcile_model(served)

    def _reconcile_model(self, served: ServedModel) -> None:
        if self.pinned is None and (shards := served.layout_shards()) is not None:
            self._set_shards(served, shards)
        # A pinned model loads in line at start-up; the others when a request comes (_start_load).
        unloaded, pinned = served.slot.loaded is None, served.model in self.pins
        with self.pulse.busy():  # an in-line load may take longer than the heartbeat's TTL
            served.slot.reconcile(in_line=pinned)
        if unloaded and served.slot.loaded is not None:
            self._cached(served)
        elif unloaded and pinned and served.slot.target_version is not None:
            self._load_failed(served)  # tried again at every reconcile, as a one-model worker does
        if served.slot.loaded is None:
            return  # its experiment's treatment loads with it
        try:
            # In line before the first batch (and in burst mode); in the background while serving.
            with self.pulse.busy():
                served.arms.reconcile(served.model, in_line=self.burst or self.batches == 0)
            served.problems.pop("experiment", None)
        except StreamserveError as e:
            log.error("%s: experiment state unusable, serving Production only: %s", served.model, e)
            served.problems["experiment"] = str(e)[:300]

    def _maintain(self) -> None:
        now, s = time.monotonic(), self.settings
        if now >= self._due["load"]:
            self._due["load"] = now + s.load_interval_s
            self._publish_load()
        if now >= self._due["heartbeat"]:
            self._due["heartbeat"] = now + s.heartbeat_interval_s
            self._maintenance("heartbeat", self._beat_and_take_over)
        if now >= self._due["reconcile"] or self.reload_requested.is_set():
            self.reload_requested.clear()
            self._due["reconcile"] = now + s.reconcile_interval_s
            self._maintenance("reconcile", self.reconcile)
        if self.membership_changed:
            self.membership_changed = False
            self._maintenance("reconcile", self._reconcile_membership)
        for served in [v for v in self.served.values() if v.reload_requested]:
            served.reload_requested = False
            self._maintenance("reconcile", lambda v=served: self._reconcile_model(v))  # type: ignore[misc]
        changed = False
        for served in list(self.served.values()):
            changed |= self._swap(served)
        if changed:
            self._maintenance("heartbeat", self.heartbeat)  # tell the fleet at once, not at the next interval
        if now >= self._due["reclaim"]:
            self._due["reclaim"] = now + s.reclaim_interval_s
            self.reclaim()

    def _swap(self, served: ServedModel) -> bool:
        """Swap in what ``served`` loaded in the background; True when what to report changed."""
        was_loaded = served.slot.loaded is not None
        # Read before the swap: a load that ends between the two is taken at the next step.
        ended = served.load_started_s is not None and not served.slot.loading
        changed = served.slot.swap_if_ready()
        if ended:
            self._load_ended(served)  # a load on request ended: loaded, failed or dropped
            changed = True
        elif changed and was_loaded and served.slot.loaded is not None:
            self._cached(served)  # a reload: the new version's size
        if served.slot.loaded is None:
            served.arms.loader.discard()  # a treatment loaded while the model was evicted
        else:
            treatment = served.arms.treatment
            served.arms.swap_if_ready()
            if served.arms.treatment is not treatment:
                self._cached(served)  # both arms count
        return served.count_loads() or changed

    def _publish_load(self) -> None:
        """Every readable shard's load; a shard whose node is out of reach backs off (several
        consumers; an error the server answered, e.g. NOPERM on the load hash, leaves serving alone)."""
        if isinstance(self.redis, redis.Redis) and len(self.served) > 1:  # one server: every model at once
            publish_many(self.redis, [(s.load, {c.shard: c for c in s.consumers.values() if self._up(c)})
                                      for s in self.served.values()])
            for served in list(self.served.values()):
                for lane in served.load.lanes:
                    served.metrics.stream(lane.shard, lane.lane, lane.backlog, lane.pending)
            return
        for served in list(self.served.values()):
            up = {c.shard: c for c in served.consumers.values() if self._up(c)}
            failed = served.load.publish(up)
            for shard, e in failed.items():
                if self.isolating and not isinstance(e, redis.ResponseError):
                    self._shard_failed(served.consumers[shard], e, 0.0)
            for lane in served.load.lanes:
                served.metrics.stream(lane.shard, lane.lane, lane.backlog, lane.pending)

    def _beat_and_take_over(self) -> None:
        self.heartbeat()
        self.take_over()

    def _maintenance(self, area: str, task: Callable[[], object]) -> None:
        """A task on the models' own slots (heartbeat, take-over, reconcile). Several consumers: a
        Redis error is reported in the heartbeat's problems under ``area`` (a ``_due`` key) and the
        task tried again on a short backoff, while the shards are served. One consumer: the error is
        the step's (its shard most likely fails with it), as before."""
        if not self.isolating:
            task()
            return
        backoff = self._area_backoff.setdefault(area, Backoff(MAINTENANCE_BACKOFF_MAX_S))
        try:
            task()
        except REDIS_ERRORS as e:
            delay_s = backoff.fail()
            problem = f"Redis unavailable: {type(e).__name__}: {e}"
            _log_failure(backoff.failures, "%s failed: %s; serving on, retrying in %.2f s", area, problem,
                         delay_s)
            self.problems[area] = problem[:300]
            self._due[area] = min(self._due[area], backoff.retry_at_s)
            return
        if backoff.failures:
            log.info("%s works again after %d failures", area, backoff.failures)
            backoff.reset()
        self._resolved(area)

    def _idle_wait_ms(self) -> float:
        next_due = min(self._due.values())
        # While a version loads, wake often so it is swapped in soon after it is ready.
        loading = any(s.slot.loading or s.arms.loader.loading for s in self.served.values())
        block_ms = RELOAD_POLL_MS if loading else self.settings.block_ms
        return max(1.0, min(block_ms, (next_due - time.monotonic()) * 1000))

    def stop(self) -> None:
        """Stop reading; the batch in hand is finished and acked first."""
        self.stopping.set()

    def install_signal_handlers(self, *, sigint: bool = True) -> None:
        """SIGTERM (and SIGINT) stop gracefully; a second signal, or the grace period, forces exit."""
        def handle(signum: int, _frame: object) -> None:
            if self.stopping.is_set():
                log.warning("second signal: forcing exit")
                os._exit(1)
            log.info("signal %s: finishing the current batch, then exiting", signum)
            self.stop()
            timer = threading.Timer(self.settings.grace_period_s, os._exit, (1,))
            timer.daemon = True
            timer.start()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle if sigint else signal.SIG_IGN)

    def heartbeat(self) -> None:
        """Publish, for every model served, what this worker serves of it (``protocol.presence``);
        prune members past the TTL. One round trip per node: for each model its hash, then its
        member, in order, so a reader never finds the member without the hash."""
        ttl_ms = int(self.settings.heartbeat_ttl_s * 1000)
        pipe = self.redis.pipeline(transaction=False)
        for served in list(self.served.values()):
            beat = self.presence(served)
            loaded = served.slot.loaded
            served.metrics.serving(beat.version, served.slot.target_version,
                                   label=loaded.version.label if loaded else "")
            # Ready for the model: it is loaded here, or loads on its first request.
            servable = beat.version is not None or self._loadable(served)
            served.metrics.ready(servable and "redis" not in self.problems)
            self._cache_metrics(served)
            key, members = keys.worker_hash(served.model, self.worker_id), keys.workers_zset(served.model)
            pipe.hset(key, mapping=beat.to_hash())
            pipe.pexpire(key, ttl_ms)
            pipe.zadd(members, {self.worker_id: beat.heartbeat_ms})
            pipe.zremrangebyscore(members, "-inf", beat.heartbeat_ms - ttl_ms)
        self.metrics.ready(self._can_serve() and "redis" not in self.problems)
        self.metrics.cache_totals(self.cache.used_bytes(), self.cache.budget_bytes)
        pipe.execute()
        self._landed()
        for consumer in self._all_consumers():
            # A shard backing off waits its turn; one holding nothing has nothing to keep from idling.
            if time.monotonic() >= self._retry_at_s(consumer) and (consumer.busy or consumer.batch_sizes):
                with self._on_shard(consumer):
                    consumer.flush_stats()
                    consumer.touch()  # what it holds (held, read ahead, unwritten) is not idle: no reclaim

    def _can_serve(self) -> bool:
        """The process can serve: every pinned model is loaded, and (none pinned) some model is
        loaded or can be loaded on request."""
        pinned = [s for s in self.served.values() if s.model in self.pins]
        if pinned:
            return all(s.slot.loaded is not None for s in pinned)
        return any(s.slot.loaded is not None or self._loadable(s) for s in self.served.values())

    def _cache_metrics(self, served: ServedModel) -> None:
        entry = self.cache.entry(served.model)
        served.metrics.cache(entry.state, entry.size_bytes,
                             entry.loaded_at_ms / 1000 if entry.loaded_at_ms else None)

    def _beat_if_due(self) -> None:
        """The pulse's beat, during a batch: renew the heartbeat and the idle time of what is in hand."""
        if time.monotonic() - self._beat_landed_s < self.settings.heartbeat_interval_s:
            return
        presence.refresh_many(self.redis, list(self.served), self.worker_id, self.settings.heartbeat_ttl_s)
        self._landed()
        for consumer in self._all_consumers():
            with contextlib.suppress(*REDIS_ERRORS):  # one shard's node down: touch the others
                consumer.touch()

    def _landed(self) -> None:
        """A heartbeat landed. If the last one before it landed more than two intervals (and a
        quarter of the TTL) ago, this worker could not beat meanwhile (Redis down, restarting,
        paused) and most likely neither could the others: their heartbeats look stale through no
        fault of theirs. Take-overs wait until they have had an interval and a TTL, from now, to
        beat again; so they do after this worker's first heartbeat (it may have started while
        Redis was out of reach, and has not yet watched the others beat for a TTL)."""
        now_s, s = time.monotonic(), self.settings
        gap_s = now_s - self._beat_landed_s
        if not math.isfinite(gap_s):  # the first: this worker has not seen the others beat for a TTL yet
            if not self.burst:  # a burst worker drains what is there now, dead workers' entries included
                self.takeover_after_s = now_s + s.heartbeat_interval_s + s.heartbeat_ttl_s
        elif gap_s > max(2 * s.heartbeat_interval_s, s.heartbeat_ttl_s / 4):
            self.takeover_after_s = now_s + s.heartbeat_interval_s + s.heartbeat_ttl_s
            log.warning("no heartbeat landed for %.1f s; no take-over for the next %.1f s", gap_s,
                        s.heartbeat_interval_s + s.heartbeat_ttl_s)
        self._beat_landed_s = now_s

    def presence(self, served: ServedModel | None = None) -> presence.Heartbeat:
        """This worker's heartbeat for ``served`` (the only model, by default) as of now."""
        served = served or self._only()
        entry = self.cache.entry(served.model)
        counts = {"batches": served.batches, "requests": served.requests, "computed": served.computed,
                  "replayed": served.replayed}
        cache = {"cache": entry.state, "loaded_at_ms": entry.loaded_at_ms, "load_ms": round(entry.load_ms, 1),
                 "size_mb": round(entry.size_bytes / MIB, 1), "load_error": entry.load_error[:300],
                 "models": len(self.served), "pinned": served.model in self.pins}
        return served.heartbeat(state=self._state(served), error=self.problem(served), counts=counts,
                                cache=cache)

    def problem(self, served: ServedModel | None = None) -> str:
        """Everything wrong right now for ``served`` (the only model, by default), for its
        heartbeat's ``error`` (empty when healthy)."""
        served = served or self._only()
        problems = sorted({**self.problems, **served.problems}.items())
        parts = [served.slot.problem(), *(f"{area}: {p}" for area, p in problems)]
        parts.append(self._over_budget())
        if self.listener is not None and self.listener.rejected:
            counts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.listener.rejected.items()))
            parts.append(f"control messages rejected: {counts} (last: {self.listener.last_rejection})")
        return "; ".join(p for p in parts if p)

    def _over_budget(self) -> str:
        """What exceeds the cache's limits: pinned or busy models alone can (never evicted)."""
        loaded = sum(s.slot.loaded is not None for s in self.served.values())
        over_bytes, limit = self.cache.over_budget_bytes(), self.settings.max_loaded_models
        parts = [f"{over_bytes / MIB:.0f} MB over the model memory budget"] if over_bytes else []
        if limit and loaded > limit:
            parts.append(f"{loaded} models loaded, over the limit of {limit}")
        return f"cache: {', '.join(parts)}" if parts else ""

    def _state(self, served: ServedModel) -> str:
        if self.stopping.is_set():
            return "stopping"
        return "loading" if served.slot.loading else "serving"

    def _sign_off(self) -> None:
        try:
            for consumer in self._all_consumers():
                consumer.flush_stats()
            pipe = self.redis.pipeline(transaction=False)
            for model in self.served:
                pipe.zrem(keys.workers_zset(model), self.worker_id)
                pipe.delete(keys.worker_hash(model, self.worker_id))
            pipe.execute()
            for consumer in self._all_consumers():
                consumer.leave()
        except REDIS_ERRORS as e:
            log.warning("sign-off failed: %s", e)
        self.redis.close()  # the pool reconnects if run() is called again
        log.info("worker %s stopped after %d batches, %d entries", self.worker_id,
                 self.batches, self.requests)


def _behind(shard: int, turn: int) -> int:
    """How far ``shard`` comes after the shard whose turn it is (shards served in a ring)."""
    return (shard - turn) % (1 << 16)


def _log_failure(failures: int, message: str, *args: object) -> None:
    """A failure in a row logged as an error on the 1st, 2nd, 4th, 8th … (retries come often)."""
    log.log(logging.ERROR if failures & (failures - 1) == 0 else logging.DEBUG, message, *args)
