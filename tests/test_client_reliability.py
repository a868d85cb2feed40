"""The client keeps its word against a real Redis: timeouts, stray replies, lost connections, OOM.

A fake worker (the test itself) answers the entries the way worker/consumer.py does
(LPUSH + PEXPIRE on the entry's reply key), so each test controls when and what
arrives. Every scenario runs with the sync and the asyncio client.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import redis
from conftest import MODEL, wait_until

from producer import Client, DeadlineExceeded, InvalidInput, Overloaded, Unavailable
from protocol import keys, messages

X = np.random.default_rng(2).standard_normal((60, 110)).astype(np.float32)
PROBS = np.array([[0.1, 0.2, 0.7]], np.float32)
STREAM = keys.request_stream(MODEL)


# ---- a fake worker ------------------------------------------------------------------------


def entries(r: redis.Redis, n: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The first ``n`` request entries, once the client has sent them."""
    return wait_until(lambda: (rows := r.xrange(STREAM)) and len(rows) >= n and rows[:n], 5,
                      message=f"{n} requests were not sent")


def request_of(entry: tuple[bytes, dict[bytes, bytes]]) -> messages.Request:
    return messages.decode_request(entry[0].decode(), entry[1], max_bytes=1 << 24)


def answer(r: redis.Redis, entry: tuple[bytes, dict[bytes, bytes]], *, as_id: str | None = None) -> None:
    """Reply like a worker; ``as_id`` pushes a reply carrying another request's id (a stray)."""
    request = request_of(entry)
    if as_id is not None:
        request = dataclasses.replace(request, request_id=as_id)
    payload = messages.encode_ok(request, model=MODEL, version=7, outputs={"probs": PROBS},
                                 labels=["down", "flat", "up"], timings={"queue_ms": 0.5, "infer_ms": 0.5},
                                 worker="fake")
    key = keys.reply_key(MODEL, request.reply_to)
    r.lpush(key, payload)
    r.pexpire(key, 60_000)


def blocked_client(r: redis.Redis) -> dict[str, Any] | None:
    """The client blocked in a wait (CLIENT LIST flag ``b``), if any."""
    return next((c for c in r.client_list() if "b" in c["flags"]), None)


def blocked_for_s(r: redis.Redis) -> int:
    """How long (whole seconds, the server's clock) a client has been blocked; 0 if none is."""
    client = blocked_client(r)
    return int(client["idle"]) if client else 0


# ---- both clients, run in a thread while the test plays the worker ------------------------


def assert_answered(p: messages.Prediction, entry: tuple[bytes, dict[bytes, bytes]]) -> None:
    assert p.request_id == request_of(entry).request_id
    np.testing.assert_array_equal(p.outputs["probs"], PROBS[0])  # one sample: no batch axis
    assert p.label == "up" and p.worker == "fake"


# ---- 1. timeout_s of any size --------------------------------------------------------------


def test_timeout_longer_than_the_socket_timeout_is_honoured(r, redis_server, call):
    future = call(redis_server.url, "predict", MODEL, X, timeout_s=10.0,
                  client_kwargs={"socket_timeout": 0.2})
    entry = entries(r, 1)[0]
    # Blocked for ≥ 1 s by the server's clock: five times the socket timeout.
    wait_until(lambda: blocked_for_s(r) >= 1, 5, message="the client stopped waiting")
    answer(r, entry)
    assert_answered(future.result(timeout=15), entry)
    assert r.xlen(STREAM) == 1, "the request was sent once"


# ---- 2. a reply whose id is not ours is dropped --------------------------------------------


def test_a_stray_reply_is_dropped_and_the_callers_own_is_returned(r, redis_server, call):
    future = call(redis_server.url, "predict", MODEL, X)
    entry = entries(r, 1)[0]
    answer(r, entry, as_id="someone-else")  # first in, so the oldest in the list
    answer(r, entry)
    assert_answered(future.result(timeout=15), entry)


def test_a_caller_supplied_id_never_reads_an_old_reply_under_that_id(r, redis_server, call):
    old = keys.reply_key(MODEL, "order-42")
    r.lpush(old, messages.encode_error("order-42", Overloaded("an earlier call's late reply"),
                                       model=MODEL, version=1))
    future = call(redis_server.url, "predict", MODEL, X, request_id="order-42")
    entry = entries(r, 1)[0]
    assert request_of(entry).reply_to != "order-42", "a reply key of its own"
    answer(r, entry)
    p = future.result(timeout=15)
    assert p.request_id == "order-42" and p.label == "up"


