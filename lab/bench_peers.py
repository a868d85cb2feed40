"""``streamserve bench-peers``: streamserve, FastAPI (raw body), Celery and the reference loop side by
side, in one run.

Every system serves the same ONNX file on the same machine, from ``processes``
server processes (one per core), against the same Redis server where it uses one,
with the same client budget:

- *sequential*: one client process, one call at a time (latency);
- *saturated*: ``client_processes`` × ``client_threads`` calls in flight, each
  thread calling again as soon as it has its answer (throughput).

Each is run for the reference model and for a trivial one of the same input shape
(flatten → linear → softmax: microseconds), which isolates the serving overhead.
Every system of a model serves at once and is measured in ``rounds`` alternating rounds
(A, B, B, A, …), each taking its share of the calls: a busy spell on a shared machine
then weighs on every system alike instead of on whichever ran during it. A system's
figures pool its rounds; the ratios of each round are kept too, to show the spread.
CPU per request is read from ``/proc`` for the server processes, Redis and the
clients over the saturated phase. Peers are in ``lab/peers.py``; they need the
``peers`` extra (FastAPI, uvicorn, Celery). The ``loop`` (``lab/reference_loop.py``)
is our own design with none of our features, on the same Redis: the ratios to it are
what those features and our code cost.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from redis import Redis, ResponseError
from rich.console import Console
from rich.table import Table

from lab import children, peers, reference_loop
from lab.bench import cpu_seconds, reference_artifact
from lab.embedded_redis import EmbeddedRedis, free_port
from lab.fleet import Fleet, tree_pids
from modeltools import reference
from producer import Client
from protocol import keys
from protocol.errors import ConfigError
from protocol.settings import Settings
from registry import Registry

SYSTEMS = ("streamserve", "fastapi", "celery", "loop")
MODELS = ("reference", "trivial")
START_TIMEOUT_S = 60.0
WARM_CALLS = 20
OCTETS = {"Content-Type": "application/octet-stream"}


@dataclass(frozen=True, slots=True)
class PeersConfig:
    """Server processes, the client budget and how many calls each measurement makes."""

    processes: int = 2
    sequential_requests: int = 1000
    client_processes: int = 4
    client_threads: int = 8
    saturated_requests: int = 200  # per client thread
    timeout_s: float = 10.0
    rounds: int = 3  # alternating rounds the calls are split over (at least one call each)
    # Same host over Unix sockets: streamserve's bots and workers reach Redis, FastAPI's clients its
    # servers, through a socket file (Celery stays on TCP: its broker transport is another matter).
    unix_socket: bool = False


@dataclass(frozen=True, slots=True)
class Target:
    """Where a client reaches one system serving one model."""

    system: str
    redis_url: str
    model: str = ""  # streamserve's (and the loop's) model name
    ports: tuple[int, ...] = ()  # FastAPI's: one single-process server each
    sockets: tuple[str, ...] = ()  # FastAPI's over Unix sockets (replacing ports)


def trivial_onnx(path: Path, seed: int = 0) -> Path:
    """A model of the reference input shape that costs microseconds: flatten → linear → softmax."""
    rng = np.random.default_rng(seed)
    size = reference.TIMESTEPS * reference.N_FEATURES
    inits = [numpy_helper.from_array(rng.standard_normal((size, 3)).astype(np.float32) / size, "w"),
             numpy_helper.from_array(np.array([-1, size], dtype=np.int64), "flat")]
    nodes = [helper.make_node("Reshape", [reference.INPUT_NAME, "flat"], ["x"]),
             helper.make_node("MatMul", ["x", "w"], ["logits"]),
             helper.make_node("Softmax", ["logits"], [reference.OUTPUT_NAME], axis=-1)]
    graph = helper.make_graph(
        nodes, "trivial",
        [helper.make_tensor_value_info(reference.INPUT_NAME, TensorProto.FLOAT,
                                       ["batch", reference.TIMESTEPS, reference.N_FEATURES])],
        [helper.make_tensor_value_info(reference.OUTPUT_NAME, TensorProto.FLOAT, ["batch", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# ---- clients (run in spawned processes: module-level, picklable) -------------------------------

class Caller:
    """One connection's worth of calls to a system: ``call(x)`` per request, ``close()`` at the end."""

    def __init__(self, call: Callable[[np.ndarray], None], close: Callable[[], None]) -> None:
        self.call, self.close = call, close


