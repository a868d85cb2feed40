"""One model as a worker process serves it: its shards' consumers, its slot, experiment and meter.

A worker process holds one :class:`ServedModel` per model it serves (``--model`` is
the one-model case). Everything that is the model's own lives here: the consumers of
its shards (one per shard, every lane of a shard in one hash slot), the version it
serves (:class:`~worker.slot.ModelSlot`), its experiment's treatment, the batch
processor, its load meter, its metrics and its own problems for the heartbeat. The
worker (:mod:`worker.worker`) owns what the process shares: the connection, the
loop, the schedule between models and the model cache.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import redis

from protocol import presence, sharding
from protocol.errors import InvalidInput
from protocol.settings import Settings
from registry import Registry
from worker.arms import ExperimentArms
from worker.batcher import Batcher
from worker.consumer import Entry, StreamConsumer
from worker.load import LoadMeter
from worker.processing import BatchProcessor
from worker.slot import ModelSlot

if TYPE_CHECKING:
    from worker.metrics import ModelMetrics

log = logging.getLogger(__name__)


class ServedModel:
    """One model of a worker process; ``consumers`` by shard."""

    def __init__(self, model: str, client: redis.Redis, registry: Registry, settings: Settings,
                 worker_id: str, metrics: ModelMetrics, *, max_queue_ms: float = 0.0) -> None:
        self.model, self.redis, self.settings, self.worker_id = model, client, settings, worker_id
        self.consumers: dict[int, StreamConsumer] = {}
        self.batchers: dict[int, Batcher[Entry]] = {}
        self.slot = ModelSlot(registry, model, settings)
        self.arms = ExperimentArms(client, registry, settings)
        self.processor = BatchProcessor(model, worker_id, self.slot, self.arms, settings,
                                        max_queue_ms=max_queue_ms)
        self.load = LoadMeter(client, model, settings)
        self.metrics = metrics
        self.problems: dict[str, str] = {}  # this model's own, by area ("shard 1", "experiment", …)
        self.reload_requested = False  # a control command for this model: reconcile it next
        self.load_started_s: float | None = None  # monotonic: a load on request is under way since
        self.load_reported: int | None = None  # the last version whose load (or failure) was counted
        self.failed_target: int | None = None  # the version whose load (on request, or pinned) failed
        self.retry_load_at_s = 0.0  # monotonic: when that load may be tried again
        self.turn = 0  # which of its shards goes first next
        self.batches = self.requests = 0  # of this model, for its heartbeat (the worker counts all)
        self.computed = self.replayed = 0

    @property
    def consumer(self) -> StreamConsumer:
        """The consumer of the lowest shard read (the only one, unsharded)."""
        return self.consumers[min(self.consumers)]

    def add_shard(self, shard: int, template: StreamConsumer | None) -> StreamConsumer:
        """Read ``shard`` too; its group is created here unless it is the worker's first consumer
        (set up at start-up, with Redis checks and backoff), whose server features ``template`` has."""
        consumer = StreamConsumer(self.redis, self.model, self.worker_id, self.settings, shard)
        if template is not None:
            consumer.ensure_group()
            consumer.has_xackdel, consumer.has_markers = template.has_xackdel, template.has_markers
        self.consumers[shard] = consumer
        self.batchers[shard] = Batcher(consumer.read, max_batch=self.settings.max_batch,
                                       max_wait_ms=self.settings.max_wait_ms)
        return consumer

    def drop_shard(self, shard: int) -> bool:
        """Stop reading ``shard`` unless its consumer still holds entries to answer; True if dropped."""
        dropped = self.consumers[shard]
        if dropped.busy:  # what it read is ours to answer first
            return False
        dropped.flush_stats()
        if dropped.link is not None:
            dropped.link.release()  # its kept connection back to the pool
        del self.consumers[shard], self.batchers[shard]
        self.problems.pop(f"shard {shard}", None)
        return True

    def layout_shards(self) -> list[int] | None:
        """The shards the layout serves, and retired ones still holding entries; None when the
        layout is unreadable (the problem is reported; the shards read stay as they are)."""
        try:
            layout = sharding.read_layout(self.redis, self.model)
        except InvalidInput as e:  # an operator must fix the hash
            self.problems["shards"] = str(e)[:300]
            return None
        self.problems.pop("shards", None)
        retired = [k for k in range(layout.serve, layout.highest)
                   if sharding.holds_entries(self.redis, self.model, k)]
        return [*range(layout.serve), *retired]

    @property
    def busy(self) -> bool:
        """Some consumer holds entries, or replies, still to be answered or written."""
        return any(c.busy for c in self.consumers.values())

    @property
    def waiting(self) -> bool:
        """Entries wait for this model's load: it is not loaded, and a load is under way."""
        return self.slot.loaded is None and self.load_started_s is not None and any(
            c.buffered for c in self.consumers.values())

    def count_loads(self) -> bool:
        """Count each target version's load once, served or failed; True when one was counted."""
        target, loaded = self.slot.target_version, self.slot.loaded
        if target is None or target == self.load_reported:
            return False
        if loaded is not None and loaded.version.version == target:
            self.metrics.model_load(str(target), True)
        elif self.slot.target_failed():
            self.metrics.model_load(str(target), False)
        else:
            return False  # still loading (or not asked to)
        self.load_reported = target
        return True

    def unload(self, why: str) -> None:
        """Drop both arms' loaded versions (evicted): the next request loads them again."""
        self.slot.unload(why)
        self.arms.treatment = None
        self.arms.loader.discard()
        self.processor.loading_eta_ms = None

    def heartbeat(self, *, state: str, error: str, counts: dict[str, int], cache: dict[str, object]
                  ) -> presence.Heartbeat:
        """This model's heartbeat from this worker as of now."""
        loaded, slot = self.slot.loaded, self.slot
        return presence.Heartbeat(
            worker_id=self.worker_id, model=self.model, version=loaded.version.version if loaded else None,
            target_version=slot.target_version,
            failed_version=slot.target_version if slot.target_failed() else None,
            backend=loaded.backend.name if loaded else "", variant=loaded.variant if loaded else "",
            fallback=loaded.fallback_reason if loaded else "", error=error, state=state,
            host=socket.gethostname(), pid=os.getpid(), heartbeat_ms=presence.now_in_ms(),
            shards=",".join(map(str, sorted(self.consumers))), **counts, **cache)  # type: ignore[arg-type]


def deadline_ms(entry: Entry) -> float:
    """An entry's deadline (Unix ms; 0 = none), read without decoding the request. A malformed one
    reads as already passed: the entry is answered at once, with the decoder's error."""
    raw = entry.fields.get(b"deadline_ms", b"0")
    try:
        return float(int(raw)) if raw.isdigit() and len(raw) <= 16 else 1.0
    except (TypeError, ValueError, AttributeError):
        return 1.0


def hopeless(entries: Sequence[Entry], eta_ms: float, now_ms: float | None = None) -> list[Entry]:
    """The entries whose deadline comes before a load expected to take ``eta_ms`` more."""
    now_ms = time.time() * 1000 if now_ms is None else now_ms
    return [e for e in entries if 0 < deadline_ms(e) < now_ms + eta_ms]
