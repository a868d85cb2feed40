"""The worker's raw reply transaction (worker/transaction.py) on a real server."""

from __future__ import annotations

import pytest
import redis

from worker.transaction import RawTransaction


def test_commands_run_atomically_and_answers_come_back_undecoded(r):
    r.xgroup_create("s", "g", id="0", mkstream=True)
    r.xadd("s", {"f": "v"})
    tx = RawTransaction(r)
    tx.lpush("l", b"a", b"b")
    tx.pexpire("l", 60_000)
    tx.xadd("d", {b"k": b"v"}, maxlen=10)
    tx.incrby("n", 3)
    tx.xreadgroup("g", "c", {"s": ">"}, count=5)
    lpushed, expired, dead_id, n, read = tx.execute()
    assert (lpushed, expired, n) == (2, 1, 3) and isinstance(dead_id, bytes)
    streams = read if isinstance(read, dict) else dict(read)  # a map under RESP3, pairs under RESP2
    assert streams[b"s"][0][1] == [b"f", b"v"]
    assert r.lrange("l", 0, -1) == [b"b", b"a"] and 0 < r.pttl("l") <= 60_000


def test_a_command_refused_when_queued_aborts_everything_and_says_why(r):
    tx = RawTransaction(r)
    tx.lpush("l", b"a")
    tx.execute_command("INCRBY", "n")  # wrong number of arguments: refused at queue time
    with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
        tx.execute()
    assert not r.exists("l"), "nothing of an aborted transaction ran"
    assert RawTransaction(r).execute() == [], "the connection is still usable"


def test_a_command_failing_inside_exec_is_an_answer_or_raised_on_request(r):
    r.set("str", "x")
    tx = RawTransaction(r)
    tx.lpush("str", b"a")  # WRONGTYPE at run time: the others still run
    tx.incrby("n", 1)
    wrong, n = tx.execute()
    assert isinstance(wrong, redis.ResponseError) and n == 1
    tx = RawTransaction(r)
    tx.lpush("str", b"a")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        tx.execute(raise_on_error=True)
