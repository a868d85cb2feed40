"""The worker: read a model's stream through its consumer group, micro-batch, infer, reply, ack.

One process serves one model with one ONNX Runtime session. The loop is
synchronous on purpose: a batch is read, computed and answered in order, so
"finish the in-flight batch" on SIGTERM is simply "finish this iteration".
Replies and the XACK go out in one MULTI/EXEC: an entry is acked only together
with its reply, and an entry never answered stays pending for another worker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import redis

from experiments.assignment import CONTROL, TREATMENT
from protocol import keys, messages
from protocol.errors import (
    DeadlineExceeded,
    InternalError,
    ModelNotFound,
    Overloaded,
    ReplyError,
    StreamserveError,
)
from protocol.settings import Settings
from registry import Registry
from worker.arms import JOURNAL_MAXLEN, LATENCY_SAMPLES, REPLAY_MAXLEN, ExperimentArms, ExperimentLog
from worker.batcher import Batcher
from worker.control import ControlListener
from worker.loader import LoadedModel, Reloader, load_version

log = logging.getLogger(__name__)
RECONNECT_DELAY_S = 0.5
RELOAD_POLL_MS = 20
Entry = tuple[str, dict[bytes, bytes]]


@dataclass
class Outbox:
    """What one batch writes back: replies, entries to ack, entries to dead-letter."""

    replies: dict[str, list[bytes]] = field(default_factory=dict)  # reply token → payloads
    ack_ids: list[str] = field(default_factory=list)
    dead: list[tuple[Entry, str]] = field(default_factory=list)
    call_rows: list[int] = field(default_factory=list)  # rows of each model call
    experiment: ExperimentLog = field(default_factory=ExperimentLog)

    def reply(self, reply_to: str, payload: bytes) -> None:
        """Queue a reply; replies sharing a token go out in one LPUSH."""
        self.replies.setdefault(reply_to, []).append(payload)


class Worker:
    """Serve one model from its request stream until stopped (or drained, with ``burst``)."""

    def __init__(self, settings: Settings, model: str, *, burst: bool = False,
                 max_queue_ms: float = 0.0, worker_id: str | None = None) -> None:
        self.settings = settings
        self.model = keys.check_model_name(model)
        self.burst = burst
        self.max_queue_ms = max_queue_ms
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.redis = redis.Redis.from_url(settings.redis_url, socket_keepalive=True)
        self.registry = Registry(self.redis, settings.artifact_dir)
        self.stream = keys.request_stream(model)
        self.group = keys.consumer_group(model)
        self.loaded: LoadedModel | None = None
        self.load_error = "not loaded yet"
        self.target_version: int | None = None
        self.target_variant = ""
        self.reloader = Reloader(lambda mv: load_version(self.registry, mv, settings))
        self.arms = ExperimentArms(self.redis, self.registry, settings)
        self.reload_requested = threading.Event()
        self.stopping = threading.Event()
        self.batches = self.requests = 0
        self._due = {"heartbeat": 0.0, "reclaim": 0.0, "reconcile": 0.0}
        self.batcher = Batcher(self._read, max_batch=settings.max_batch,
                               max_wait_ms=settings.max_wait_ms)

    # ---- lifecycle -------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until ``stop()`` (or a signal); in burst mode, until the stream is drained."""
        self._ensure_group()
        self.reconcile()
        log.info("worker %s serving %s (%s)", self.worker_id, self.model, self._serving())
        listener = None if self.burst else ControlListener(
            self.settings.redis_url, self.model, lambda _command: self.reload_requested.set()).start()
        try:
            while not self.stopping.is_set():
                try:
                    if not self._step():
                        break
                except (redis.ConnectionError, redis.TimeoutError) as e:
                    # The batch in hand (if any) stays pending and is reclaimed after the outage.
                    log.warning("Redis unavailable (%s); retrying in %.1f s", e, RECONNECT_DELAY_S)
                    self.stopping.wait(RECONNECT_DELAY_S)
        finally:
            if listener is not None:
                listener.stop()
            self._sign_off()

    def _step(self) -> bool:
        """One loop iteration; False when a burst worker has drained the stream."""
        self._maintain()
        batch = self.batcher.next_batch(0 if self.burst else self._idle_wait_ms())
        if batch:
            self.process(batch)
            return True
        return not self.burst or self.reclaim() > 0

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

    def _ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _idle_wait_ms(self) -> float:
        next_due = min(self._due.values())
        # While a new version loads, wake often so it is swapped in soon after it is ready.
        block_ms = RELOAD_POLL_MS if self.reloader.loading else self.settings.block_ms
        return max(1.0, min(block_ms, (next_due - time.monotonic()) * 1000))

    def _maintain(self) -> None:
        now = time.monotonic()
        s = self.settings
        if now >= self._due["heartbeat"]:
            self._due["heartbeat"] = now + s.heartbeat_interval_s
            self.heartbeat()
        if now >= self._due["reconcile"] or self.reload_requested.is_set():
            self.reload_requested.clear()
            self._due["reconcile"] = now + s.reconcile_interval_s
            self.reconcile()
        self._swap_if_ready()
        self.arms.swap_if_ready()
        if now >= self._due["reclaim"]:
            self._due["reclaim"] = now + s.reclaim_interval_s
            self.reclaim()

    # ---- model -----------------------------------------------------------------------------

    def reconcile(self) -> None:
        """Converge on the registry's Production version and the model's experiment."""
        self._reconcile_production()
        try:
            # In line before the first batch (and in burst mode); in the background while serving.
            self.arms.reconcile(self.model, in_line=self.burst or self.batches == 0)
        except StreamserveError as e:
            log.error("experiment state unusable: %s", e)

    def _reconcile_production(self) -> None:
        """Converge on the registry's Production version.

        With nothing loaded yet (start-up) the version loads in line; otherwise it
        loads beside the served one and is swapped in between batches. A version
        that cannot load (sha256 mismatch, bad file, golden check) is reported and
        the old one keeps serving.
        """
        try:
            target = self.registry.production(self.model)
        except StreamserveError as e:
            if self.loaded is None:
                self.load_error = str(e)
            return
        self.target_version, self.target_variant = target.version, target.serving_variant
        if self.loaded is not None and self._is_target(self.loaded):
            return
        if self.loaded is not None:
            self.reloader.request(target)
            return
        try:
            self.loaded = load_version(self.registry, target, self.settings)
            self.load_error = ""
        except StreamserveError as e:
            self.load_error = f"v{target.version}: {e}"
            log.error("cannot load %s v%s: %s", self.model, target.version, e)

    def _swap_if_ready(self) -> None:
        ready = self.reloader.take_ready()
        if ready is not None and self._is_target(ready):
            previous = self.loaded.version.version if self.loaded else None
            self.loaded, self.load_error = ready, ""
            log.info("swapped %s v%s → v%s", self.model, previous, ready.version.version)
            self.heartbeat()  # tell the fleet at once, not at the next interval
        elif self._failed_target() and self._load_problem() != self.load_error:
            self.load_error = self._load_problem()
            self.heartbeat()

    def _is_target(self, loaded: LoadedModel) -> bool:
        mv = loaded.version
        return (mv.version, mv.serving_variant) == (self.target_version, self.target_variant)

    def _failed_target(self) -> bool:
        return self.target_version in self.reloader.failures

    def _load_problem(self) -> str:
        """What to report: the target's load failure, else the last start-up error."""
        if self._failed_target():
            return f"v{self.target_version}: {self.reloader.failures[self.target_version]}"
        return self.load_error

    def _serving(self) -> str:
        return f"v{self.loaded.version.version}" if self.loaded else f"nothing: {self.load_error}"

    # ---- reading ---------------------------------------------------------------------------

    def _read(self, count: int, wait_ms: float) -> list[Entry]:
        block = int(wait_ms) if wait_ms >= 1 else None
        try:
            response = self.redis.xreadgroup(self.group, self.worker_id, {self.stream: ">"},
                                             count=count, block=block)
        except redis.ResponseError as e:
            # NOGROUP: stream or group deleted; UNBLOCKED: deleted while we were blocked on it.
            if not str(e).startswith(("NOGROUP", "UNBLOCKED")):
                raise
            log.warning("stream or group vanished (%s); recreating", e)
            self._ensure_group()
            return []
        return [(_text(i), f) for i, f in response[0][1]] if response else []

    def reclaim(self) -> int:
        """Take over entries idle in dead consumers' pending lists; dead-letter the over-delivered."""
        start, handled = "0-0", 0
        while True:
            start, claimed, deleted = self._autoclaim(start)
            if deleted:  # trimmed away while pending: nothing left to answer
                self.redis.xack(self.stream, self.group, *deleted)
            if claimed:
                handled += len(claimed)
                self._process_claimed(claimed)
            if start in ("0-0", b"0-0"):
                return handled

    def _autoclaim(self, start: str) -> tuple[str, list[Entry], list[str]]:
        result = self.redis.xautoclaim(self.stream, self.group, self.worker_id,
                                       self.settings.reclaim_min_idle_ms, start_id=start,
                                       count=self.settings.max_batch)
        claimed = [(_text(i), f) for i, f in result[1] if f is not None]
        deleted = [_text(i) for i in (result[2] if len(result) > 2 else [])]
        return _text(result[0]), claimed, deleted

    def _process_claimed(self, claimed: list[Entry]) -> None:
        ids = [entry_id for entry_id, _ in claimed]
        pending = self.redis.xpending_range(self.stream, self.group, min=min(ids, key=_id_key),
                                            max=max(ids, key=_id_key), count=len(ids) + 1000,
                                            consumername=self.worker_id)
        deliveries = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
        over = [e for e in claimed if deliveries.get(e[0], 0) > self.settings.max_deliveries]
        fresh = [e for e in claimed if deliveries.get(e[0], 0) <= self.settings.max_deliveries]
        log.warning("reclaimed %d entries (%d over %d deliveries)", len(claimed), len(over),
                    self.settings.max_deliveries)
        self.process(fresh, dead_letter=over)

    # ---- processing ------------------------------------------------------------------------

    def process(self, entries: list[Entry], *, dead_letter: list[Entry] = ()) -> None:
        """Answer every entry (computed, or with its own error), then ack them with the replies."""
        started_ms = time.time() * 1000
        out = Outbox()
        for entry in dead_letter:
            self._dead_letter(out, entry, f"delivered more than {self.settings.max_deliveries} times")
        valid = [r for r in (self._admit(out, e, started_ms) for e in entries) if r is not None]
        if valid:
            self._infer(out, valid, started_ms)
        self._write(out)

    def _admit(self, out: Outbox, entry: Entry, now_ms: float) -> messages.Request | None:
        entry_id, fields = entry
        out.ack_ids.append(entry_id)
        try:
            request = messages.decode_request(entry_id, fields, max_bytes=self.settings.max_message_bytes)
            queue_ms = now_ms - _id_ms(entry_id)
            if request.deadline_ms and request.deadline_ms < now_ms:
                raise DeadlineExceeded(f"deadline passed {now_ms - request.deadline_ms:.1f} ms "
                                       f"before compute (queued {queue_ms:.1f} ms)")
            if self.max_queue_ms and queue_ms > self.max_queue_ms:
                raise Overloaded(f"queued {queue_ms:.1f} ms > {self.max_queue_ms} ms; shed")
            if self.loaded is None:
                raise ModelNotFound(f"model {self.model!r} has no servable version ({self.load_error})")
            self.loaded.spec.check(request.inputs, self.settings.max_request_rows)
            return request
        except ReplyError as e:
            address = messages.reply_address(fields)
            if address is None:
                self._dead_letter(out, entry, f"unanswerable: {e}")
            else:
                timings = {"queue_ms": now_ms - _id_ms(entry_id), "infer_ms": 0.0}
                out.reply(address[1], self._error(address[0], e, timings))
            return None

    def _infer(self, out: Outbox, batch: list[messages.Request], started_ms: float) -> None:
        control = self.loaded
        assert control is not None  # _admit rejects everything when nothing is loaded
        experiment = self.arms.active(control)
        if experiment is None:
            self._run(out, control, batch, started_ms)
            return
        out.experiment.experiment_id = experiment.id
        treatment = self.arms.treatment
        if experiment.mode == "shadow":  # both score everything; the control answers
            self._run(out, control, batch, started_ms, arm=CONTROL)
            self._shadow(out, treatment, batch)
            return
        groups: dict[str, list[messages.Request]] = {CONTROL: [], TREATMENT: []}
        for r in batch:
            groups[experiment.arm(r.route, r.request_id)].append(r)
        for arm, loaded in ((CONTROL, control), (TREATMENT, treatment)):
            if groups[arm]:
                self._run(out, loaded, groups[arm], started_ms, arm=arm)

    def _call(self, loaded: LoadedModel, batch: list[messages.Request]) -> dict[str, np.ndarray]:
        """One model call for the batch; outputs must keep the batch axis."""
        stacked = {n: np.concatenate([r.inputs[n] for r in batch]) for n in loaded.spec.fields}
        outputs = loaded.backend.run(stacked)
        rows = sum(r.n_rows for r in batch)
        if any(o.shape[:1] != (rows,) for o in outputs.values()):
            raise InternalError(f"model returned outputs without the batch axis of {rows} rows")
        return outputs

    def _run(self, out: Outbox, loaded: LoadedModel, batch: list[messages.Request], started_ms: float,
             arm: str | None = None) -> None:
        """Compute ``batch`` on ``loaded`` and queue one reply per request (tagged with ``arm``)."""
        t0 = time.perf_counter()
        try:
            outputs = self._call(loaded, batch)
        except Exception as e:  # a model failure fails this batch only, never the worker
            log.exception("batch of %d failed", len(batch))
            err = e if isinstance(e, InternalError) else InternalError(f"model failed: {e}")
            for r in batch:
                out.reply(r.reply_to, self._error(r.request_id, err, {}))
            if arm:
                out.experiment.failed(arm, err.code, len(batch))
            return
        infer_ms = (time.perf_counter() - t0) * 1000
        out.call_rows.append(sum(r.n_rows for r in batch))
        mv, offset = loaded.version, 0
        for r in batch:
            part = {name: value[offset:offset + r.n_rows] for name, value in outputs.items()}
            offset += r.n_rows
            timings = {"queue_ms": started_ms - _id_ms(r.entry_id), "infer_ms": infer_ms}
            out.reply(r.reply_to, messages.encode_ok(
                r, model=self.model, version=mv.version, outputs=part, labels=mv.labels,
                timings=timings, worker=self.worker_id, variant=arm))
            if arm:
                out.experiment.served(arm, r.request_id, mv.version, _labels(mv.labels, part),
                                      timings["queue_ms"] + infer_ms, r.raw_inputs)

    def _shadow(self, out: Outbox, treatment: LoadedModel, batch: list[messages.Request]) -> None:
        """Score the batch on the treatment too; its outputs go to the journal, never to the bot."""
        try:
            outputs = self._call(treatment, batch)
        except Exception as e:  # the shadow must never hurt the answered requests
            log.warning("shadow treatment failed on %d requests: %s", len(batch), e)
            out.experiment.failed(TREATMENT, InternalError.code, len(batch))
            return
        out.experiment.counts[f"{TREATMENT}:requests"] += len(batch)
        labels = treatment.version.labels
        offset = 0
        for r, entry in zip(batch, out.experiment.journal[-len(batch):], strict=False):
            part = {name: value[offset:offset + r.n_rows] for name, value in outputs.items()}
            offset += r.n_rows
            if entry["id"] == r.request_id:
                entry["shadow_label"] = ",".join(_labels(labels, part))
                entry["shadow_version"] = str(treatment.version.version)

    def _error(self, request_id: str, error: ReplyError, timings: dict[str, float]) -> bytes:
        version = self.loaded.version.version if self.loaded else None
        return messages.encode_error(request_id, error, model=self.model, version=version,
                                     timings=timings, worker=self.worker_id)

    def _dead_letter(self, out: Outbox, entry: Entry, reason: str) -> None:
        entry_id, fields = entry
        out.ack_ids.append(entry_id)
        out.dead.append((entry, reason))
        address = messages.reply_address(fields)
        if address is not None:
            err = InternalError(f"dead-lettered: {reason}", request_id=address[0])
            out.reply(address[1], self._error(address[0], err, {}))

    def _write(self, out: Outbox) -> None:
        """Replies, dead letters, histogram and XACK in one MULTI/EXEC (one slot: same hash tag)."""
        ttl_ms = int(self.settings.reply_ttl_s * 1000)
        pipe = self.redis.pipeline(transaction=True)
        for reply_to, payloads in out.replies.items():
            key = keys.reply_key(self.model, reply_to)
            pipe.lpush(key, *payloads)
            pipe.pexpire(key, ttl_ms)
        for (entry_id, fields), reason in out.dead:
            record = {**fields, b"entry_id": entry_id, b"reason": reason, b"worker": self.worker_id}
            pipe.xadd(keys.dead_letter_stream(self.model), record,
                      maxlen=self.settings.dead_letter_maxlen, approximate=True)
        for rows in out.call_rows:
            pipe.hincrby(keys.batch_histogram(self.model), str(rows), 1)
        if out.experiment.experiment_id:
            self._queue_experiment_log(pipe, out.experiment)
        if out.ack_ids:
            pipe.xack(self.stream, self.group, *out.ack_ids)
        pipe.execute()
        self.batches += 1
        self.requests += len(out.ack_ids)

    def _queue_experiment_log(self, pipe, log_: ExperimentLog) -> None:
        exp_id = log_.experiment_id
        for name, n in log_.counts.items():
            pipe.hincrby(keys.experiment_counts(self.model, exp_id), name, n)
        for arm, values in log_.latencies_ms.items():
            key = keys.experiment_latency(self.model, exp_id, arm)
            pipe.lpush(key, *(f"{v:.3f}" for v in values))
            pipe.ltrim(key, 0, LATENCY_SAMPLES - 1)
        for entry in log_.journal:
            pipe.xadd(keys.experiment_journal(self.model, exp_id), entry, maxlen=JOURNAL_MAXLEN,
                      approximate=True)
        for entry in log_.replay:
            pipe.xadd(keys.experiment_replay(self.model, exp_id), entry, maxlen=REPLAY_MAXLEN,
                      approximate=True)

    # ---- presence --------------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Publish what this worker serves; stale members are pruned by every heartbeat."""
        now_ms = int(time.time() * 1000)
        ttl_ms = int(self.settings.heartbeat_ttl_s * 1000)
        key = keys.worker_hash(self.model, self.worker_id)
        state = {
            "worker_id": self.worker_id, "pid": os.getpid(), "host": socket.gethostname(),
            "model": self.model, "version": self.loaded.version.version if self.loaded else "",
            "target_version": self.target_version or "",
            "failed_version": self.target_version if self._failed_target() else "",
            "backend": self.loaded.backend.name if self.loaded else "", "error": self._load_problem(),
            "fallback": self.loaded.fallback_reason if self.loaded else "",
            "variant": self.loaded.variant if self.loaded else "",
            "batches": self.batches, "requests": self.requests, "heartbeat_ms": now_ms,
            "state": self._state(),
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping=state)
        pipe.pexpire(key, ttl_ms)
        pipe.zadd(keys.workers_zset(self.model), {self.worker_id: now_ms})
        pipe.zremrangebyscore(keys.workers_zset(self.model), "-inf", now_ms - ttl_ms)
        pipe.execute()

    def _state(self) -> str:
        if self.stopping.is_set():
            return "stopping"
        return "loading" if self.reloader.loading is not None else "serving"

    def _sign_off(self) -> None:
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.zrem(keys.workers_zset(self.model), self.worker_id)
            pipe.delete(keys.worker_hash(self.model, self.worker_id))
            # Leave no empty consumer behind; a consumer with pending entries must stay for reclaim.
            pipe.execute()
            if not self.redis.xpending_range(self.stream, self.group, "-", "+", 1, self.worker_id):
                self.redis.xgroup_delconsumer(self.stream, self.group, self.worker_id)
        except redis.RedisError as e:
            log.warning("sign-off failed: %s", e)
        self.redis.close()  # the pool reconnects if run() is called again
        log.info("worker %s stopped after %d batches, %d entries", self.worker_id,
                 self.batches, self.requests)


def _labels(labels: list[str], outputs: dict[str, np.ndarray]) -> list[str]:
    """Label per row of the first output (empty when the version has no labels)."""
    if not labels:
        return []
    return [labels[i] for i in next(iter(outputs.values())).argmax(axis=-1).tolist()]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id_ms(entry_id: str) -> float:
    return float(entry_id.split("-", 1)[0])


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-", 1)
    return int(ms), int(seq)
