"""``python -m lab.overhead``: where a call's time goes, streamserve against the simplest loop.

Both systems serve the trivial model (``lab.bench_peers.trivial_onnx``: serving is all the work)
from one process each, on one Redis server, and are called one call at a time from this
process, in alternating rounds (loop, streamserve, loop, …) so that a busy box weighs on both
alike. Per call: the p50 latency, and the CPU each party spent (this client, the server
process, Redis), read from ``/proc`` around each round. With ``saturated_requests``, each
round also drives each system with ``bench-peers``'s saturated client budget (4 processes × 8
calls in flight, that many calls per thread) and splits its CPU per request the same way.
``bench-peers`` measures the same systems with two server processes; this is the profile
behind its ratios.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lab.bench import cpu_seconds
from lab.bench_peers import Target, drive, make_caller, serving, trivial_onnx
from lab.embedded_redis import EmbeddedRedis
from modeltools import reference

SYSTEMS = ("loop", "streamserve")
WARM_CALLS = 300
TIMEOUT_S = 5.0
SATURATED_PROCESSES, SATURATED_THREADS = 4, 8  # bench-peers's saturated client budget


def measure(call: Callable[[np.ndarray], None], x: np.ndarray, calls: int, pids: list[int],
            redis_pid: int) -> dict[str, float]:
    """``calls`` sequential calls: p50 (ms) and CPU per call (µs) of the client, server and Redis."""
    for _ in range(WARM_CALLS):
        call(x)
    client0, server0, redis0 = time.process_time(), sum(map(cpu_seconds, pids)), cpu_seconds(redis_pid)
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        call(x)
        latencies.append(time.perf_counter() - started)
    per_call_us = 1e6 / calls
    return {"p50_ms": float(np.median(latencies)) * 1000,
            "client_cpu_us": (time.process_time() - client0) * per_call_us,
            "server_cpu_us": (sum(map(cpu_seconds, pids)) - server0) * per_call_us,
            "redis_cpu_us": (cpu_seconds(redis_pid) - redis0) * per_call_us}


def saturated(target: Target, pids: list[int], redis_pid: int, requests: int,
              clients: tuple[int, int] = (SATURATED_PROCESSES, SATURATED_THREADS)) -> dict[str, float]:
    """``clients`` (processes, threads each: ``bench-peers``'s saturated budget by default),
    ``requests`` calls per thread: the rate and the CPU per request of the clients, the server
    process and Redis."""
    redis0 = cpu_seconds(redis_pid)
    m = drive(target, *clients, requests, TIMEOUT_S, pids)
    per_request_us = 1e6 / len(m.ms)
    return {"rps": len(m.ms) / m.elapsed_s, "client_cpu_us": m.client_cpu_s * per_request_us,
            "server_cpu_us": m.server_cpu_s * per_request_us,
            "redis_cpu_us": (cpu_seconds(redis_pid) - redis0) * per_request_us}


def run(calls: int, rounds: int, redis_binary: Path | None = None, saturated_requests: int = 0,
        saturated_clients: tuple[int, int] = (SATURATED_PROCESSES, SATURATED_THREADS)) -> dict[str, Any]:
    """``rounds`` alternating rounds of ``calls`` sequential calls per system (and, with
    ``saturated_requests``, a saturated phase each, driven by ``saturated_clients``)."""
    shape = (reference.TIMESTEPS, reference.N_FEATURES)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    results: dict[str, list[dict[str, float]]] = {s: [] for s in SYSTEMS}
    loaded: dict[str, list[dict[str, float]]] = {s: [] for s in SYSTEMS}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(binary=redis_binary) as server:
        assert server.process is not None
        path = trivial_onnx(Path(tmp) / "trivial.onnx")
        with serving("loop", path, server, 1, Path(tmp)) as (loop, loop_pids), \
                serving("streamserve", path, server, 1, Path(tmp)) as (ours, our_pids):
            targets = {"loop": (loop, loop_pids), "streamserve": (ours, our_pids)}
            for _ in range(rounds):
                for system in SYSTEMS:
                    target, pids = targets[system]
                    caller = make_caller(target, TIMEOUT_S)
                    try:
                        results[system].append(measure(caller.call, x, calls, pids, server.process.pid))
                    finally:
                        caller.close()
                    if saturated_requests:
                        loaded[system].append(saturated(target, pids, server.process.pid, saturated_requests,
                                                        saturated_clients))
        version = server.version()
    medians = _medians(results)
    doc = {"server": version, "calls": calls, "rounds": results, "median": medians,
           "p50_ratio": medians["streamserve"]["p50_ms"] / medians["loop"]["p50_ms"]}
    if saturated_requests:
        doc["saturated"] = {"requests_per_thread": saturated_requests, "rounds": loaded,
                            "median": _medians(loaded)}
    return doc


def _medians(rounds: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {s: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for s, rs in rounds.items()}


def main(argv: list[str] | None = None) -> int:
    """Run, print a table and the JSON (``--out``)."""
    p = argparse.ArgumentParser(prog="python -m lab.overhead", description=__doc__)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--redis-server", type=Path, help="server binary (default: redis-server on PATH)")
    p.add_argument("--saturated-requests", type=int, default=100,
                   help="calls per client thread in each round's saturated phase (0: none)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    doc = run(args.calls, args.rounds, args.redis_server, args.saturated_requests)
    print(f"{'system':<12} {'p50 ms':>8} {'client µs':>10} {'server µs':>10} {'Redis µs':>9}   per call, "
          f"median of {args.rounds} rounds of {args.calls}, {doc['server']}")
    for system, m in doc["median"].items():
        print(f"{system:<12} {m['p50_ms']:>8.3f} {m['client_cpu_us']:>10.0f} {m['server_cpu_us']:>10.0f} "
              f"{m['redis_cpu_us']:>9.0f}")
    print(f"streamserve / loop sequential p50: {doc['p50_ratio']:.2f}")
    if "saturated" in doc:
        _print_saturated(doc["saturated"]["median"], args.rounds)
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2))
    return 0


def _print_saturated(medians: dict[str, dict[str, float]], rounds: int) -> None:
    print(f"{'system':<12} {'req/s':>8} {'client µs':>10} {'server µs':>10} {'Redis µs':>9}   per request, "
          f"saturated ({SATURATED_PROCESSES} × {SATURATED_THREADS} in flight), median of {rounds} rounds")
    for system, m in medians.items():
        print(f"{system:<12} {m['rps']:>8.0f} {m['client_cpu_us']:>10.0f} {m['server_cpu_us']:>10.0f} "
              f"{m['redis_cpu_us']:>9.0f}")


if __name__ == "__main__":
    raise SystemExit(main())
