"""Connections that open by the caller's deadline: the sync client's redis-py connection classes.

redis-py opens a connection (the TCP connect, then its handshake: ``HELLO``, ``CLIENT SETINFO``,
``AUTH``/``SELECT``) with the connection's own timeouts, 5 s each by default, whatever the call
that needs it. A server that accepts connections but never answers (stopped, wedged, a proxy in
front of a dead one) then held a 0.2 s call for 10 s: its state read and its send each opened a
connection. These classes bound the opening by the deadline of the trip the calling thread is
on (:data:`CONNECT_BY`, set around each trip); outside a trip they are redis-py's own.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import Any

import redis

CONNECT_BY: ContextVar[float | None] = ContextVar("streamserve_connect_by", default=None)
MIN_CONNECT_S = 0.001  # a zero socket timeout would make the socket non-blocking, not short


class _ByDeadline:
    """Opens (connect and handshake) by ``CONNECT_BY`` when a trip has set it."""

    _sock: Any
    socket_connect_timeout: float | None
    socket_timeout: float | None

    def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        deadline_s = CONNECT_BY.get()
        if deadline_s is None or self._sock is not None:
            super().connect_check_health(*args, **kwargs)  # type: ignore[misc]
            return
        saved = self.socket_connect_timeout, self.socket_timeout
        left_s = max(MIN_CONNECT_S, deadline_s - time.time())
        # None is "no timeout": the deadline is then the only bound.
        self.socket_connect_timeout = left_s if saved[0] is None else min(saved[0], left_s)
        self.socket_timeout = left_s if saved[1] is None else min(saved[1], left_s)
        try:
            super().connect_check_health(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.socket_connect_timeout, self.socket_timeout = saved
            if self._sock is not None:
                self._sock.settimeout(saved[1])  # later commands (health, outcomes) keep theirs


class TcpConnection(_ByDeadline, redis.Connection):
    """``redis://``: a TCP connection opened by the trip's deadline."""


class SslConnection(_ByDeadline, redis.SSLConnection):
    """``rediss://``: a TLS connection opened by the trip's deadline."""


class UnixConnection(_ByDeadline, redis.UnixDomainSocketConnection):
    """``unix://``: a Unix-socket connection opened by the trip's deadline."""


def connection_class(url: str) -> type[redis.Connection] | type[redis.UnixDomainSocketConnection]:
    """The class for ``url``'s scheme (cluster schemes included), as redis-py would pick it."""
    scheme = url.partition("://")[0].lower()
    if scheme == "unix":
        return UnixConnection
    return SslConnection if scheme.startswith("rediss") else TcpConnection
