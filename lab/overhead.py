"""``python -m lab.overhead``: where one sequential call's time goes, streamserve against the simplest loop.

Both systems serve the trivial model (``lab.bench_peers.trivial_onnx``: serving is all the work)
from one process each, on one Redis server, and are called one call at a time from this
process, in alternating rounds (loop, streamserve, loop, …) so that a busy box weighs on both
alike. Per call: the p50 latency, and the CPU each party spent (this client, the server
process, Redis), read from ``/proc`` around each round. ``bench-peers`` measures the same
systems under load; this is the profile behind its sequential ratio.
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
from lab.bench_peers import make_caller, serving, trivial_onnx
from lab.embedded_redis import EmbeddedRedis
from modeltools import reference

SYSTEMS = ("loop", "streamserve")
WARM_CALLS = 300


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


def run(calls: int, rounds: int, redis_binary: Path | None = None) -> dict[str, Any]:
    """``rounds`` alternating rounds of ``calls`` sequential calls per system."""
    shape = (reference.TIMESTEPS, reference.N_FEATURES)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    results: dict[str, list[dict[str, float]]] = {s: [] for s in SYSTEMS}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(binary=redis_binary) as server:
        assert server.process is not None
        path = trivial_onnx(Path(tmp) / "trivial.onnx")
        with serving("loop", path, server, 1, Path(tmp)) as (loop, loop_pids), \
                serving("streamserve", path, server, 1, Path(tmp)) as (ours, our_pids):
            targets = {"loop": (loop, loop_pids), "streamserve": (ours, our_pids)}
            for _ in range(rounds):
                for system in SYSTEMS:
                    target, pids = targets[system]
                    caller = make_caller(target, 5.0)
                    try:
                        results[system].append(measure(caller.call, x, calls, pids, server.process.pid))
                    finally:
                        caller.close()
        version = server.version()
    medians = {s: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for s, rs in results.items()}
    return {"server": version, "calls": calls, "rounds": results, "median": medians,
            "p50_ratio": medians["streamserve"]["p50_ms"] / medians["loop"]["p50_ms"]}


def main(argv: list[str] | None = None) -> int:
    """Run, print a table and the JSON (``--out``)."""
    p = argparse.ArgumentParser(prog="python -m lab.overhead", description=__doc__)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--redis-server", type=Path, help="server binary (default: redis-server on PATH)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    doc = run(args.calls, args.rounds, args.redis_server)
    print(f"{'system':<12} {'p50 ms':>8} {'client µs':>10} {'server µs':>10} {'Redis µs':>9}   per call, "
          f"median of {args.rounds} rounds of {args.calls}, {doc['server']}")
    for system, m in doc["median"].items():
        print(f"{system:<12} {m['p50_ms']:>8.3f} {m['client_cpu_us']:>10.0f} {m['server_cpu_us']:>10.0f} "
              f"{m['redis_cpu_us']:>9.0f}")
    print(f"streamserve / loop sequential p50: {doc['p50_ratio']:.2f}")
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
