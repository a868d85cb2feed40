"""Measure each shard's backlog and drain rate and publish it for backpressure (docs/protocol.md §13).

Every ``load_interval_s`` a worker reads ``XINFO STREAM`` and ``XINFO GROUPS``
of each lane of each shard it serves: the backlog (entries not yet delivered)
and how many entries have been answered since the stream began, whose growth
over about a second is the rate at which the whole fleet drains the shard
(``StreamConsumer.group_state``). Several workers of a shard publish the same
numbers; the last write wins. The hash expires when no worker is left, so a
bot never sheds on a dead fleet's figures.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from protocol import keys
from protocol.sharding import ShardLoad

if TYPE_CHECKING:
    from collections.abc import Mapping

    from protocol.settings import Settings
    from worker.consumer import StreamConsumer

log = logging.getLogger(__name__)
RATE_WINDOW_S = 1.0  # the drain rate is measured over at least this long
LOAD_TTL_MIN_S = 2.0


@dataclass(frozen=True, slots=True)
class LaneState:
    """One lane of one shard as last read: backlog (undelivered) and pending (delivered, unanswered)."""

    shard: int
    lane: str
    backlog: int
    pending: int


class LoadMeter:
    """Publishes ``keys.load_hash`` for every shard this worker reads."""

    def __init__(self, client: redis.Redis, model: str, settings: Settings) -> None:
        self.redis, self.model = client, model
        self.ttl_ms = int(max(LOAD_TTL_MIN_S, 4 * settings.load_interval_s) * 1000)
        # shard → (time, entries answered, backlog) samples
        self._reads: dict[int, deque[tuple[float, int, int]]] = {}
        self._busy_rate: dict[int, float] = {}  # shard → the last drain rate measured while never idle
        self.lanes: list[LaneState] = []  # the last reading, for the metrics

    def publish(self, consumers: Mapping[int, StreamConsumer]) -> None:
        """Read and publish every shard's load; Redis errors are logged (the next interval retries)."""
        lanes: list[LaneState] = []
        try:
            for shard, consumer in consumers.items():
                lanes += self._publish_shard(shard, consumer)
        except redis.RedisError as e:
            log.debug("load not published: %s", e)
            return
        self.lanes = lanes

    def _publish_shard(self, shard: int, consumer: StreamConsumer) -> list[LaneState]:
        state = consumer.group_state()
        now_s = time.monotonic()
        entries_read = sum(answered for _, _, answered in state.values())
        load = ShardLoad(backlog={lane: backlog for lane, (backlog, _, _) in state.items()},
                         drain_per_s=self._drain_per_s(shard, now_s, entries_read,
                                                       sum(b for b, _, _ in state.values())),
                         at_ms=int(time.time() * 1000))
        pipe = self.redis.pipeline(transaction=True)  # one slot: the shard's
        pipe.hset(keys.load_hash(self.model, shard), mapping=load.to_hash())  # type: ignore[arg-type]
        pipe.pexpire(keys.load_hash(self.model, shard), self.ttl_ms)
        pipe.execute()
        return [LaneState(shard, lane, backlog, pending) for lane, (backlog, pending, _) in state.items()]

    def _drain_per_s(self, shard: int, now_s: float, entries_read: int, backlog: int) -> float:
        """Entries answered per second over the last ``RATE_WINDOW_S`` or more (0 until known).

        Only a window in which the backlog never emptied measures what the fleet *can*
        drain; a window with idle time in it measures the arrival rate instead, and
        shedding on it at the start of a burst would refuse what the fleet could serve.
        Otherwise the last rate measured while busy stands.
        """
        samples = self._reads.setdefault(shard, deque())
        samples.append((now_s, entries_read, backlog))
        while len(samples) > 2 and now_s - samples[1][0] >= RATE_WINDOW_S:
            samples.popleft()  # keep the oldest sample that still spans the window
        first_s, first_read, _ = samples[0]
        if now_s - first_s >= RATE_WINDOW_S / 2 and entries_read >= first_read \
                and all(b > 0 for _, _, b in samples):
            self._busy_rate[shard] = (entries_read - first_read) / (now_s - first_s)
        return self._busy_rate.get(shard, 0.0)