def make_caller(target: Target, timeout_s: float, index: int = 0) -> Caller:
    """Caller ``index`` of ``target`` (one per client thread: each holds its own connection; FastAPI's
    are spread over its servers' ports)."""
    if target.system == "streamserve":
        client = Client.from_url(target.redis_url, timeout_s=timeout_s)

        def predict(x: np.ndarray) -> None:
            client.predict(target.model, x)
        return Caller(predict, client.close)
    if target.system == "loop":
        loop = reference_loop.LoopClient(target.redis_url, target.model, timeout_s)

        def call(x: np.ndarray) -> None:
            loop.predict({reference.INPUT_NAME: x[np.newaxis]})
        return Caller(call, loop.close)
    if target.system == "fastapi" and target.sockets:
        return _http_caller(_UnixHTTPConnection(target.sockets[index % len(target.sockets)], timeout_s))
    if target.system == "fastapi":
        conn = http.client.HTTPConnection("127.0.0.1", target.ports[index % len(target.ports)],
                                          timeout=timeout_s)  # keep-alive
        conn.connect()
        # http.client writes the headers and the body apart: without TCP_NODELAY each call waits out
        # a delayed ACK (~40 ms), which would measure the kernel, not the server.
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _http_caller(conn)
    app = peers.make_celery(target.redis_url)

    def task(x: np.ndarray) -> None:
        app.send_task("predict", args=[x.tobytes()]).get(timeout=timeout_s)
    return Caller(task, app.close)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 keep-alive over a Unix socket (uvicorn ``--uds``)."""

    def __init__(self, path: str, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self.path = path
        self.connect()

    def connect(self) -> None:
        """A stream socket to ``path``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except OSError:  # not listening yet: the caller retries
            sock.close()
            raise
        self.sock = sock


def _http_caller(conn: http.client.HTTPConnection) -> Caller:
    def call(x: np.ndarray) -> None:
        conn.request("POST", "/predict", body=x.tobytes(), headers=OCTETS)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200 or len(body) != 12:
            raise ConfigError(f"FastAPI peer answered {response.status} with {len(body)} bytes")
    return Caller(call, conn.close)


def _client_main(target: Target, threads: int, requests: int, timeout_s: float, ready: Any, gate: Any,
                 out: Any) -> None:
    x = np.random.default_rng(3).standard_normal((reference.TIMESTEPS, reference.N_FEATURES))
    x = x.astype(np.float32)
    callers = [make_caller(target, timeout_s, i) for i in range(threads)]
    for caller in callers:
        for _ in range(WARM_CALLS):
            caller.call(x)
    ready.release()
    gate.wait()
    latencies: list[list[float]] = [[] for _ in callers]

    def loop(caller: Caller, ms: list[float]) -> None:
        for _ in range(requests):
            t0 = time.perf_counter()
            caller.call(x)
            ms.append((time.perf_counter() - t0) * 1000)

    cpu0, t0 = time.process_time(), time.time()
    workers = [threading.Thread(target=loop, args=(c, ms)) for c, ms in zip(callers, latencies, strict=True)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for caller in callers:
        caller.close()
    out.put({"ms": [v for ms in latencies for v in ms], "t0": t0, "t1": time.time(),
             "cpu_s": time.process_time() - cpu0})


@dataclass(slots=True)
class Measured:
    """One measurement: every call's latency (ms), the wall time it took and the CPU it cost."""

    ms: list[float]
    elapsed_s: float
    server_cpu_s: float
    client_cpu_s: float


def drive(target: Target, processes: int, threads: int, requests: int, timeout_s: float,
          server_pids: list[int]) -> Measured:
    """``processes`` × ``threads`` closed-loop callers, ``requests`` calls each."""
    ctx = children.context("lab.bench_peers")
    ready, gate, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_client_main, args=(target, threads, requests, timeout_s, ready, gate, out))
             for _ in range(processes)]
    for p in procs:
        p.start()
    for _ in procs:
        if not ready.acquire(timeout=START_TIMEOUT_S):
            raise ConfigError(f"a {target.system} client did not warm up within {START_TIMEOUT_S} s")
    before = {pid: cpu_seconds(pid) for pid in server_pids}
    gate.set()
    reports = [out.get(timeout=START_TIMEOUT_S + requests * timeout_s) for _ in procs]
    used_s = sum(cpu_seconds(pid) - t for pid, t in before.items() if Path(f"/proc/{pid}").exists())
    for p in procs:
        p.join()
    return Measured([v for r in reports for v in r["ms"]],
                    max(r["t1"] for r in reports) - min(r["t0"] for r in reports), used_s,
                    sum(r["cpu_s"] for r in reports))


