"""Answers that prove nothing was queued (LOADING while Redis loads its data, BUSY while a script
runs) make the client send the request again within its deadline, not wait for a reply that
cannot come (docs/protocol.md §4)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import redis
from conftest import MODEL, wait_until
from test_client_reliability import answer, assert_answered, entries

from lab.embedded_redis import EmbeddedRedis

X = np.random.default_rng(4).standard_normal((60, 110)).astype(np.float32)


@pytest.fixture
def own_server() -> Iterator[EmbeddedRedis]:
    """A server of this test's own: it is made to load or run a script, which stalls every client."""
    with EmbeddedRedis(extra_args=("--enable-debug-command", "yes")) as server:
        yield server


def xadd_calls(r: redis.Redis) -> dict[str, int]:
    stats = r.info("commandstats").get("cmdstat_xadd", {})
    return {"calls": int(stats.get("calls", 0)), "rejected": int(stats.get("rejected_calls", 0))}


def refused(client: redis.Redis, error: type[Exception]) -> bool:
    try:
        client.ping()
    except error:
        return True
    return False


# Waits: the server's start 10 s and stop 5 s, the load's start 10 s and end 20 + 20 s, 5 s, the call 20 s.
@pytest.mark.timeout(120)
def test_a_request_refused_while_redis_loads_is_sent_again_when_it_has_loaded(own_server, call):
    r = redis.Redis.from_url(own_server.url)
    # About 0.3 s to load on a quiet box, long enough for the probe to see LOADING, and short enough
    # to end within the call's 15 s on a busy one (1.5 M keys took over 20 s beside `make bench`).
    r.execute_command("DEBUG", "POPULATE", 400_000, "filler", 64)

    def reload() -> None:
        with contextlib.suppress(redis.RedisError):  # 7.0 may close the reloading connection
            redis.Redis.from_url(own_server.url).execute_command("DEBUG", "RELOAD")

    loader = threading.Thread(target=reload, daemon=True)
    loader.start()
    probe = redis.Redis.from_url(own_server.url)
    wait_until(lambda: refused(probe, redis.exceptions.BusyLoadingError), 10, interval_s=0.002)
    future = call(own_server.url, "predict", MODEL, X, timeout_s=15.0)
    loader.join(20)
    wait_until(lambda: not refused(probe, redis.exceptions.BusyLoadingError), 20, interval_s=0.01)
    entry = entries(r, 1)[0]
    answer(r, entry)
    assert_answered(future.result(timeout=20), entry)
    stats = xadd_calls(r)
    assert r.xlen(f"ss:{{{MODEL}}}:requests") == 1 and stats["calls"] == 1, "queued exactly once"


# Waits: the server's start 10 s and stop 5 s, 5 s, 0.3 s, 5 + 5 s, the call 15 s.
@pytest.mark.timeout(60)
def test_a_request_refused_while_a_script_runs_is_sent_again_after_it(own_server, call):
    r = redis.Redis.from_url(own_server.url)
    r.config_set("busy-reply-threshold", 20)  # BUSY after 20 ms of script (lua-time-limit)

    def script() -> None:
        with contextlib.suppress(redis.RedisError):  # killed by the test
            redis.Redis.from_url(own_server.url).eval("while true do end", 0)

    threading.Thread(target=script, daemon=True).start()
    probe = redis.Redis.from_url(own_server.url)
    wait_until(lambda: refused(probe, redis.ResponseError), 5)
    future = call(own_server.url, "predict", MODEL, X, timeout_s=10.0)
    # The server stays busy while the call's first tries meet BUSY (a sleep: a busy server answers
    # nothing but SCRIPT KILL, so there is no state to poll).
    time.sleep(0.3)
    wait_until(lambda: _killed(probe), 5)
    entry = entries(r, 1)[0]
    answer(r, entry)
    assert_answered(future.result(timeout=15), entry)
    stats = xadd_calls(r)
    assert stats["rejected"] >= 1, "the call did meet BUSY"
    assert r.xlen(f"ss:{{{MODEL}}}:requests") == 1 and stats["calls"] == 1, "queued exactly once"


def _killed(probe: redis.Redis) -> bool:
    with contextlib.suppress(redis.ResponseError):  # NOTBUSY once it is gone
        probe.script_kill()
    return not refused(probe, redis.ResponseError)
