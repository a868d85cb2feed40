"""Measure each shard's backlog and drain rate and publish it for backpressure (docs/protocol.md §13).

Every ``load_interval_s`` a worker reads ``XINFO STREAM`` and ``XINFO GROUPS``
of each lane of each shard it serves: the backlog (entries not yet delivered),
how many entries have been computed since the stream began, whose growth over
about a second is the rate at which the whole fleet drains the shard, and how
many were added per lane, whose growth is each lane's arrival rate
(``StreamConsumer.group_state``). Several workers of a shard publish the same
numbers; the last write wins. The hash expires when no worker is left, so a
bot never sheds on a dead fleet's figures.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import redis

from protocol import keys
from protocol.connection import REDIS_ERRORS
from protocol.sharding import ShardLoad

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from protocol.settings import Settings
    from worker.consumer import LaneCounts, StreamConsumer

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


class Sample(NamedTuple):
    """One reading of a shard: when, entries computed so far, entries added per lane so far, backlog."""

    at_s: float
    computed: int
    added: dict[str, int]
    backlog: int


class LoadMeter:
    """Publishes ``keys.load_hash`` for every shard this worker reads."""

    def __init__(self, client: redis.Redis, model: str, settings: Settings) -> None:
        self.redis, self.model = client, model
        self.ttl_ms = int(max(LOAD_TTL_MIN_S, 4 * settings.load_interval_s) * 1000)
        self._reads: dict[int, deque[Sample]] = {}  # shard → samples spanning about RATE_WINDOW_S
        self._busy_rate: dict[int, float] = {}  # shard → the last drain rate measured while never idle
        self.lanes: list[LaneState] = []  # the last reading, for the metrics

    def publish(self, consumers: Mapping[int, StreamConsumer]) -> dict[int, Exception]:
        """Read and publish every shard's load; the shards whose Redis failed, with the error (logged;
        the next interval retries). A shard that fails does not keep the others from being published."""
        lanes: list[LaneState] = []
        failed: dict[int, Exception] = {}
        for shard, consumer in consumers.items():
            try:
                lanes += self._publish_shard(shard, consumer)
            except REDIS_ERRORS as e:
                log.debug("load of shard %d not published: %s", shard, e)
                failed[shard] = e
        # Failed shards keep their last reading (a metric, not a decision).
        self.lanes = [lane for lane in self.lanes if lane.shard in failed] + lanes
        return failed

    def _publish_shard(self, shard: int, consumer: StreamConsumer) -> list[LaneState]:
        pipe = self.redis.pipeline(transaction=True)  # one slot: the shard's
        lanes = self._queue_load(pipe, shard, *consumer.group_state())
        pipe.execute()
        return lanes

    def _queue_load(self, pipe: Any, shard: int, state: dict[str, LaneCounts],
                    discarded: int) -> list[LaneState]:
        """Queue the shard's load hash write, from its group state; the lanes, for the metrics."""
        sample = Sample(time.monotonic(), sum(c.answered for c in state.values()) - discarded,
                        {lane: c.added for lane, c in state.items()}, sum(c.backlog for c in state.values()))
        drain_per_s, arrive_per_s = self._rates(shard, sample)
        load = ShardLoad(backlog={lane: c.backlog for lane, c in state.items()}, drain_per_s=drain_per_s,
                         at_ms=int(time.time() * 1000), arrive_per_s=arrive_per_s)
        pipe.hset(keys.load_hash(self.model, shard), mapping=load.to_hash())
        pipe.pexpire(keys.load_hash(self.model, shard), self.ttl_ms)
        return [LaneState(shard, lane, c.backlog, c.pending) for lane, c in state.items()]

    def _rates(self, shard: int, sample: Sample) -> tuple[float, dict[str, float]]:
        """Entries computed per second, and added per second per lane, over ``RATE_WINDOW_S`` or more.

        The drain rate counts only computed entries (expired and shed ones leave the
        stream fast and would make a saturated fleet look quick), and only over a window
        in which the backlog never emptied: one with idle time in it measures arrivals,
        not what the fleet *can* drain, and shedding on it at the start of a burst would
        refuse what the fleet could serve. Otherwise the last busy rate stands. A counter
        that went back (a stream recreated) restarts the window.
        """
        samples = self._reads.setdefault(shard, deque())
        if samples and (sample.computed < samples[-1].computed
                        or any(sample.added[k] < n for k, n in samples[-1].added.items())):
            samples.clear()
        samples.append(sample)
        while len(samples) > 2 and sample.at_s - samples[1].at_s >= RATE_WINDOW_S:
            samples.popleft()  # keep the oldest sample that still spans the window
        first = samples[0]
        span_s = sample.at_s - first.at_s
        if span_s < RATE_WINDOW_S / 2:
            return self._busy_rate.get(shard, 0.0), {}
        if all(s.backlog > 0 for s in samples):
            self._busy_rate[shard] = (sample.computed - first.computed) / span_s
        arrive = {lane: (n - first.added.get(lane, n)) / span_s for lane, n in sample.added.items()}
        return self._busy_rate.get(shard, 0.0), arrive


def publish_many(client: redis.Redis,
                 meters: Sequence[tuple[LoadMeter, Mapping[int, StreamConsumer]]]) -> bool:
    """Every model's load on one server in two round trips (all group states read, then all load
    hashes written), where :meth:`LoadMeter.publish` takes two per shard: a worker serving many
    models would otherwise spend a round trip per shard every interval between its batches. False
    (logged, retried next interval) when Redis failed; the readings then stay as they were."""
    pipe = client.pipeline(transaction=False)
    spans = [(meter, shard, consumer, consumer.queue_group_state(pipe))
             for meter, consumers in meters for shard, consumer in consumers.items()]
    try:
        answers = pipe.execute(raise_on_error=False)
        writes = client.pipeline(transaction=False)  # each hash and its expiry in order, on one node
        start, lanes = 0, {id(meter): list[LaneState]() for meter, _ in meters}
        for meter, shard, consumer, n in spans:
            state, discarded = consumer.parse_group_state(answers[start:start + n])
            lanes[id(meter)] += meter._queue_load(writes, shard, state, discarded)
            start += n
        writes.execute()
    except REDIS_ERRORS as e:
        log.debug("load not published: %s", e)
        return False
    for meter, _ in meters:
        meter.lanes = lanes[id(meter)]
    return True
