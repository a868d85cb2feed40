"""The reply transaction without redis-py's pipeline machinery: commands packed once, answers raw.

A worker sends one ``MULTI … EXEC`` per batch. redis-py's transaction pipeline
builds a command object per call, applies a response callback to every answer and
checks ``QUEUED`` one by one; on the hot path that is Python work per request
for nothing we use. :class:`RawTransaction` takes the same calls the worker makes on
a pipeline (``lpush``, ``pexpire``, ``set``, ``xadd``, ``hincrby``, ``incrby``, ``xack``,
``xdel``, ``xreadgroup``, ``execute_command``), packs them in one buffer
(``protocol.connection.pack``), sends it in one write on one pooled connection and
returns ``EXEC``'s answers undecoded (errors inside it as exception values, as a
pipeline's ``execute(raise_on_error=False)`` does).

Single-node clients only: a cluster client keeps redis-py's pipeline, which finds
the slot's node.
"""

from __future__ import annotations

from collections import deque
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

    def set(self, key: str, value: bytes, px: int | None = None) -> None:
        """Queue ``SET`` (expiring after ``px`` milliseconds when given)."""
        self.commands.append(("SET", key, value, *(("PX", px) if px is not None else ())))

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
        self.commands.append(xreadgroup_command(group, consumer, streams, count))

    def execute_command(self, *args: Any) -> None:
        """Queue any command."""
        self.commands.append(args)

    def wrapped(self) -> list[Command]:
        """``MULTI``, the commands, ``EXEC``: what one write sends."""
        return [("MULTI",), *self.commands, ("EXEC",)]

    def execute(self, raise_on_error: bool = False) -> list[Any]:
        """Send ``MULTI``, the commands and ``EXEC`` in one write; ``EXEC``'s answers, undecoded.

        A command refused when queued (out of memory, a wrong argument count) aborts the
        whole transaction: that raises, with nothing applied, as a pipeline does. A
        connection that fails mid-way is closed, never reused (its answers may be in flight).
        """
        pool = self.client.connection_pool
        conn: Any = pool.get_connection()  # Any: redis-py leaves the low-level methods untyped
        try:
            conn.send_packed_command([connection.pack(self.wrapped())])
            queued = _answers(conn, len(self.commands) + 2)  # the last: EXEC's
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        return exec_answers(queued, raise_on_error=raise_on_error)


def xreadgroup_command(group: str, consumer: str, streams: Mapping[str, str], count: int,
                       block_ms: int | None = None) -> Command:
    """``XREADGROUP`` of up to ``count`` entries per stream, blocking up to ``block_ms`` if given."""
    block = ("BLOCK", block_ms) if block_ms is not None else ()
    return ("XREADGROUP", "GROUP", group, consumer, "COUNT", count, *block, "STREAMS",
            *streams, *streams.values())


def exec_answers(queued: list[Any], *, raise_on_error: bool = False) -> list[Any]:
    """``EXEC``'s answers from the answers to ``MULTI … EXEC``; raises if the transaction did not run."""
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


def _answers(conn: Any, n: int) -> list[Any]:
    """``n`` answers, undecoded, errors as values. The first is read through redis-py (it waits for
    the socket, and closes the connection on a failure); by then the others have usually arrived
    with it, and are taken from its parser's buffer directly: redis-py's wrapper around each read
    costs more than the parse (a batch's transaction has 7 answers). What is not in yet, or a
    connection not on RESP2 with hiredis, goes through redis-py."""
    answers = [_answer(conn)]
    take = connection.buffered_reader(conn) if n > 1 else None
    while len(answers) < n:
        answer = take() if take is not None else connection.NOT_IN
        if answer is connection.NOT_IN:
            answers.append(_answer(conn))
            continue
        # As redis-py's parser: an answer that is a connection error (LOADING) is raised.
        if isinstance(answer, redis.ConnectionError):
            raise answer
        if isinstance(answer, list) and answer and isinstance(answer[0], redis.ConnectionError):
            raise answer[0]
        answers.append(answer)
    return answers


def _raise_first(answers: list[Any]) -> None:
    for answer in answers:
        if isinstance(answer, redis.RedisError):
            raise answer


class Link:
    """One connection kept for pipelined writes: a write is sent now, its answers read later, in order.

    What lets a worker overlap Redis with its model call: the next batch's read and the
    last batch's reply transaction travel while the model runs, and their answers are
    read once it is done (they have arrived by then). Each :meth:`send` carries a tag
    the caller gets back with the answers. A failure closes the connection (answers of
    what was sent may be in flight) and hands back the tags of everything unanswered.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.conn: Any = None
        self.unanswered: deque[tuple[int, object]] = deque()  # (answers expected, tag) in send order

    def send(self, commands: list[Command], tag: object) -> None:
        """Write ``commands`` in one send; their answers are expected after those already unanswered."""
        if self.conn is None:
            self.conn = self.client.connection_pool.get_connection()
        self.unanswered.append((len(commands), tag))
        self.conn.send_packed_command([connection.pack(commands)])

    def take(self) -> tuple[object, list[Any]]:
        """The oldest send's tag and its answers, undecoded (waits for them if they are not in yet)."""
        n, tag = self.unanswered[0]
        answers = _answers(self.conn, n)
        self.unanswered.popleft()
        return tag, answers

    def reset(self) -> list[object]:
        """Close the connection; the tags of every send whose answers were not read."""
        tags = [tag for _, tag in self.unanswered]
        self.unanswered.clear()
        if self.conn is not None:
            self.conn.disconnect()
            self.release()
        return tags

    def release(self) -> None:
        """Give the connection back to the pool once nothing is unanswered (idle, stopping)."""
        if self.conn is not None and not self.unanswered:
            self.client.connection_pool.release(self.conn)
            self.conn = None