def summary(runs: list[Measured]) -> dict[str, Any]:
    """Latency, rate and CPU per request over ``runs`` pooled (rate: every call over the time of all)."""
    ms = [v for r in runs for v in r.ms]
    n = len(ms)
    return {"n": n, "p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
            "rps": n / sum(r.elapsed_s for r in runs),
            "server_cpu_us": sum(r.server_cpu_s for r in runs) / n * 1e6,
            "client_cpu_us": sum(r.client_cpu_s for r in runs) / n * 1e6}


def shares(total: int, rounds: int) -> list[int]:
    """``total`` split over ``rounds`` (≤ ``total``) as evenly as whole calls allow."""
    return [total // rounds + (1 if i < total % rounds else 0) for i in range(rounds)]


# ---- servers ----------------------------------------------------------------------------------

@contextmanager
def serving(system: str, model_path: Path, server: EmbeddedRedis, processes: int,
            tmp: Path, unix_url: str | None = None) -> Iterator[tuple[Target, list[int]]]:
    """Start ``system`` on ``model_path``; yields how to reach it and the pids whose CPU is its own.

    With ``unix_url`` (Redis's Unix socket) streamserve uses it and FastAPI listens on sockets."""
    if system == "streamserve":
        with _streamserve(model_path, server, processes, tmp, unix_url or server.url) as served:
            yield served
        return
    if system == "loop":
        with _loop(model_path, processes, unix_url or server.url) as served:
            yield served
        return
    env = {**os.environ, peers.MODEL_ENV: str(model_path), peers.REDIS_ENV: server.url}
    ports = tuple(free_port() for _ in range(processes))
    sockets = tuple(str(tmp / f"fastapi-{port}.sock") for port in ports) if unix_url else ()
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for command in _peer_commands(system, ports, sockets)]
    target = Target(system, server.url, ports=ports, sockets=sockets)
    try:
        for i, proc in enumerate(procs):
            _wait_until_serving(target, proc, i)
        yield target, [pid for proc in procs for pid in tree_pids(proc.pid)]
    finally:
        for proc in procs:
            _stop(proc)


def _peer_commands(system: str, ports: tuple[int, ...], sockets: tuple[str, ...] = ()) -> list[list[str]]:
    """FastAPI: one single-worker uvicorn per port, not ``--workers N``: its worker processes get the
    listening socket through a file descriptor, and asyncio then leaves TCP_NODELAY off on the
    connections (measured: 44 ms per call, a delayed ACK each time, against 2 ms on one worker).
    Celery: one prefork worker with a child per port's worth of processes."""
    if system == "fastapi":
        where = ([["--uds", path] for path in sockets]
                 or [["--host", "127.0.0.1", "--port", str(p)] for p in ports])
        return [[sys.executable, "-m", "uvicorn", "lab.peers:app", *w, "--log-level", "warning",
                 "--no-access-log"] for w in where]
    return [[sys.executable, "-m", "celery", "-A", "lab.peers:celery", "worker", "--pool", "prefork",
             "--concurrency", str(len(ports)), "--loglevel", "WARNING", "--without-gossip",
             "--without-mingle", "--without-heartbeat", "-n", f"peer-{ports[0]}@%h"]]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def _streamserve(model_path: Path, server: EmbeddedRedis, processes: int,
                 tmp: Path, url: str) -> Iterator[tuple[Target, list[int]]]:
    settings = Settings(redis_url=url, artifact_dir=tmp / "artifacts")
    registry = Registry(Redis.from_url(server.url), settings.artifact_dir)
    model = f"peer_{model_path.stem}".replace("-", "_")
    mv = registry.register(model, model_path, input_spec=reference.input_spec(),
                           output_names=[reference.OUTPUT_NAME], labels=list(reference.LABELS))
    registry.promote(model, mv.version)
    registry.redis.close()
    with Fleet(settings, model, processes, "--max-batch", "32", "--max-wait-ms", "0"), \
            Client.from_url(url) as client:
        pids = [w.pid for w in client.health(model).workers]
        yield Target("streamserve", url, model=model), pids


