"""Open a Redis client from a URL: one server, or a Redis Cluster.

``redis://`` and ``rediss://`` (TLS) name one server; ``redis+cluster://`` and
``rediss+cluster://`` name any node of a cluster, and the client discovers the
rest (redis-py's ``RedisCluster``). Everything streamserve sends touches one
slot per command or transaction (docs/protocol.md §1), so the same code runs on
both; only a client built here knows which it talks to.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import hiredis
import redis
import redis.asyncio as aioredis
from redis._parsers import hiredis as hiredis_parser
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterUnreachableError, SlotNotCoveredError
from redis.retry import Retry

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
# What a command can raise when Redis is out of reach or refuses it: a cluster client adds two
# errors that are not ``redis.RedisError`` (a slot no node serves; no node reachable at all).
REDIS_ERRORS: tuple[type[Exception], ...] = (
    redis.RedisError, SlotNotCoveredError, RedisClusterUnreachableError)
# A fail-fast cluster client (``connect(fail_fast_s=…)``): one quick retry, which absorbs a
# redirect or a stale pooled connection; a node that stays unreachable is the caller's to handle.
FAIL_FAST_RETRIES = 1
FAIL_FAST_BACKOFF_BASE_S, FAIL_FAST_BACKOFF_CAP_S = 0.01, 0.05
FAIL_FAST_CONNECT_S = 1.0  # a TCP connect takes milliseconds; a dead host never answers the SYN
# The slot map is re-read at most this often after errors (the library's default is 1 s): a
# replica promoted in a failover is found soon after.
FAIL_FAST_REFRESH_S = 0.25


def cluster_url(url: str) -> str | None:
    """The plain ``redis(s)://`` URL of a ``redis(s)+cluster://`` one; None for a one-server URL."""
    scheme, sep, rest = url.partition("://")
    plain = CLUSTER_SCHEMES.get(scheme.lower())
    if not sep or plain is None:
        return None
    # A cluster has no databases but 0; RedisCluster refuses a path, so drop "/0".
    address, _, _path = rest.partition("/")
    return f"{plain}://{address}"


def connect(url: str, *, fail_fast_s: float | None = None, **kwargs: Any) -> redis.Redis:
    """A client for ``url``; a ``RedisCluster`` for a ``+cluster`` scheme.

    Typed as ``redis.Redis``: ``RedisCluster`` offers the same command methods, and
    every caller sends only single-slot commands and transactions.

    ``fail_fast_s`` (cluster only; a one-server client is unchanged): a command to a node
    that is down fails within about that long instead of sitting in the library's retries
    (by default ten, backing off up to a second each: seconds per command while a master
    fails over). One quick retry is kept; connects give up after ``FAIL_FAST_CONNECT_S``
    and reads after ``fail_fast_s``, which must exceed the longest blocking read the caller
    sends; the slot map is re-read after errors up to every ``FAIL_FAST_REFRESH_S``. For a
    caller that serves several nodes and handles each one's failure itself.
    """
    plain = cluster_url(url)
    if plain is None:
        return redis.Redis.from_url(url, **kwargs)
    if fail_fast_s is not None:
        kwargs = {**fail_fast_options(fail_fast_s), **kwargs}
    return cast("redis.Redis", RedisCluster.from_url(plain, **kwargs))


def fail_fast_options(read_timeout_s: float) -> dict[str, Any]:
    """``RedisCluster`` options of a fail-fast client (:func:`connect`)."""
    return {"retry": Retry(ExponentialBackoff(cap=FAIL_FAST_BACKOFF_CAP_S, base=FAIL_FAST_BACKOFF_BASE_S),
                           FAIL_FAST_RETRIES),
            "socket_connect_timeout": min(FAIL_FAST_CONNECT_S, read_timeout_s),
            "socket_timeout": read_timeout_s, "topology_refresh_min_interval": FAIL_FAST_REFRESH_S}


def connect_async(url: str, **kwargs: Any) -> aioredis.Redis:
    """The asyncio counterpart of :func:`connect`."""
    plain = cluster_url(url)
    if plain is None:
        return aioredis.Redis.from_url(url, **kwargs)
    return cast("aioredis.Redis", AsyncRedisCluster.from_url(plain, **kwargs))


def is_cluster(client: object) -> bool:
    """True for a cluster client (sync or asyncio)."""
    return isinstance(client, RedisCluster | AsyncRedisCluster)


def slot(key: str) -> int:
    """The cluster hash slot of ``key`` (its hash tag, if it has one)."""
    return int(key_slot(key.encode()))


def pack(commands: Iterable[Sequence[Any]]) -> bytes:
    """Commands RESP-encoded into one buffer, by hiredis (C), for one send on a raw connection.

    redis-py's asyncio connection packs in pure Python (about 20 µs a command) and its sync one
    hands a large argument over as a separate chunk (a send of its own); this does neither.
    """
    return b"".join([hiredis.pack_command(tuple(command)) for command in commands])


# redis-py's hiredis parser and the value its reader gives for "not in yet" (private names, so looked
# up: where either is missing, :func:`buffered_reader` offers nothing and redis-py reads everything).
_PARSER: type | None = getattr(hiredis_parser, "_HiredisParser", None)
NOT_IN: object = getattr(hiredis_parser, "NOT_ENOUGH_DATA", None)
# Its asyncio counterpart: the asyncio client reads its reader directly where it has one.
ASYNC_PARSER: type | None = getattr(hiredis_parser, "_AsyncHiredisParser", None)


def buffered_reader(conn: Any) -> Callable[[], Any] | None:
    """The undecoded ``gets`` of ``conn``'s hiredis reader, when reading it directly is safe: it
    returns the next answer already received (an error answer as an exception value), or
    :data:`NOT_IN`. redis-py's wrapper around each read (a socket timeout set and restored, its
    checks) costs more than the parse when answers arrive together. On RESP3 (redis-py's
    default) a push that comes between answers goes to the parser's push handler, as redis-py's
    own read does. None without redis-py's hiredis parser, or on RESP3 where the reader cannot
    tell a push from an answer (hiredis before 3.2)."""
    parser = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    if reader is None or _PARSER is None or NOT_IN is None or type(parser) is not _PARSER:
        return None
    if str(getattr(conn, "protocol", 2)) == "2":
        return functools.partial(reader.gets, False)
    push = getattr(parser, "_hiredis_PushNotificationType", None)
    if push is None or not hasattr(parser, "handle_push_response"):
        return None

    def take() -> Any:
        while isinstance(answer := reader.gets(False), push):
            parser.handle_push_response(answer)
        return answer
    return take
