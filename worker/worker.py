"""The worker: read a model's stream through its consumer group, micro-batch, infer, reply, ack.

One process serves one model. The loop is single-threaded on purpose: a batch
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

A worker reading several shards (on a cluster, on several nodes) contains a node's
failure to the shards it holds: a Redis error on one shard puts that shard on a
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

import redis

from protocol import connection, keys, presence, sharding
from protocol.connection import REDIS_ERRORS
from protocol.errors import InvalidInput, StreamserveError
from protocol.settings import Settings
from registry import Registry
from worker.arms import ExperimentArms
from worker.batcher import Batcher
from worker.consumer import Entry, Outbox, StreamConsumer
from worker.control import ControlListener
from worker.load import LoadMeter
from worker.processing import BatchProcessor
from worker.slot import ModelSlot

log = logging.getLogger(__name__)
RELOAD_POLL_MS = 20
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
        self._busy, self._stopped = threading.Event(), threading.Event()
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

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Beat while the block runs."""
        self._busy.set()
        try:
            yield
        finally:
            self._busy.clear()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s / 4):
            if not self._busy.is_set():
                continue
            try:
                self.beat()
            except REDIS_ERRORS as e:  # Redis down: the loop reports it; beat again next time
                log.debug("heartbeat during a model call failed: %s", e)
            except Exception:  # never let the thread die: the next call would look dead
                log.exception("heartbeat during a model call failed")


