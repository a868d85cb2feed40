"""Streams bounded by deadlines: every XADD carries ``MINID ~`` at the server's clock (learned from
the client's own XADD answers) minus ``max_timeout_s``, so a stream nobody reads stays small."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from conftest import MODEL

from producer import AsyncClient, Client, DeadlineExceeded, InvalidInput, _core
from protocol import keys

X = np.random.default_rng(3).standard_normal((4, 3)).astype(np.float32)
STREAM = keys.request_stream(MODEL)


def _age_span_ms(r) -> int:
    first, last = r.xrange(STREAM, count=1)[0][0], r.xrevrange(STREAM, count=1)[0][0]
    return _core.entry_ms(last) - _core.entry_ms(first)


@pytest.mark.timeout(60)
def test_a_stream_without_readers_keeps_only_the_last_max_timeout(r, redis_server):
    started = time.monotonic()
    with Client.from_url(redis_server.url, fail_fast=False, max_timeout_s=1.0) as client:
        for _ in range(300):
            with pytest.raises(DeadlineExceeded):
                client.predict(MODEL, X, timeout_s=0.01)
    assert time.monotonic() - started > 2.0, "spread over more than max_timeout_s"
    # Trimming is approximate (whole macro nodes of 100 entries): at most one node older than 1 s.
    assert r.xlen(STREAM) < 300 - 50, f"{r.xlen(STREAM)} entries left of 300"
    assert _age_span_ms(r) < 1000 + 1500, "what is left is about the last second's"


def test_the_asyncio_client_trims_too(r, redis_server):
    async def scenario() -> None:
        async with AsyncClient.from_url(redis_server.url, fail_fast=False, timeout_s=0.2,
                                          max_timeout_s=0.2) as client:
            for _ in range(150):
                await client.predict_many(MODEL, [X[0], X[1]], timeout_s=0.005, return_exceptions=True)
    asyncio.run(scenario())
    assert r.xlen(STREAM) < 300 - 50


def test_no_minid_until_the_servers_clock_is_known_then_its_now_minus_the_horizon():
    clock = _core.ServerClock()

    def xadd() -> tuple[object, ...]:
        pending = _core.prepare(_core.Target("m"), X, route="", timeout_s=1.0, sample_ndim=None)
        return _core.Exchange([pending], 1.0, clock=clock, horizon_s=60.0).trip().commands[0]

    assert xadd()[:3] == ("XADD", "ss:{m}:requests", "*"), "never trim on a guess"
    server_ms = int(time.time() * 1000) - 3_600_000  # a server clock an hour behind the client's
    ex = _core.Exchange([], 1.0, clock=clock, horizon_s=60.0)
    ex.stream = "ss:{m}:requests"
    ex.sent([f"{server_ms}-0".encode()])
    command = xadd()
    assert command[2:4] == ("MINID", "~") and command[5] == "*"
    assert server_ms - 60_000 <= int(command[4]) <= server_ms - 60_000 + 1_000, "the server's clock"


@pytest.mark.parametrize("timeout_s", [61.0, -1.0])
def test_a_timeout_over_max_timeout_s_is_refused_locally(redis_server, timeout_s):
    with Client.from_url(redis_server.url) as client, pytest.raises(InvalidInput, match="max_timeout_s"):
        client.predict(MODEL, X, timeout_s=timeout_s)
