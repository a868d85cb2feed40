"""Open a Redis client from a URL: one server, or a Redis Cluster.

``redis://`` and ``rediss://`` (TLS) name one server; ``redis+cluster://`` and
``rediss+cluster://`` name any node of a cluster, and the client discovers the
rest (redis-py's ``RedisCluster``). Everything streamserve sends touches one
slot per command or transaction (docs/protocol.md §1), so the same code runs on
both; only a client built here knows which it talks to.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import hiredis
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.crc import key_slot

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def cluster_url(url: str) -> str | None:
    """The plain ``redis(s)://`` URL of a ``redis(s)+cluster://`` one; None for a one-server URL."""
    scheme, sep, rest = url.partition("://")
    plain = CLUSTER_SCHEMES.get(scheme.lower())
    if not sep or plain is None:
        return None
    # A cluster has no databases but 0; RedisCluster refuses a path, so drop "/0".
    address, _, _path = rest.partition("/")
    return f"{plain}://{address}"


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """A client for ``url``; a ``RedisCluster`` for a ``+cluster`` scheme.

    Typed as ``redis.Redis``: ``RedisCluster`` offers the same command methods, and
    every caller sends only single-slot commands and transactions.
    """
    plain = cluster_url(url)
    if plain is None:
        return redis.Redis.from_url(url, **kwargs)
    return cast("redis.Redis", RedisCluster.from_url(plain, **kwargs))


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