class Worker:
    """Serve one model from its request stream until stopped (or drained, with ``burst``)."""

    def __init__(self, settings: Settings, model: str, *, burst: bool = False,
                 max_queue_ms: float = 0.0, worker_id: str | None = None,
                 shards: Sequence[int] | None = None) -> None:
        self.settings, self.model, self.burst = settings, keys.check_model_name(model), burst
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
        registry = Registry(self.redis, settings.artifact_dir)
        # Pinned shards (``--shards``) are read whatever the layout says; otherwise the layout decides.
        shards = shards or settings.shard_list
        self.pinned = tuple(keys.check_shard(k) for k in shards) if shards else None
        self.consumers: dict[int, StreamConsumer] = {}
        self.batchers: dict[int, Batcher[Entry]] = {}
        self._set_shards(self.pinned or (0,))
        self.slot = ModelSlot(registry, model, settings)
        self.arms = ExperimentArms(self.redis, registry, settings)
        self.processor = BatchProcessor(model, self.worker_id, self.slot, self.arms, settings,
                                        max_queue_ms=max_queue_ms)
        self.load = LoadMeter(self.redis, model, settings)
        # Imported here: prometheus-client comes with the worker extra, not with every CLI install.
        from worker.metrics import start_metrics
        self.metrics = start_metrics(settings, model, self.worker_id)
        self._load_reported: int | None = None  # the last version whose load (or failure) was counted
        self.reload_requested, self.stopping = threading.Event(), threading.Event()
        self.batches = self.requests = 0
        self.computed = self.replayed = 0  # entries that went into a model call; answered from a marker
        self._turn = 0  # which shard an idle multi-shard worker blocks on next
        self._due = {"heartbeat": 0.0, "reclaim": 0.0, "reconcile": 0.0, "load": 0.0}
        # What is wrong right now, by area ("redis", "experiment", "loop"); goes out in the heartbeat.
        self.problems: dict[str, str] = {}
        self._step_backoff, self._write_backoff = Backoff(), Backoff()
        # Reading several shards: each shard's failures in a row (a shard not listed has none), and
        # each maintenance area's (``_maintenance``).
        self._shard_backoff: dict[int, Backoff] = {}
        self._area_backoff: dict[str, Backoff] = {}
        self.listener: ControlListener | None = None
        self.pulse = Pulse(self._beat_if_due, settings.heartbeat_interval_s)
        self._beat_landed_s = -math.inf  # monotonic: when this worker's last heartbeat landed
        # Monotonic: no take-over or reclaim before this (after Redis was out of reach, _landed).
        self.takeover_after_s = 0.0

    @property
    def consumer(self) -> StreamConsumer:
        """The consumer of the lowest shard this worker reads (the only one, unsharded)."""
        return self.consumers[min(self.consumers)]

    def _set_shards(self, shards: Sequence[int]) -> None:
        """Read exactly ``shards``: consumers are added (their groups created) or dropped."""
        for k in sorted(set(shards) - set(self.consumers)):
            consumer = StreamConsumer(self.redis, self.model, self.worker_id, self.settings, k)
            if self.consumers:  # the first is set up by _start_up, with Redis checks and backoff
                consumer.ensure_group()
                consumer.has_xackdel = self.consumer.has_xackdel
                consumer.has_markers = self.consumer.has_markers
            self.consumers[k] = consumer
            self.batchers[k] = Batcher(consumer.read, max_batch=self.settings.max_batch,
                                       max_wait_ms=self.settings.max_wait_ms)
        for k in set(self.consumers) - set(shards):
            dropped = self.consumers[k]
            if not dropped.busy:  # what it read is ours to answer first
                dropped.flush_stats()
                if dropped.link is not None:
                    dropped.link.release()  # its kept connection back to the pool
                del self.consumers[k], self.batchers[k]
                self._shard_backoff.pop(k, None)
                self._resolved(f"shard {k}")

    def run(self) -> None:
        """Serve until ``stop()`` (or a signal); in burst mode, until the stream is drained."""
        while not self._start_up():
            self.metrics.tick()
            if self.stopping.is_set():
                self.metrics.close()
                return
        self.reconcile()
        log.info("worker %s serving %s, shards %s (%s)", self.worker_id, self.model,
                 sorted(self.consumers), self.slot.describe())
        self.listener = None if self.burst else ControlListener(
            self.settings.redis_url, self.model, lambda _command: self.reload_requested.set(),
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

    def _answer_held(self) -> None:
        """Stopping: answer the entries read but not yet batched (held, or read ahead), then make
        sure every reply transaction sent has landed."""
        for consumer in self.consumers.values():
            self.settle(consumer)
            n, entries = self.settings.max_batch, consumer.take_unanswered()
            for i in range(0, len(entries), n):
                self.process(entries[i:i + n], consumer=consumer)  # its write retries until it lands
            self.settle(consumer)
        self._write_all_unwritten()
        for consumer in self.consumers.values():
            if consumer.link is not None:
                consumer.link.release()

    def _write_all_unwritten(self) -> None:
        """Stopping: every reply transaction kept to be written again is written, each shard retried
        on its backoff until all have landed (a stopping worker owes them; the grace period bounds
        the wait)."""
        while owing := [c for c in self.consumers.values() if c.unwritten]:
            for consumer in owing:
                self._write_unwritten(consumer)
            retry_at_s = min((self._retry_at_s(c) for c in owing if c.unwritten), default=0.0)
            time.sleep(max(0.0, min(BACKOFF_MAX_S, retry_at_s - time.monotonic())))

    def _start_up(self) -> bool:
        """Group and server checks; False (after a backoff) while Redis refuses them."""
        try:
            for consumer in self.consumers.values():
                consumer.ensure_group()
            self.consumer.detect_server()
            for consumer in self.consumers.values():
                consumer.has_xackdel = self.consumer.has_xackdel
                consumer.has_markers = self.consumer.has_markers
        except REDIS_ERRORS as e:  # down, OOM, READONLY: wait for it, never crash-loop
            self._failed("redis", f"start-up: {type(e).__name__}: {e}", log_traceback=False)
            return False
        self._resolved("redis")
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
        """Several shards are read: a Redis failure on one shard's node backs off that shard only."""
        return len(self.consumers) > 1

    def _retry_at_s(self, consumer: StreamConsumer) -> float:
        """When ``consumer``'s shard may be tried again (monotonic; 0 when it is not failing)."""
        backoff = self._shard_backoff.get(consumer.shard)
        return 0.0 if backoff is None else backoff.retry_at_s

    def _up(self, consumer: StreamConsumer) -> bool:
        """The shard may be read: it is not waiting out a failure, nor holding replies to write."""
        return not consumer.unwritten and time.monotonic() >= self._retry_at_s(consumer)

    def _up_consumers(self) -> list[StreamConsumer]:
        return [c for c in list(self.consumers.values()) if self._up(c)]

    def _failing(self) -> bool:
        """Some shard is waiting out a failure, or holds replies still to be written."""
        return any(c.unwritten or self._retry_at_s(c) for c in self.consumers.values())

    @contextlib.contextmanager
    def _on_shard(self, consumer: StreamConsumer, *, isolate: bool | None = None) -> Iterator[None]:
        """The block's Redis work on ``consumer``'s shard. Several shards (``isolate``): a Redis error
        puts that shard on a backoff of its own and ends the block, and the loop goes on with the
        others; success ends the shard's backoff once no reply of it is left to write. One shard:
        the error is the step's, as before (the worker waits)."""
        if not (self.isolating if isolate is None else isolate):
            yield
            return
        started_s = time.monotonic()
        try:
            yield
        except REDIS_ERRORS as e:
            self._shard_failed(consumer, e, time.monotonic() - started_s)
            return
        backoff = self._shard_backoff.get(consumer.shard)
        if backoff is not None and backoff.failures and not consumer.unwritten:
            log.info("shard %d is served again after %d failures", consumer.shard, backoff.failures)
            backoff.reset()
            self._resolved(f"shard {consumer.shard}")

    def _shard_failed(self, consumer: StreamConsumer, e: Exception, took_s: float) -> None:
        """Back ``consumer``'s shard off (after a timeout, a few times as long as the attempt took);
        what it holds stays in hand, and its lost reads are recovered when it is tried again."""
        backoff = self._shard_backoff.setdefault(consumer.shard, Backoff(SHARD_BACKOFF_MAX_S))
        slow_s = took_s * SHARD_BACKOFF_TIME_RATIO if isinstance(e, redis.TimeoutError) else 0.0
        delay_s = backoff.fail(min(BACKOFF_MAX_S, slow_s))
        problem = f"Redis unavailable: {type(e).__name__}: {e}"
        _log_failure(backoff.failures, "shard %d: %s; serving the other shards, retrying it in %.2f s",
                     consumer.shard, problem, delay_s)
        self.problems[f"shard {consumer.shard}"] = problem[:300]
        # A read may have been lost with the connection: recover it as soon as the shard is tried.
        self._due["reclaim"] = min(self._due["reclaim"], backoff.retry_at_s)

    def _step(self) -> bool:
        """False when a burst worker has drained the stream."""
        self._maintain()
        for c in list(self.consumers.values()):
            if c.unwritten and time.monotonic() >= self._retry_at_s(c):
                self._write_unwritten(c)
        for c in list(self.consumers.values()):
            if not c.prefetched:  # the next read may wait: the last write lands, and is counted, first
                self.settle(c)
        consumer, batch = self._next_batch(0 if self.burst else self._idle_wait_ms())
        for c in list(self.consumers.values()):  # a read may have settled the last write (overlap_io)
            self._collect(c)
        if batch:
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
        # A burst worker has not drained a shard it cannot read: it goes on (as it does on a failed step).
        return not self.burst or self.reclaim() > 0 or self._failing()

    def _next_batch(self, wait_ms: float) -> tuple[StreamConsumer, list[Entry]]:
        """The next batch of one shard: without waiting from any shard, else wait on one in turn.
        Shards backing off are skipped; while every shard is, this waits (up to ``wait_ms``)."""
        shards = [k for k in sorted(self.consumers) if self._up(self.consumers[k])]
        if not shards:
            retry_at_s = min(self._retry_at_s(c) for c in self.consumers.values())
            self.stopping.wait(max(0.0, min(wait_ms / 1000, retry_at_s - time.monotonic())))
            return self.consumer, []
        if len(self.consumers) == 1:
            return self.consumer, self.batchers[shards[0]].next_batch(wait_ms)
        for i in range(len(shards)):
            k = shards[(self._turn + i) % len(shards)]
            if batch := self._read_shard(k, 0):
                self._turn = (self._turn + i + 1) % len(shards)  # the next shard goes first next time
                return self.consumers[k], batch
        shards = [k for k in shards if self._up(self.consumers[k])]  # a read may have failed
        if not shards:
            return self.consumer, []
        k = shards[self._turn % len(shards)]
        self._turn = (self._turn + 1) % len(shards)
        return self.consumers[k], self._read_shard(k, min(wait_ms, MULTI_SHARD_BLOCK_MS))

    def _read_shard(self, shard: int, wait_ms: float) -> list[Entry]:
        """A batch from ``shard``, waiting up to ``wait_ms``; none when its Redis fails (it backs off;
        entries a failed read delivered stay pending on its consumer, recovered by :meth:`reclaim`)."""
        batch: list[Entry] = []
        with self._on_shard(self.consumers[shard]):
            batch = self.batchers[shard].next_batch(wait_ms)
        return batch

    def process(self, entries: list[Entry], dead_letter: Sequence[Entry] = (),
                consumer: StreamConsumer | None = None, prefetch: int = 0) -> None:
        """Answer ``entries`` (all from ``consumer``'s shard) and ack them together with the replies;
        the write reads up to ``prefetch`` next entries per lane (``StreamConsumer.write``)."""
        consumer = consumer or self.consumer
        with self.pulse.busy():
            out = self.processor.process(entries, dead_letter,
                                         markers=consumer.markers if consumer.has_markers else None)
        self.batches += 1
        self.requests += len(out.ack_ids)
        self.computed, self.replayed = self.computed + out.computed, self.replayed + out.replayed
        if consumer.link is None:
            self._write(out, consumer, prefetch)
        else:  # overlap_io: sent now, confirmed (and counted) once its answer is read
            consumer.send_write(out)
            self._collect(consumer)

    def settle(self, consumer: StreamConsumer | None = None) -> None:
        """Wait until every reply transaction sent on ``consumer``'s link (all, by default) has landed."""
        for c in [consumer] if consumer is not None else list(self.consumers.values()):
            c.settle()
            self._collect(c)

    def _collect(self, consumer: StreamConsumer) -> None:
        """Count the writes whose answers came back; write again, until they land, those that failed."""
        confirmed, consumer.confirmed = consumer.confirmed, []
        for out in confirmed:
            self._count(out)
        failed, consumer.unconfirmed = consumer.unconfirmed, []
        if failed:
            log.error("%d reply transactions not confirmed (%s); writing them again",
                      len(failed), consumer.link_error)
        for out in failed:
            self._write(out, consumer)

    def _count(self, out: Outbox) -> None:
        """The batch in the metrics, once its transaction has landed."""
        for (version, variant, code), n in Counter(out.codes).items():
            self.metrics.requests(version, variant, code, n)
        for lane, seconds in out.waits:
            self.metrics.queue_wait(lane, seconds)
        for version, rows, seconds in out.calls:
            self.metrics.inference(version, rows, seconds)
        if out.dead:
            self.metrics.dead_lettered(len(out.dead))
        if out.replayed:
            self.metrics.replayed(out.replayed)

    def _write(self, out: Outbox, consumer: StreamConsumer, prefetch: int = 0) -> None:
        """The batch's one transaction, retried with backoff until it lands (and then counted).

        OOM, READONLY (a failover) or a connection reset leave the replies in hand
        and the entries pending; a retry after an EXEC whose answer was lost can
        push a reply twice, which clients tolerate (they take one and drop the key).
        During a long outage the heartbeat lapses, a live worker takes the entries
        over, and whichever transaction lands first answers.

        Reading several shards, the retries do not hold the loop: a write that fails is kept on
        its consumer and written again when its shard's backoff is over, while the other
        shards are served (:meth:`_write_unwritten`).
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
            self._count(out)
            return

    def _write_unwritten(self, consumer: StreamConsumer, prefetch: int = 0) -> None:
        """Write ``consumer``'s kept reply transactions, oldest first, until one fails (its shard then
        backs off; the rest wait for its next try). The first may read ``prefetch`` next entries."""
        while consumer.unwritten and time.monotonic() >= self._retry_at_s(consumer):
            with self._on_shard(consumer, isolate=True):
                consumer.write(consumer.unwritten[0], prefetch)
                self._count(consumer.unwritten.pop(0))
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
            with self._on_shard(c):
                self.settle(c)  # nothing in flight: what is pending on it and not held was lost
                reclaimed += c.recover(self._handler(c))
        if time.monotonic() >= self.takeover_after_s:
            for c in self._up_consumers():
                with self._on_shard(c):
                    reclaimed += c.reclaim(self._handler(c))
        if reclaimed:
            self.metrics.reclaimed(reclaimed)
        return reclaimed

    def take_over(self) -> int:
        """Answer what is pending on workers whose heartbeat expired; remove their empty consumers.

        Not while Redis has just come back (``takeover_after_s``): the others' heartbeats
        look stale because nobody could beat, not because they died.
        """
        if time.monotonic() < self.takeover_after_s:
            return 0
        live = presence.live_ids(self.redis, self.model, self.settings.heartbeat_ttl_s)
        taken = 0
        for c in self._up_consumers():  # a consumer never takes from itself
            with self._on_shard(c):
                taken += c.take_over(live, self._handler(c))
        if taken:
            self.metrics.reclaimed(taken)
        return taken

    def _handler(self, consumer: StreamConsumer) -> Callable[[list[Entry], list[Entry]], None]:
        """Answers claimed entries (fresh, and over-delivered to dead-letter) on ``consumer``'s shard."""
        return lambda fresh, over: self.process(fresh, over, consumer)

    def reconcile(self) -> None:
        """Converge on the registry's Production version, the shard layout and the model's experiment."""
        self._reconcile_shards()
        self.slot.reconcile()
        try:
            # In line before the first batch (and in burst mode); in the background while serving.
            self.arms.reconcile(self.model, in_line=self.burst or self.batches == 0)
            self._resolved("experiment")
        except StreamserveError as e:
            log.error("experiment state unusable, serving Production only: %s", e)
            self.problems["experiment"] = str(e)[:300]

    def _reconcile_shards(self) -> None:
        """Read the shards the layout serves, and retired ones while they still hold entries."""
        if self.pinned is not None:
            return
        try:
            layout = sharding.read_layout(self.redis, self.model)
            self._resolved("shards")
        except InvalidInput as e:  # keep reading what we read; an operator must fix the hash
            self.problems["shards"] = str(e)[:300]
            return
        retired = [k for k in range(layout.serve, layout.highest)
                   if sharding.holds_entries(self.redis, self.model, k)]
        self._set_shards([*range(layout.serve), *retired])

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
        if self.slot.swap_if_ready():
            self._maintenance("heartbeat", self.heartbeat)  # tell the fleet at once, not at the next interval
        self._count_loads()
        self.arms.swap_if_ready()
        if now >= self._due["reclaim"]:
            self._due["reclaim"] = now + s.reclaim_interval_s
            self.reclaim()

    def _publish_load(self) -> None:
        """Every readable shard's load; a shard whose node is out of reach backs off (several shards;
        an error the server answered, e.g. NOPERM on the load hash, leaves serving alone)."""
        failed = self.load.publish({c.shard: c for c in self._up_consumers()})
        for shard, e in failed.items():
            if self.isolating and not isinstance(e, redis.ResponseError):
                self._shard_failed(self.consumers[shard], e, 0.0)
        for lane in self.load.lanes:
            self.metrics.stream(lane.shard, lane.lane, lane.backlog, lane.pending)

    def _beat_and_take_over(self) -> None:
        self.heartbeat()
        self.take_over()

    def _maintenance(self, area: str, task: Callable[[], object]) -> None:
        """A task on the model's own slot (heartbeat, take-over, reconcile). Several shards: a Redis
        error is reported in the heartbeat's problems under ``area`` (a ``_due`` key) and the task
        tried again on a short backoff, while the shards are served. One shard: the error is the
        step's (its shard most likely fails with it), as before."""
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

    def _count_loads(self) -> None:
        """Count each target version's load once: served, or failed."""
        target, loaded = self.slot.target_version, self.slot.loaded
        if target is None or target == self._load_reported:
            return
        if loaded is not None and loaded.version.version == target:
            self.metrics.model_load(str(target), True)
        elif self.slot.target_failed():
            self.metrics.model_load(str(target), False)
        else:
            return  # still loading
        self._load_reported = target

    def _idle_wait_ms(self) -> float:
        next_due = min(self._due.values())
        # While a new version loads, wake often so it is swapped in soon after it is ready.
        block_ms = RELOAD_POLL_MS if self.slot.loading else self.settings.block_ms
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
        """Publish what this worker serves (``protocol.presence``); prune members past the TTL."""
        beat = self.presence()
        loaded = self.slot.loaded
        self.metrics.serving(beat.version, self.slot.target_version,
                             label=loaded.version.label if loaded else "")
        self.metrics.ready(beat.version is not None and "redis" not in self.problems)
        ttl_ms = int(self.settings.heartbeat_ttl_s * 1000)
        key, members = keys.worker_hash(self.model, self.worker_id), keys.workers_zset(self.model)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping=beat.to_hash())
        pipe.pexpire(key, ttl_ms)
        pipe.zadd(members, {self.worker_id: beat.heartbeat_ms})
        pipe.zremrangebyscore(members, "-inf", beat.heartbeat_ms - ttl_ms)
        pipe.execute()
        self._landed()
        for consumer in list(self.consumers.values()):
            if time.monotonic() >= self._retry_at_s(consumer):  # a shard backing off waits its turn
                with self._on_shard(consumer):
                    consumer.flush_stats()
                    consumer.touch()  # what it holds (held, read ahead, unwritten) is not idle: no reclaim

    def _beat_if_due(self) -> None:
        """The pulse's beat, during a batch: renew the heartbeat and the idle time of what is in hand."""
        if time.monotonic() - self._beat_landed_s < self.settings.heartbeat_interval_s:
            return
        presence.refresh(self.redis, self.model, self.worker_id, self.settings.heartbeat_ttl_s)
        self._landed()
        for consumer in list(self.consumers.values()):
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

    def presence(self) -> presence.Heartbeat:
        """This worker's heartbeat as of now."""
        loaded, slot = self.slot.loaded, self.slot
        return presence.Heartbeat(
            worker_id=self.worker_id, model=self.model, version=loaded.version.version if loaded else None,
            target_version=slot.target_version,
            failed_version=slot.target_version if slot.target_failed() else None,
            backend=loaded.backend.name if loaded else "", variant=loaded.variant if loaded else "",
            fallback=loaded.fallback_reason if loaded else "", error=self.problem(), state=self._state(),
            host=socket.gethostname(), pid=os.getpid(), batches=self.batches, requests=self.requests,
            computed=self.computed, replayed=self.replayed,
            heartbeat_ms=presence.now_in_ms(), shards=",".join(map(str, sorted(self.consumers))))

    def problem(self) -> str:
        """Everything wrong right now, for the heartbeat's ``error`` (empty when healthy)."""
        parts = [self.slot.problem(), *(f"{area}: {p}" for area, p in sorted(self.problems.items()))]
        if self.listener is not None and self.listener.rejected:
            counts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.listener.rejected.items()))
            parts.append(f"control messages rejected: {counts} (last: {self.listener.last_rejection})")
        return "; ".join(p for p in parts if p)

    def _state(self) -> str:
        if self.stopping.is_set():
            return "stopping"
        return "loading" if self.slot.loading else "serving"

    def _sign_off(self) -> None:
        try:
            for consumer in self.consumers.values():
                consumer.flush_stats()
            pipe = self.redis.pipeline(transaction=True)
            pipe.zrem(keys.workers_zset(self.model), self.worker_id)
            pipe.delete(keys.worker_hash(self.model, self.worker_id))
            pipe.execute()
            for consumer in self.consumers.values():
                consumer.leave()
        except REDIS_ERRORS as e:
            log.warning("sign-off failed: %s", e)
        self.redis.close()  # the pool reconnects if run() is called again
        log.info("worker %s stopped after %d batches, %d entries", self.worker_id,
                 self.batches, self.requests)


def _log_failure(failures: int, message: str, *args: object) -> None:
    """A failure in a row logged as an error on the 1st, 2nd, 4th, 8th … (retries come often)."""
    log.log(logging.ERROR if failures & (failures - 1) == 0 else logging.DEBUG, message, *args)
