"""The worker heartbeat (docs/protocol.md §7): one schema for its writer and every reader.

A worker writes its :class:`Heartbeat` as the hash ``keys.worker_hash`` with a
TTL of ``heartbeat_ttl_s`` and scores itself in ``keys.workers_zset`` with the
time it wrote it, once for every model it serves (loaded or not). A worker counts
as live while its last heartbeat is younger than the TTL: the same rule for
``health()``, ``status`` and ``promote --wait``.

Every hash is read as untrusted: a missing field (an older worker) or a malformed
one takes its default, text is cut to ``MAX_TEXT_CHARS``, and parsing never raises.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar, cast

from protocol import keys
from protocol.settings import Settings

if TYPE_CHECKING:
    import redis

    from protocol.values import Fields, RawHash

T = TypeVar("T", int, float)
DEFAULT_TTL_S = Settings.model_fields["heartbeat_ttl_s"].default
MAX_TEXT_CHARS = 2000  # a text field as read: enough for an error chain, not a hostile megabyte
MAX_NUMBER_CHARS = 32  # longer is not a number a worker writes (and int() of a huge string is slow)
CACHE_STATES = ("", "cold", "loading", "loaded", "evicted", "failed")  # "": a single-model worker
ON_DEMAND = ("cold", "evicted")  # not in memory here; loaded by the first request for the model
SERVING_STATES = ("serving", "loading")


@dataclass(frozen=True)
class Heartbeat:
    """What one worker says about itself for one model; ``version`` is None while it is not loaded."""

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
    cache: str = ""  # the model in this process: one of CACHE_STATES ("" from a single-model worker)
    loaded_at_ms: int = 0  # wall clock of the last successful load (0: never)
    load_ms: float = 0.0  # how long that load took (0: never)
    size_mb: float = 0.0  # measured size of the loaded model (0: not loaded, or unknown)
    load_error: str = ""  # the last load failure of this model here
    models: int = 1  # how many models this worker process serves
    pinned: bool = False  # loaded at start and never evicted

    def to_hash(self) -> Fields:
        """The hash fields; ``None`` is written as an empty string, a flag as ``"1"`` or ``""``."""
        return {k: _field_text(v) for k, v in asdict(self).items()}

    @classmethod
    def from_hash(cls, data: RawHash) -> Heartbeat:
        """Parse HGETALL output; a missing or malformed field takes its default (never raises)."""
        d = {_decoded(k): _decoded(v) for k, v in data.items()}
        values: dict[str, Any] = {}
        for f in fields(cls):
            parsed = _PARSERS[cast(str, f.type)](d[f.name]) if f.name in d else None
            values[f.name] = parsed if parsed is not None else _default(f)
        return cls(**values)

    @property
    def shard_list(self) -> list[int]:
        """``shards`` as numbers (malformed parts are skipped: the hash is untrusted)."""
        return [int(p) for p in self.shards.split(",") if p.isascii() and p.isdigit() and len(p) < 4]

    @property
    def loads_on_demand(self) -> bool:
        """The model is not in memory here (``cold`` or ``evicted``); its first request loads it."""
        return self.version is None and self.cache in ON_DEMAND

    @property
    def can_serve(self) -> bool:
        """Not stopping, and the model is loaded, being loaded, or loads on demand.

        A worker whose load failed (``cache == "failed"``) and has no version cannot; an older
        worker (``cache == ""``) can once it has a version, as it always could."""
        if self.state not in SERVING_STATES:
            return False
        return self.version is not None or self.loads_on_demand or self.cache == "loading"

    def age_ms(self, now_ms: int | None = None) -> int:
        """Milliseconds since this heartbeat was written."""
        return (now_ms if now_ms is not None else now_in_ms()) - self.heartbeat_ms

    def is_live(self, ttl_s: float = DEFAULT_TTL_S, now_ms: int | None = None) -> bool:
        """Written less than ``ttl_s`` ago."""
        return self.age_ms(now_ms) < ttl_s * 1000


def _default(f: Field[Any]) -> object:
    """A field's default; ``""`` for ``worker_id``, which has none (a hash without it is dropped)."""
    return "" if f.default is MISSING else f.default


def _field_text(value: object) -> str | int | float:
    """A field as HSET takes it (redis-py refuses ``None`` and ``bool``)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else ""
    return cast("str | int | float", value)


def _decoded(value: bytes | str) -> str:
    # Not protocol.values.text: hostile bytes that are not UTF-8 must not raise.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _parse_text(value: str) -> str:
    return value[:MAX_TEXT_CHARS]


def _parse_int(value: str) -> int | None:
    """An integer that fits in 64 bits; None for empty or malformed."""
    number = _parse_number(value, int)
    return number if number is not None and -(2**63) <= number < 2**63 else None


def _parse_float(value: str) -> float | None:
    """A finite number (NaN would make ``status --json`` invalid JSON); None for malformed."""
    number = _parse_number(value, float)
    return number if number is not None and math.isfinite(number) else None


def _parse_number(value: str, kind: Callable[[str], T]) -> T | None:
    """``kind(value)`` for a short value; None for an empty, long or malformed one."""
    if not value or len(value) > MAX_NUMBER_CHARS:
        return None
    try:
        return kind(value)
    except ValueError:
        return None


def _parse_flag(value: str) -> bool:
    return value == "1"


# Field type (as annotated, a string under ``from __future__ import annotations``) → its parser;
# None from a parser means "take the field's default".
_PARSERS: dict[str, Callable[[str], object]] = {
    "str": _parse_text, "int": _parse_int, "int | None": _parse_int, "float": _parse_float,
    "bool": _parse_flag}


def now_in_ms() -> int:
    """Wall-clock milliseconds, the unit of ``heartbeat_ms`` and the zset scores."""
    return int(time.time() * 1000)


def refresh(client: redis.Redis, model: str, worker_id: str, ttl_s: float) -> int:
    """Renew a worker's heartbeat for one model (:func:`refresh_many`); the time written (ms)."""
    return refresh_many(client, [model], worker_id, ttl_s)


def refresh_many(client: redis.Redis, models: Iterable[str], worker_id: str, ttl_s: float) -> int:
    """Renew a worker's heartbeat for every model it serves, without rewriting the rest of each
    hash; one round trip per node; the time written (ms).

    What a worker sends from a side thread while a long model call runs: its loop, busy in
    the call, cannot send the whole heartbeat, and a live worker must not look dead. The
    pipeline is not a transaction (the models' keys lie in different slots on a cluster), but
    a node runs one connection's commands in order, and each model's hash is renewed before its
    member: a reader that sees the member finds the hash.
    """
    now_ms, ttl_ms = now_in_ms(), int(ttl_s * 1000)
    pipe = client.pipeline(transaction=False)
    for model in dict.fromkeys(models):
        key = keys.worker_hash(model, worker_id)
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
    return {_decoded(m) for m in _members(client, model, ttl_s)}


def live_ids_many(client: redis.Redis, models: Iterable[str],
                  ttl_s: float = DEFAULT_TTL_S) -> dict[str, set[str]]:
    """Model → ids of its workers heard from within ``ttl_s``, for every model (one pipelined round trip)."""
    names = list(dict.fromkeys(models))
    pipe = client.pipeline(transaction=False)
    for model in names:
        pipe.zrangebyscore(*members_query(model, ttl_s))
    replies = pipe.execute() if names else []
    return {model: {_decoded(m) for m in members} for model, members in zip(names, replies, strict=True)}


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
        pipe.hgetall(keys.worker_hash(model, _decoded(member)))
    return parse_live(pipe.execute(), ttl_s)