@contextmanager
def _loop(model_path: Path, processes: int, url: str) -> Iterator[tuple[Target, list[int]]]:
    """``processes`` loop workers on one stream; yielded once each has joined the group and one
    call was answered."""
    model = f"loop_{model_path.stem}".replace("-", "_")
    procs = [subprocess.Popen([sys.executable, "-m", "lab.reference_loop", url, model, str(model_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(processes)]
    target = Target("loop", url, model=model)
    try:
        with Redis.from_url(url) as r:
            _wait_for_consumers(r, model, procs)
        _wait_until_serving(target, procs[0], 0)
        yield target, [pid for proc in procs for pid in tree_pids(proc.pid)]
    finally:
        for proc in procs:
            _stop(proc)


def _wait_for_consumers(r: Redis, model: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(proc.poll() is not None for proc in procs):
            raise ConfigError("a loop worker exited before it served")
        try:  # each worker adds its consumer once its model is loaded
            if len(r.xinfo_consumers(keys.request_stream(model), keys.consumer_group(model))) == len(procs):
                return
        except ResponseError:  # no stream or group yet
            pass
        time.sleep(0.1)
    raise ConfigError(f"the loop workers did not all read within {START_TIMEOUT_S} s")


def _wait_until_serving(target: Target, proc: subprocess.Popen[bytes], index: int) -> None:
    x = np.zeros((reference.TIMESTEPS, reference.N_FEATURES), dtype=np.float32)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"the {target.system} peer exited with {proc.returncode}")
        try:
            caller = make_caller(target, 2.0, index)
        except Exception:  # not up yet: connection refused
            time.sleep(0.2)
            continue
        try:
            caller.call(x)
            return
        except Exception:  # not serving yet, or the task not picked up in time
            time.sleep(0.2)
        finally:
            caller.close()
    raise ConfigError(f"the {target.system} peer did not serve within {START_TIMEOUT_S} s")


# ---- the run ----------------------------------------------------------------------------------

def run_peers(cfg: PeersConfig, tmp: Path, redis_binary: Path | None = None,
              systems: tuple[str, ...] = SYSTEMS, models: tuple[str, ...] = MODELS,
              progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Every system × model: sequential and saturated; then streamserve's ratios to each other system."""
    make = {"reference": lambda: reference_artifact(tmp),
            "trivial": lambda: trivial_onnx(tmp / "trivial.onnx")}
    paths = {model: make[model]() for model in models}
    results: dict[str, dict[str, Any]] = {}
    sock = tmp / "redis.sock"
    unix_args = ("--unixsocket", str(sock), "--unixsocketperm", "700") if cfg.unix_socket else ()
    unix_url = f"unix://{sock}?db=0" if cfg.unix_socket else None
    round_ratios: dict[str, list[float]] = {}
    with EmbeddedRedis(binary=redis_binary, extra_args=unix_args) as server:
        for model, path in paths.items():
            with ExitStack() as stack:
                live = {}
                for system in systems:
                    progress(f"peers: {system} serving the {model} model …")
                    live[system] = stack.enter_context(
                        serving(system, path, server, cfg.processes, tmp, unix_url))
                runs = _rounds(cfg, live, server, model, progress)
            for system, (target, _) in live.items():
                results[f"{system}/{model}"] = {
                    "sequential": summary(runs[system]["sequential"]),
                    "saturated": summary(runs[system]["saturated"]),
                    "address": list(target.sockets or target.ports) or [target.redis_url]}
            for i in range(len(runs[systems[0]]["sequential"])):
                one = {f"{s}/{model}": {k: summary([m[i]]) for k, m in runs[s].items()} for s in systems}
                for name, value in peer_ratios(one, systems).items():
                    round_ratios.setdefault(name, []).append(value)
        server_version = server.version()
    return {"config": asdict(cfg), "server": server_version, "results": results,
            "ratios": peer_ratios(results, systems), "round_ratios": round_ratios}


def _rounds(cfg: PeersConfig, live: dict[str, tuple[Target, list[int]]], server: EmbeddedRedis, model: str,
            progress: Callable[[str], None]) -> dict[str, dict[str, list[Measured]]]:
    """Each system's sequential and saturated measurements, round by round, the order reversed every
    other round so that no system always goes first."""
    assert server.process is not None  # started by its __enter__
    runs: dict[str, dict[str, list[Measured]]] = {s: {"sequential": [], "saturated": []} for s in live}
    rounds = min(cfg.rounds, cfg.sequential_requests, cfg.saturated_requests)
    sequential, saturated = shares(cfg.sequential_requests, rounds), shares(cfg.saturated_requests, rounds)
    for i in range(rounds):
        for system in list(live) if i % 2 == 0 else list(live)[::-1]:
            progress(f"peers: {system}, {model} model, round {i + 1} …")
            target, pids = live[system]
            runs[system]["sequential"].append(drive(target, 1, 1, sequential[i], cfg.timeout_s, pids))
            runs[system]["saturated"].append(drive(target, cfg.client_processes, cfg.client_threads,
                                                   saturated[i], cfg.timeout_s, pids + [server.process.pid]))
    return runs


def peer_ratios(results: dict[str, dict[str, Any]], systems: tuple[str, ...]) -> dict[str, float]:
    """streamserve against each peer: sequential p50 (lower is better) and saturated rate (higher)."""
    ratios = {}
    for peer in (s for s in systems if s != "streamserve"):
        for model in MODELS:
            ours, theirs = results.get(f"streamserve/{model}"), results.get(f"{peer}/{model}")
            if ours and theirs:
                ratios[f"{model}_sequential_p50_vs_{peer}"] = (ours["sequential"]["p50_ms"]
                                                               / theirs["sequential"]["p50_ms"])
                ratios[f"{model}_saturated_rps_vs_{peer}"] = (ours["saturated"]["rps"]
                                                              / theirs["saturated"]["rps"])
    return ratios


def print_peers(doc: dict[str, Any]) -> None:
    """One table of every system × model, then the ratios."""
    cfg = doc["config"]
    transport = "Unix sockets (Celery: TCP)" if cfg.get("unix_socket") else "TCP loopback"
    table = Table(title=f"peers — {doc['server']}, {transport}, {cfg['processes']} server processes each; "
                        "sequential: "
                        f"1 client; saturated: {cfg['client_processes']} processes × {cfg['client_threads']} "
                        "in flight")
    for col in ("system / model", "seq p50 ms", "seq p99 ms", "saturated req/s", "sat p99 ms",
                "server+Redis CPU µs/req", "client CPU µs/req"):
        table.add_column(col, justify="left" if col == "system / model" else "right")
    for name, r in doc["results"].items():
        seq, sat = r["sequential"], r["saturated"]
        table.add_row(name, f"{seq['p50_ms']:.3f}", f"{seq['p99_ms']:.3f}", f"{sat['rps']:.0f}",
                      f"{sat['p99_ms']:.2f}", f"{sat['server_cpu_us']:.0f}", f"{sat['client_cpu_us']:.0f}")
    Console(width=max(Console().width, 150)).print(table)
    spread = doc.get("round_ratios", {})
    for name, value in doc["ratios"].items():
        rounds = spread.get(name, [])
        by_round = f" (rounds {min(rounds):.2f}–{max(rounds):.2f})" if len(rounds) > 1 else ""
        print(f"streamserve {name.replace('_', ' ')} = {value:.2f}{by_round}")
