"""``python -m lab.client_cpu``: what a call costs the bot's process, sync client against asyncio.

Two worker processes serve the trivial model (``lab.bench_peers.trivial_onnx``: the serving is all
the work); this process calls them, and its own CPU clock (``time.process_time``: every thread)
around each row is the client's cost. Rows, each round in this order: the sync client one call
at a time; 8 threads sharing one sync client; the asyncio client one call at a time; 16 asyncio
calls in flight on one loop. The ratio a user asks about is asyncio over sync, one call at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from redis import Redis

from lab.bench_peers import trivial_onnx
from lab.embedded_redis import EmbeddedRedis
from lab.fleet import Fleet
from modeltools import reference
from producer import Client
from producer.aio import AsyncClient
from protocol.errors import ConfigError
from protocol.settings import Settings
from registry import Registry

MODEL = "client_cpu_trivial"
WORKERS = 2
THREADS, IN_FLIGHT = 8, 16
WARM_CALLS = 200
TIMEOUT_S = 5.0
ROWS = ("sync", "sync_threads", "asyncio", "asyncio_in_flight")


def timed(calls: int, run: Callable[[], None]) -> dict[str, float]:
    """CPU of this process per call (µs) and calls per second, over ``run`` making ``calls`` calls."""
    started = _clocks()
    run()
    return _per_call(calls, started)


def _clocks() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def _per_call(calls: int, started: tuple[float, float]) -> dict[str, float]:
    cpu0, t0 = started
    return {"cpu_us": (time.process_time() - cpu0) / calls * 1e6,
            "calls_per_s": calls / (time.perf_counter() - t0)}


def sync_rows(url: str, x: np.ndarray, calls: int) -> dict[str, dict[str, float]]:
    """The sync client: sequential, then ``THREADS`` threads sharing it (``calls`` in all)."""
    with Client.from_url(url, timeout_s=TIMEOUT_S) as client:
        for _ in range(WARM_CALLS):
            client.predict(MODEL, x)

        def sequential(n: int = calls) -> None:
            for _ in range(n):
                client.predict(MODEL, x)

        def threaded() -> None:
            threads = [threading.Thread(target=sequential, args=(calls // THREADS,)) for _ in range(THREADS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        return {"sync": timed(calls, sequential),
                "sync_threads": timed(calls // THREADS * THREADS, threaded)}


def asyncio_rows(url: str, x: np.ndarray, calls: int) -> dict[str, dict[str, float]]:
    """The asyncio client: sequential, then ``IN_FLIGHT`` tasks at once (``calls`` in all)."""
    async def main() -> dict[str, dict[str, float]]:
        async with AsyncClient.from_url(url, timeout_s=TIMEOUT_S) as client:
            async def sequential(n: int) -> None:
                for _ in range(n):
                    await client.predict(MODEL, x)

            await sequential(WARM_CALLS)
            started = _clocks()
            await sequential(calls)
            out = {"asyncio": _per_call(calls, started)}
            started = _clocks()
            await asyncio.gather(*(sequential(calls // IN_FLIGHT) for _ in range(IN_FLIGHT)))
            out["asyncio_in_flight"] = _per_call(calls // IN_FLIGHT * IN_FLIGHT, started)
            return out

    return asyncio.run(main())


def run(calls: int, rounds: int, redis_binary: Path | None = None) -> dict[str, Any]:
    """``rounds`` rounds of every row, ``calls`` calls per row."""
    shape = (reference.TIMESTEPS, reference.N_FEATURES)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    measured: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(binary=redis_binary) as server:
        settings = Settings(redis_url=server.url, artifact_dir=Path(tmp) / "artifacts")
        with Redis.from_url(server.url) as r:
            registry = Registry(r, settings.artifact_dir)
            mv = registry.register(MODEL, trivial_onnx(Path(tmp) / "trivial.onnx"),
                                   input_spec=reference.input_spec(), output_names=[reference.OUTPUT_NAME],
                                   labels=list(reference.LABELS))
            registry.promote(MODEL, mv.version)
        with Fleet(settings, MODEL, WORKERS, "--max-batch", "32", "--max-wait-ms", "0"):
            for _ in range(rounds):
                measured.append({**sync_rows(server.url, x, calls), **asyncio_rows(server.url, x, calls)})
        version = server.version()
    ratios = [m["asyncio"]["cpu_us"] / m["sync"]["cpu_us"] for m in measured]
    return {"server": version, "calls": calls, "workers": WORKERS, "rounds": measured,
            "asyncio_over_sync": ratios, "asyncio_over_sync_median": statistics.median(ratios)}


def main(argv: list[str] | None = None) -> int:
    """Run, print a table and the JSON (``--out``)."""
    p = argparse.ArgumentParser(prog="python -m lab.client_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000, help="calls per row and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--redis-server", type=Path, help="server binary (default: redis-server on PATH)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    try:
        doc = run(args.calls, args.rounds, args.redis_server)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"trivial model, {WORKERS} worker processes, {args.calls:,} calls per row and round, "
          f"{doc['server']}")
    labels = {"sync": "sync, sequential", "sync_threads": f"sync, {THREADS} threads sharing one client",
              "asyncio": "asyncio, sequential", "asyncio_in_flight": f"asyncio, {IN_FLIGHT} calls in flight"}
    for row in ROWS:
        cpu = " / ".join(f"{m[row]['cpu_us']:.0f}" for m in doc["rounds"])
        rate = " / ".join(f"{m[row]['calls_per_s']:,.0f}" for m in doc["rounds"])
        print(f"{labels[row]:<38} CPU per call {cpu} µs   at {rate} calls/s")
    print("asyncio / sync, sequential: " + " / ".join(f"{r:.2f}" for r in doc["asyncio_over_sync"]))
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
