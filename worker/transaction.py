"""The reply transaction without redis-py's pipeline machinery: commands packed once, answers raw.

A worker sends one ``MULTI … EXEC`` per batch. redis-py's transaction pipeline
builds a command object per call, applies a response callback to every answer and
checks ``QUEUED`` one by one; on the hot path that is Python work per request
for nothing we use. :class:`RawTransaction` takes the same calls the worker makes on
a pipeline (``lpush``, ``pexpire``, ``xadd``, ``hincrby``, ``incrby``, ``xack``,
``xdel``, ``xreadgroup``, ``execute_command``), packs them in one buffer
(``protocol.connection.pack``), sends it in one write on one pooled connection and
returns ``EXEC``'s answers undecoded (errors inside it as exception values, as a
pipeline's ``execute(raise_on_error=False)`` does).

Single-node clients only: a cluster client keeps redis-py's pipeline, which finds
the slot's node.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import chain
from typing import Any

import redis

from protocol import connection

Command = tuple[Any, ...]


class RawTransaction:
    """Collects commands for one ``MULTI/EXEC`` on ``client``'s connection pool."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.commands: list[Command] = []

    def lpush(self, key: str, *values: bytes) -> None:
        """Queue ``LPUSH``."""
        self.commands.append(("LPUSH", key, *values))

    def pexpire(self, key: str, ms: int) -> None:
        """Queue ``PEXPIRE``."""
        self.commands.append(("PEXPIRE", key, ms))

    def xadd(self, stream: str, fields: Mapping[Any, Any], maxlen: int | None = None,
             approximate: bool = True) -> None:
        """Queue ``XADD`` (capped with ``MAXLEN [~] n`` when ``maxlen`` is given)."""
        cap = ("MAXLEN", "~" if approximate else "=", maxlen) if maxlen is not None else ()
        self.commands.append(("XADD", stream, *cap, "*", *chain.from_iterable(fields.items())))

    def hincrby(self, key: str, field: str, amount: int = 1) -> None:
        """Queue ``HINCRBY``."""
        self.commands.append(("HINCRBY", key, field, amount))

    def incrby(self, key: str, amount: int = 1) -> None:
        """Queue ``INCRBY``."""
        self.commands.append(("INCRBY", key, amount))

    def xack(self, stream: str, group: str, *ids: str) -> None:
        """Queue ``XACK``."""
        self.commands.append(("XACK", stream, group, *ids))

    def xdel(self, stream: str, *ids: str) -> None:
        """Queue ``XDEL``."""
        self.commands.append(("XDEL", stream, *ids))

    def xreadgroup(self, group: str, consumer: str, streams: Mapping[str, str], count: int) -> None:
        """Queue a non-blocking ``XREADGROUP`` (inside ``MULTI`` a read never blocks)."""
        self.commands.append(("XREADGROUP", "GROUP", group, consumer, "COUNT", count, "STREAMS",
                              *streams, *streams.values()))

    def execute_command(self, *args: Any) -> None:
        """Queue any command."""
        self.commands.append(args)

    def execute(self, raise_on_error: bool = False) -> list[Any]:
        """Send ``MULTI``, the commands and ``EXEC`` in one write; ``EXEC``'s answers, undecoded.

        A command refused when queued (out of memory, a wrong argument count) aborts the
        whole transaction: that raises, with nothing applied, as a pipeline does. A
        connection that fails mid-way is closed, never reused (its answers may be in flight).
        """
        pool = self.client.connection_pool
        conn: Any = pool.get_connection()  # Any: redis-py leaves the low-level methods untyped
        try:
            conn.send_packed_command([connection.pack([("MULTI",), *self.commands, ("EXEC",)])])
            queued = [_answer(conn) for _ in range(len(self.commands) + 2)]  # the last: EXEC's
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        *queued, answers = queued
        refused = next((q for q in queued if isinstance(q, redis.ResponseError)), None)
        if refused is not None:  # EXEC answered EXECABORT: nothing ran; say why
            raise refused
        if isinstance(answers, redis.ResponseError):
            raise answers
        if answers is None:
            raise redis.ResponseError("EXEC answered nil: the transaction did not run")
        if raise_on_error:
            _raise_first(answers)
        return list(answers)


def _answer(conn: Any) -> Any:
    """One answer, undecoded; an error answer is returned, so every answer of the write is read."""
    try:
        return conn.read_response(disable_decoding=True)
    except redis.ResponseError as e:
        return e


def _raise_first(answers: list[Any]) -> None:
    for answer in answers:
        if isinstance(answer, redis.RedisError):
            raise answer