def test_an_empty_request_id_is_rejected_not_replaced(redis_server):
    with Client.from_url(redis_server.url) as client, pytest.raises(InvalidInput, match="invalid request id"):
        client.predict(MODEL, X, request_id="")


# ---- 3. a reply survives a connection drop -------------------------------------------------


class DroppingProxy:
    """A TCP proxy to Redis that can cut a connection right after Redis answered, before the
    answer reaches the client: the moment a destructive pop (BLPOP) would lose a reply."""

    def __init__(self, port: int) -> None:
        self.upstream = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        self.marker = b""  # drop the first answer that contains this, once
        self.dropped = 0
        self.mute = False  # swallow every answer from now on, connections left open (a hung server)
        self.sockets: list[socket.socket] = []
        self.closed, self.lock = False, threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self.upstream)
            with self.lock:  # a connection accepted while close() ran must not outlive it
                if self.closed:
                    _cut(client, server)
                    return
                self.sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if answers and self.mute:
                    continue
                if answers and self.marker and self.marker in data:
                    self.marker, self.dropped = b"", self.dropped + 1
                    break
                sink.sendall(data)
        except OSError:
            pass
        _cut(source, sink)

    def close(self) -> None:
        """Redis goes away: open connections are cut and new ones refused."""
        with self.lock:
            self.closed = True
            _cut(self.listener, *self.sockets)


def _cut(*sockets: socket.socket) -> None:
    """Close with a FIN; shutdown also wakes a thread blocked in recv on the socket."""
    for s in sockets:
        with contextlib.suppress(OSError):  # already closed
            s.shutdown(socket.SHUT_RDWR)
        s.close()


@pytest.fixture
def proxy(redis_server) -> Iterator[DroppingProxy]:
    p = DroppingProxy(redis_server.port)
    yield p
    p.close()


def test_a_reply_lost_in_flight_is_read_again(r, proxy, call):
    future = call(proxy.url, "predict", MODEL, X)
    entry = entries(r, 1)[0]
    wait_until(lambda: blocked_client(r), 5)
    proxy.marker = request_of(entry).request_id.encode()
    answer(r, entry)
    assert_answered(future.result(timeout=15), entry)
    assert proxy.dropped == 1, "the answer carrying the reply was cut off"
    assert r.xlen(STREAM) == 1, "the request was not sent again"


def test_predict_many_survives_a_reply_lost_in_flight(r, proxy, call):
    future = call(proxy.url, "predict_many", MODEL, [X, X * 2, X * 3])
    sent = entries(r, 3)
    wait_until(lambda: blocked_client(r), 5)
    proxy.marker = request_of(sent[1]).request_id.encode()
    answer(r, sent[0], as_id="someone-else")  # a stray in the shared list is dropped too
    for entry in sent:
        answer(r, entry)
    results = future.result(timeout=15)
    assert [p.request_id for p in results] == [request_of(e).request_id for e in sent]
    assert proxy.dropped == 1 and r.xlen(STREAM) == 3


@pytest.mark.timeout(60)  # waits: 5 + 5 + 5 s, the call 15 s
@pytest.mark.parametrize("method, n", [("predict", 1), ("predict_many", 4)])
def test_a_killed_connection_is_reopened_without_resending(r, redis_server, call, method, n):
    args = (X,) if method == "predict" else ([X] * n,)
    future = call(redis_server.url, method, MODEL, *args)
    sent = entries(r, n)
    victim = wait_until(lambda: blocked_client(r), 5)
    r.client_kill_filter(_id=victim["id"])
    wait_until(lambda: (c := blocked_client(r)) and c["id"] != victim["id"], 5,
               message="the client did not wait again on a new connection")
    for entry in sent:
        answer(r, entry)
    result = future.result(timeout=15)
    got = [result] if method == "predict" else result
    assert [p.request_id for p in got] == [request_of(e).request_id for e in sent]
    assert r.xlen(STREAM) == n, "no request was sent twice"


def test_redis_gone_past_the_deadline_raises_unavailable(r, proxy, call):
    future = call(proxy.url, "predict", MODEL, X, timeout_s=1.0)
    wait_until(lambda: blocked_client(r), 5)
    proxy.close()
    with pytest.raises(Unavailable, match="lost the connection"):
        future.result(timeout=15)


