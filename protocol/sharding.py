"""Stream shards of one model, and the load each shard reports (docs/protocol.md §12, §13).

A model's requests can be spread over S stream shards, each with its own hash
tag (``protocol.keys``), so that on a Redis Cluster the shards live on different
nodes. The layout is a small hash, ``keys.shards_hash(model)``:

- ``route``: how many shards bots send to (shards ``0 … route-1``);
- ``serve``: how many shards workers read (``serve ≥ route``, so a shard is read
  before the first request is sent to it);
- ``highest``: every shard ever used; workers keep draining a retired shard
  (``serve ≤ k < highest``) while it still holds entries, so a bot with a stale
  layout loses nothing.

No hash means one shard. A bot picks a shard by CRC-32 of its routing key
(a symbol's requests stay in one shard, in order) or round-robin without one.

Workers publish each shard's load, ``keys.load_hash(model, shard)``: per lane the
backlog (stream length) and the group's drain rate. A bot that sees its request
cannot be answered before its deadline fails it with ``OVERLOADED`` without
sending it.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from protocol import keys
from protocol.errors import InvalidInput
from protocol.values import text

if TYPE_CHECKING:
    import redis

    from protocol.values import RawHash

LAYOUT_REFRESH_S = 1.0  # bots re-read the layout at least this often (shrinking waits on it)


@dataclass(frozen=True, slots=True)
class ShardLayout:
    """How many shards bots route to, workers serve, and have ever existed."""

    route: int = 1
    serve: int = 1
    highest: int = 1

    def __post_init__(self) -> None:
        for name in ("route", "serve", "highest"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= keys.MAX_SHARDS:
                raise InvalidInput(f"shard layout: {name} must be 1 … {keys.MAX_SHARDS}, got {value!r}")
        if not self.route <= self.serve <= self.highest:
            raise InvalidInput(f"shard layout needs route ≤ serve ≤ highest, got "
                               f"{self.route}/{self.serve}/{self.highest}")

    @classmethod
    def from_hash(cls, raw: RawHash) -> ShardLayout:
        """Parse the untrusted hash; an empty one is the one-shard default. Raises ``InvalidInput``."""
        if not raw:
            return cls()
        d = {text(k): text(v) for k, v in raw.items()}
        try:
            values = {name: int(d[name]) for name in ("route", "serve", "highest")}
        except (KeyError, ValueError) as e:
            raise InvalidInput(f"shard layout hash is malformed: {d!r:.200}") from e
        return cls(**values)

    def to_hash(self) -> dict[str, str]:
        """The hash fields."""
        return {"route": str(self.route), "serve": str(self.serve), "highest": str(self.highest)}


def read_layout(client: redis.Redis, model: str) -> ShardLayout:
    """The model's layout (one HGETALL); raises ``InvalidInput`` if the hash is malformed."""
    return ShardLayout.from_hash(client.hgetall(keys.shards_hash(model)))


def write_layout(client: redis.Redis, model: str, layout: ShardLayout) -> None:
    """Replace the model's layout."""
    client.hset(keys.shards_hash(model), mapping=layout.to_hash())  # type: ignore[arg-type]


def holds_entries(client: redis.Redis, model: str, shard: int) -> bool:
    """True while any lane of ``shard`` has entries (unread or pending: answered ones are deleted).

    One round trip: the lanes of a shard share its slot.
    """
    pipe = client.pipeline(transaction=False)
    for lane in keys.LANES:
        pipe.xlen(keys.request_stream(model, shard, lane))
    return any(int(n) for n in pipe.execute())


def shard_for(route: str, shards: int) -> int:
    """The shard of a routing key: CRC-32 (IEEE, as zlib and most languages have it) of its UTF-8, mod S."""
    return zlib.crc32(route.encode()) % shards


class ShardPicker:
    """Routing key → its shard; no key → round-robin (thread-safe: ``itertools.count`` is atomic)."""

    def __init__(self) -> None:
        self._next = itertools.count()

    def pick(self, route: str, shards: int) -> int:
        """The shard for one request (or one ``predict_many`` call)."""
        if shards <= 1:
            return 0
        return shard_for(route, shards) if route else next(self._next) % shards


@dataclass(frozen=True, slots=True)
class ShardLoad:
    """What the workers last measured on a shard: backlog and arrival rate per lane, and drain rate.

    ``drain_per_s`` counts entries *computed* per second (not those expired or shed: they
    leave fast and would make a saturated fleet look quick); ``arrive_per_s`` is how fast
    each lane's stream grows, so a lower lane's wait includes the higher lanes' arrivals.
    """

    backlog: dict[str, int]
    drain_per_s: float
    at_ms: int
    arrive_per_s: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_hash(cls, raw: RawHash) -> ShardLoad | None:
        """Parse the untrusted hash; None when absent or malformed (no load known: nothing is shed)."""
        try:
            d = {text(k): text(v) for k, v in raw.items()}
            backlog = {lane: max(0, int(d.get(f"backlog:{lane}", "0"))) for lane in keys.LANES}
            arrive = {lane: float(d.get(f"arrive_per_s:{lane}", "0")) for lane in keys.LANES}
            drain = float(d["drain_per_s"])
            at_ms = int(d["at_ms"])
        except (KeyError, ValueError, AttributeError, UnicodeDecodeError):
            return None
        if not all(_finite_rate(r) for r in (drain, *arrive.values())):
            return None
        return cls(backlog, drain, at_ms, arrive)

    def to_hash(self) -> dict[str, str]:
        """The hash fields."""
        fields = {f"backlog:{lane}": str(n) for lane, n in self.backlog.items()}
        fields |= {f"arrive_per_s:{lane}": f"{r:.3f}" for lane, r in self.arrive_per_s.items()}
        return {**fields, "drain_per_s": f"{self.drain_per_s:.3f}", "at_ms": str(self.at_ms)}

    def ahead(self, lane: str) -> int:
        """Entries a new request of ``lane`` waits behind: its own lane and every higher one."""
        return sum(self.backlog.get(name, 0) for name in keys.LANES[:keys.LANES.index(lane) + 1])

    def expected_wait_ms(self, lane: str) -> float:
        """Time to drain what is ahead; 0 with no backlog or no rate measured, inf when it never drains.

        The rate left to ``lane`` is the drain rate less what arrives on higher lanes
        meanwhile (they jump the queue). No drain rate measured (workers loading, or none
        left) is "unknown", not "infinite": shedding is for a fleet that is working and
        too slow, never a guess.
        """
        ahead = self.ahead(lane)
        if ahead == 0 or self.drain_per_s <= 0:
            return 0.0
        higher = keys.LANES[:keys.LANES.index(lane)]
        left_per_s = self.drain_per_s - sum(self.arrive_per_s.get(name, 0.0) for name in higher)
        return ahead / left_per_s * 1000 if left_per_s > 0 else float("inf")


def _finite_rate(rate: float) -> bool:
    return rate >= 0 and rate != float("inf")  # NaN fails the first test
