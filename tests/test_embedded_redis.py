"""The throwaway server the tests, the demo and the bench start: its ports are its own."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from lab import embedded_redis
from lab.embedded_redis import EmbeddedRedis, free_port
from protocol.errors import ConfigError


@contextmanager
def held(port: int) -> Iterator[None]:
    """Another process's listener on ``port`` (here: a socket of ours)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        yield


def test_free_ports_are_not_handed_out_twice_and_lie_below_the_ephemeral_range():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(p < low for p in ports)


def test_a_picked_port_taken_before_the_server_binds_it_is_picked_again(monkeypatch):
    taken, spare = free_port(), free_port()
    server = EmbeddedRedis()
    server.port = taken  # as if another process bound it between the pick and the start
    monkeypatch.setattr(embedded_redis, "free_port", lambda: spare)
    with held(taken):
        server.start()
    try:
        assert server.port == spare
        assert redis.Redis(port=spare).ping()
    finally:
        server.stop()


def test_a_given_port_taken_is_a_config_error_saying_why():
    port = free_port()
    with held(port), pytest.raises(ConfigError, match="Address already in use"):
        EmbeddedRedis(port).start()
