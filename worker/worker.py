"""The worker: read a model's stream through its consumer group, micro-batch, infer, reply, ack.

One process serves one model. The loop is synchronous on purpose: a batch is
read, computed and answered in order, so "finish the in-flight batch" on
SIGTERM is simply "finish this iteration". The parts it ties together:
:class:`~worker.consumer.StreamConsumer` (read, reclaim, one MULTI/EXEC for
replies and acks), :class:`~worker.slot.ModelSlot` (the served version and its
background reload), :class:`~worker.arms.ExperimentArms` (the experiment's
treatment) and :class:`~worker.processing.BatchProcessor` (entries → replies).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Sequence

import redis

from protocol import keys, presence
from protocol.errors import StreamserveError
from protocol.settings import Settings
from registry import Registry
from worker.arms import ExperimentArms
from worker.batcher import Batcher
from worker.consumer import Entry, StreamConsumer
from worker.control import ControlListener
from worker.processing import BatchProcessor
from worker.slot import ModelSlot

log = logging.getLogger(__name__)
RECONNECT_DELAY_S = 0.5
RELOAD_POLL_MS = 20


class Worker:
    """Serve one model from its request stream until stopped (or drained, with ``burst``)."""

    def __init__(self, settings: Settings, model: str, *, burst: bool = False,
                 max_queue_ms: float = 0.0, worker_id: str | None = None) -> None:
        self.settings, self.model, self.burst = settings, keys.check_model_name(model), burst
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.redis = redis.Redis.from_url(settings.redis_url, socket_keepalive=True)
        registry = Registry(self.redis, settings.artifact_dir)
        self.consumer = StreamConsumer(self.redis, model, self.worker_id, settings)
        self.slot = ModelSlot(registry, model, settings)
        self.arms = ExperimentArms(self.redis, registry, settings)
        self.processor = BatchProcessor(model, self.worker_id, self.slot, self.arms, settings,
                                        max_queue_ms=max_queue_ms)
        self.batcher = Batcher(self.consumer.read, max_batch=settings.max_batch,
                               max_wait_ms=settings.max_wait_ms)
        self.reload_requested, self.stopping = threading.Event(), threading.Event()
        self.batches = self.requests = 0
        self._due = {"heartbeat": 0.0, "reclaim": 0.0, "reconcile": 0.0}

    def run(self) -> None:
        """Serve until ``stop()`` (or a signal); in burst mode, until the stream is drained."""
        self.consumer.ensure_group()
        self.consumer.detect_server()
        self.reconcile()
        log.info("worker %s serving %s (%s)", self.worker_id, self.model, self.slot.describe())
        listener = None if self.burst else ControlListener(
            self.settings.redis_url, self.model, lambda _command: self.reload_requested.set()).start()
        try:
            while not self.stopping.is_set() and self._step_or_wait():
                pass
        finally:
            if listener is not None:
                listener.stop()
            self._sign_off()

    def _step_or_wait(self) -> bool:
        """One iteration; across a Redis outage the batch in hand stays pending and is reclaimed."""
        try:
            return self._step()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            log.warning("Redis unavailable (%s); retrying in %.1f s", e, RECONNECT_DELAY_S)
            self.stopping.wait(RECONNECT_DELAY_S)
            return True

    def _step(self) -> bool:
        """False when a burst worker has drained the stream."""
        self._maintain()
        batch = self.batcher.next_batch(0 if self.burst else self._idle_wait_ms())
        if batch:
            self.process(batch)
            return True
        return not self.burst or self.reclaim() > 0

    def process(self, entries: list[Entry], dead_letter: Sequence[Entry] = ()) -> None:
        """Answer ``entries`` and ack them together with the replies."""
        out = self.processor.process(entries, dead_letter)
        self.consumer.write(out)
        self.batches += 1
        self.requests += len(out.ack_ids)

    def reclaim(self) -> int:
        """Take over entries idle past ``reclaim_min_idle_ms`` in any consumer's pending list."""
        return self.consumer.reclaim(self.process)

    def take_over(self) -> int:
        """Answer what is pending on workers whose heartbeat expired; remove their empty consumers."""
        live = presence.live_ids(self.redis, self.model, self.settings.heartbeat_ttl_s)
        return self.consumer.take_over(live, self.process)  # it never takes from itself

    def reconcile(self) -> None:
        """Converge on the registry's Production version and the model's experiment."""
        self.slot.reconcile()
        try:
            # In line before the first batch (and in burst mode); in the background while serving.
            self.arms.reconcile(self.model, in_line=self.burst or self.batches == 0)
        except StreamserveError as e:
            log.error("experiment state unusable: %s", e)

    def _maintain(self) -> None:
        now, s = time.monotonic(), self.settings
        if now >= self._due["heartbeat"]:
            self._due["heartbeat"] = now + s.heartbeat_interval_s
            self.heartbeat()
            self.take_over()
        if now >= self._due["reconcile"] or self.reload_requested.is_set():
            self.reload_requested.clear()
            self._due["reconcile"] = now + s.reconcile_interval_s
            self.reconcile()
        if self.slot.swap_if_ready():
            self.heartbeat()  # tell the fleet at once, not at the next interval
        self.arms.swap_if_ready()
        if now >= self._due["reclaim"]:
            self._due["reclaim"] = now + s.reclaim_interval_s
            self.reclaim()

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
        ttl_ms = int(self.settings.heartbeat_ttl_s * 1000)
        key, members = keys.worker_hash(self.model, self.worker_id), keys.workers_zset(self.model)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping=beat.to_hash())
        pipe.pexpire(key, ttl_ms)
        pipe.zadd(members, {self.worker_id: beat.heartbeat_ms})
        pipe.zremrangebyscore(members, "-inf", beat.heartbeat_ms - ttl_ms)
        pipe.execute()

    def presence(self) -> presence.Heartbeat:
        """This worker's heartbeat as of now."""
        loaded, slot = self.slot.loaded, self.slot
        return presence.Heartbeat(
            worker_id=self.worker_id, model=self.model, version=loaded.version.version if loaded else None,
            target_version=slot.target_version,
            failed_version=slot.target_version if slot.target_failed() else None,
            backend=loaded.backend.name if loaded else "", variant=loaded.variant if loaded else "",
            fallback=loaded.fallback_reason if loaded else "", error=slot.problem(), state=self._state(),
            host=socket.gethostname(), pid=os.getpid(), batches=self.batches, requests=self.requests,
            heartbeat_ms=presence.now_in_ms())

    def _state(self) -> str:
        if self.stopping.is_set():
            return "stopping"
        return "loading" if self.slot.loading else "serving"

    def _sign_off(self) -> None:
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.zrem(keys.workers_zset(self.model), self.worker_id)
            pipe.delete(keys.worker_hash(self.model, self.worker_id))
            pipe.execute()
            self.consumer.leave()
        except redis.RedisError as e:
            log.warning("sign-off failed: %s", e)
        self.redis.close()  # the pool reconnects if run() is called again
        log.info("worker %s stopped after %d batches, %d entries", self.worker_id,
                 self.batches, self.requests)