@pytest.mark.timeout(60)  # waits: 5 + 5 s, the call 25 s
def test_a_server_that_stops_answering_ends_the_call_at_its_deadline(r, proxy, call):
    """The wait's answer never comes and the connection stays open: the read's timeout (the
    call's deadline, no margin) ends it, as DEADLINE_EXCEEDED, instead of hanging."""
    future = call(proxy.url, "predict", MODEL, X, timeout_s=1.0)
    entry = entries(r, 1)[0]
    wait_until(lambda: blocked_client(r), 5)
    proxy.mute = True
    answer(r, entry)  # answered in Redis, never delivered
    # close() then opens a connection through the mute proxy, which ends by its own 0.5 s bound
    with pytest.raises(DeadlineExceeded, match="no reply within 1.000 s"):
        future.result(timeout=25)


# ---- 4. OOM and refusal: typed errors, at once ---------------------------------------------


def test_redis_out_of_memory_raises_overloaded_at_once(r, redis_server, call):
    before = r.config_get("maxmemory")["maxmemory"]
    r.config_set("maxmemory", 1)
    try:
        started = time.monotonic()
        future = call(redis_server.url, "predict", MODEL, X, timeout_s=10.0)
        with pytest.raises(Overloaded, match="out of memory"):
            future.result(timeout=15)
        assert time.monotonic() - started < 5, "not after the timeout"
    finally:
        r.config_set("maxmemory", before)
    assert r.xlen(STREAM) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("method", ["predict", "predict_many"])
def test_connection_refused_raises_unavailable_at_once(call, method):
    args = (X,) if method == "predict" else ([X, X],)
    started = time.monotonic()
    future = call(f"redis://127.0.0.1:{free_port()}/0", method, MODEL, *args, timeout_s=10.0)
    with pytest.raises(Unavailable, match="cannot be reached"):
        future.result(timeout=15)
    assert time.monotonic() - started < 5, "not after the timeout"


# ---- reply keys are deleted, not left to expire --------------------------------------------


@pytest.mark.timeout(60)  # waits: 5 s, a call 15 s, 5 + 5 s, a call 15 s
def test_reply_keys_are_deleted_by_the_next_call_and_at_close(r, redis_server):
    def key_of(entry: tuple[bytes, dict[bytes, bytes]]) -> str:
        return keys.reply_key(MODEL, request_of(entry).reply_to)

    with ThreadPoolExecutor(1) as pool, \
            Client.from_url(redis_server.url, timeout_s=10.0, fail_fast=False) as client:
        first = pool.submit(client.predict, MODEL, X)
        answer(r, entries(r, 1)[0])
        first.result(timeout=15)
        first_key = key_of(entries(r, 1)[0])
        assert r.exists(first_key), "kept until the next call: no extra round trip"
        second = pool.submit(client.predict, MODEL, X)
        entry = entries(r, 2)[1]
        assert not r.exists(first_key), "deleted in the same round trip as the next XADD"
        answer(r, entry)
        second.result(timeout=15)
    assert not r.keys(keys.reply_key_pattern(MODEL)), "close() deletes the rest"


@pytest.mark.timeout(60)  # waits: 5 s, a call 15 s, then a call 15 s or 5 + 5 s and a call 15 s
@pytest.mark.parametrize("gone", ["proxy closed", "connection killed"])
def test_a_threads_kept_connection_gone_between_calls_is_replaced_before_sending(r, proxy, gone):
    """A thread keeps its connection between calls; one the server closed meanwhile (a restart, an
    idle timeout) is replaced before the next request is sent, never found dead after it."""
    with Client.from_url(proxy.url, timeout_s=10.0, fail_fast=False) as client, \
            ThreadPoolExecutor(1) as thread:
        first = thread.submit(client.predict, MODEL, X)
        answer(r, entries(r, 1)[0])
        first.result(timeout=15)
        started = time.monotonic()
        if gone == "proxy closed":
            proxy.close()
            with pytest.raises(Unavailable, match="cannot be reached"):
                thread.submit(client.predict, MODEL, X).result(timeout=15)
            assert time.monotonic() - started < 5, "not after the timeout"
            return
        for c in r.client_list():
            if c["cmd"] in ("blmove", "lrange", "xadd", "unlink"):  # the client's, idle after its call
                r.client_kill_filter(_id=c["id"])
        # The proxy passes the close on from its own thread: until then the client cannot see it.
        wait_until(lambda: all(sock.fileno() == -1 for sock in proxy.sockets), 5)
        second = thread.submit(client.predict, MODEL, X)
        entry = entries(r, 2)[1]
        answer(r, entry)
        assert_answered(second.result(timeout=15), entry)
        assert time.monotonic() - started < 5 and r.xlen(STREAM) == 2, "sent once, on a new connection"
