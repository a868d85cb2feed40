"""The worker heartbeat (docs/protocol.md §7): one schema for its writer and every reader.

A worker writes its :class:`Heartbeat` as the hash ``keys.worker_hash`` with a
TTL of ``heartbeat_ttl_s`` and scores itself in ``keys.workers_zset`` with the
time it wrote it. A worker counts as live while its last heartbeat is younger
than the TTL: the same rule for ``health()``, ``status`` and ``promote --wait``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, cast

from protocol import keys
from protocol.settings import Settings
from protocol.values import int_or_none, text, text_dict

if TYPE_CHECKING:
    import redis

    from protocol.values import Fields, RawHash

DEFAULT_TTL_S = Settings.model_fields["heartbeat_ttl_s"].default


@dataclass(frozen=True)
class Heartbeat:
    """What one worker says about itself; ``version`` is None while nothing is loaded."""

    worker_id: str
    model: str = ""
    version: int | None = None
    target_version: int | None = None
    failed_version: int | None = None  # the target it could not load
    backend: str = ""
    variant: str = ""  # which of the version's artifacts serves ("primary", "onnx_int8_dynamic", …)
    fallback: str = ""  # why the selected artifact is not the one serving
    error: str = ""
    state: str = ""  # serving | loading | stopping
    host: str = ""
    pid: int = 0
    batches: int = 0
    requests: int = 0  # entries answered, all ways
    computed: int = 0  # of those, entries that went into a model call
    replayed: int = 0  # of those, re-sent entries answered from their marker (keys.done_key)
    heartbeat_ms: int = 0
    shards: str = ""  # the stream shards it reads, e.g. "0,1,2"

    def to_hash(self) -> Fields:
        """The hash fields; ``None`` is written as an empty string."""
        return {k: "" if v is None else v for k, v in asdict(self).items()}

    @classmethod
    def from_hash(cls, data: RawHash) -> Heartbeat:
        """Parse HGETALL output; missing fields take their defaults."""
        d = text_dict(data)
        return cls(
            worker_id=d.get("worker_id", ""), model=d.get("model", ""),
            version=int_or_none(d.get("version")), target_version=int_or_none(d.get("target_version")),
            failed_version=int_or_none(d.get("failed_version")), backend=d.get("backend", ""),
            variant=d.get("variant", ""), fallback=d.get("fallback", ""), error=d.get("error", ""),
            state=d.get("state", ""), host=d.get("host", ""), pid=int(d.get("pid") or 0),
            batches=int(d.get("batches") or 0), requests=int(d.get("requests") or 0),
            computed=int_or_none(d.get("computed")) or 0, replayed=int_or_none(d.get("replayed")) or 0,
            heartbeat_ms=int(d.get("heartbeat_ms") or 0), shards=d.get("shards", ""))

    @property
    def shard_list(self) -> list[int]:
        """``shards`` as numbers (malformed parts are skipped: the hash is untrusted)."""
        return [int(p) for p in self.shards.split(",") if p.isascii() and p.isdigit() and len(p) < 4]

    def age_ms(self, now_ms: int | None = None) -> int:
        """Milliseconds since this heartbeat was written."""
        return (now_ms if now_ms is not None else now_in_ms()) - self.heartbeat_ms

    def is_live(self, ttl_s: float = DEFAULT_TTL_S, now_ms: int | None = None) -> bool:
        """Written less than ``ttl_s`` ago."""
        return self.age_ms(now_ms) < ttl_s * 1000


def now_in_ms() -> int:
    """Wall-clock milliseconds, the unit of ``heartbeat_ms`` and the zset scores."""
    return int(time.time() * 1000)


def refresh(client: redis.Redis, model: str, worker_id: str, ttl_s: float) -> int:
    """Renew a worker's heartbeat without rewriting the rest of its hash; the time written (ms).

    What a worker sends from a side thread while a long model call runs: its loop, busy in
    the call, cannot send the whole heartbeat, and a live worker must not look dead.
    """
    now_ms, ttl_ms = now_in_ms(), int(ttl_s * 1000)
    key = keys.worker_hash(model, worker_id)
    pipe = client.pipeline(transaction=True)  # the hash and the zset share the model's slot
    pipe.hset(key, mapping={"worker_id": worker_id, "heartbeat_ms": now_ms})
    pipe.pexpire(key, ttl_ms)
    pipe.zadd(keys.workers_zset(model), {worker_id: now_ms})
    pipe.execute()
    return now_ms


def members_query(model: str, ttl_s: float = DEFAULT_TTL_S) -> tuple[str, int, str]:
    """ZRANGEBYSCORE arguments selecting the workers heard from within ``ttl_s``."""
    return keys.workers_zset(model), now_in_ms() - int(ttl_s * 1000), "+inf"


def live_ids(client: redis.Redis, model: str, ttl_s: float = DEFAULT_TTL_S) -> set[str]:
    """Ids of the workers heard from within ``ttl_s`` (one round trip)."""
    return {text(m) for m in _members(client, model, ttl_s)}


def _members(client: redis.Redis, model: str, ttl_s: float) -> list[bytes | str]:
    # Without withscores, ZRANGEBYSCORE gives plain members (redis-py's type also allows pairs).
    return cast("list[bytes | str]", client.zrangebyscore(*members_query(model, ttl_s)))


def parse_live(hashes: list[RawHash], ttl_s: float = DEFAULT_TTL_S) -> list[Heartbeat]:
    """Heartbeats from HGETALL results; expired (empty) or stale ones are dropped."""
    now_ms = now_in_ms()
    beats = (Heartbeat.from_hash(h) for h in hashes if h)
    return [b for b in beats if b.worker_id and b.is_live(ttl_s, now_ms)]


def read_live(client: redis.Redis, model: str, ttl_s: float = DEFAULT_TTL_S) -> list[Heartbeat]:
    """The live workers of ``model``: member ids, then their hashes (two round trips)."""
    members = _members(client, model, ttl_s)
    if not members:
        return []
    pipe = client.pipeline(transaction=False)
    for member in members:
        pipe.hgetall(keys.worker_hash(model, text(member)))
    return parse_live(pipe.execute(), ttl_s)
