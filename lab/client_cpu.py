"""``python -m lab.client_cpu``: what a call costs the bot's process, sync client against asyncio.

Two worker processes serve the trivial model (``lab.bench_peers.trivial_onnx``: the serving is all
the work); this process calls them, and its own CPU clock (``time.process_time``: every thread)
around each row is the client's cost. Rows: the sync and the asyncio client one call at a time,
in alternating blocks (so the ratio a user asks about, asyncio over sync, is measured over the
same spells of a busy box); 8 threads sharing one sync client; 16 asyncio calls in flight on one
loop.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
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
BLOCKS = 10  # the sequential rows alternate in this many blocks: a busy spell weighs on both


class _Clock:
    """CPU (this process, every thread) and wall time summed over the blocks of one row."""

    def __init__(self) -> None:
        self.cpu_s = self.wall_s = 0.0
        self.calls = 0

    def time(self, calls: int, run: Callable[[], object]) -> None:
        cpu0, t0 = time.process_time(), time.perf_counter()
        run()
        self.cpu_s += time.process_time() - cpu0
        self.wall_s += time.perf_counter() - t0
        self.calls += calls

    def per_call(self) -> dict[str, float]:
        return {"cpu_us": self.cpu_s / self.calls * 1e6, "calls_per_s": self.calls / self.wall_s}


class _Callers:
    """The sync and the asyncio client side by side, and each way the rows call them."""

    def __init__(self, sync: Client, aio: AsyncClient, loop: asyncio.Runner, x: np.ndarray) -> None:
        self.sync, self.aio, self.loop, self.x = sync, aio, loop, x

    def sync_calls(self, n: int) -> None:
        """``n`` sync calls, one at a time."""
        for _ in range(n):
            self.sync.predict(MODEL, self.x)

    def asyncio_calls(self, n: int) -> None:
        """``n`` asyncio calls, one at a time."""
        self.loop.run(self._awaited(n))

    async def _awaited(self, n: int) -> None:
        for _ in range(n):
            await self.aio.predict(MODEL, self.x)

    def threaded(self, n: int) -> None:
        """``THREADS`` threads sharing the sync client, ``n`` calls each."""
        threads = [threading.Thread(target=self.sync_calls, args=(n,)) for _ in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def in_flight(self, n: int) -> None:
        """``IN_FLIGHT`` asyncio calls at once on one loop, ``n`` each."""
        self.loop.run(self._gathered(n))

    async def _gathered(self, n: int) -> None:
        await asyncio.gather(*(self._awaited(n) for _ in range(IN_FLIGHT)))


def round_of_rows(url: str, x: np.ndarray, calls: int) -> dict[str, dict[str, float]]:
    """Every row once, ``calls`` calls each: the sync and asyncio clients one call at a time in
    alternating blocks, then ``THREADS`` threads sharing the sync client, then ``IN_FLIGHT``
    asyncio calls at once."""
    with Client.from_url(url, timeout_s=TIMEOUT_S) as sync, asyncio.Runner() as loop:
        callers = _Callers(sync, AsyncClient.from_url(url, timeout_s=TIMEOUT_S), loop, x)
        callers.sync_calls(WARM_CALLS)
        callers.asyncio_calls(WARM_CALLS)
        clocks = {row: _Clock() for row in ROWS}
        block = max(1, calls // BLOCKS)
        pair = [("sync", callers.sync_calls), ("asyncio", callers.asyncio_calls)]
        for i in range(BLOCKS):
            for row, call in pair if i % 2 == 0 else pair[::-1]:
                clocks[row].time(block, functools.partial(call, block))
        n = calls // THREADS
        clocks["sync_threads"].time(n * THREADS, functools.partial(callers.threaded, n))
        n = calls // IN_FLIGHT
        clocks["asyncio_in_flight"].time(n * IN_FLIGHT, functools.partial(callers.in_flight, n))
        loop.run(callers.aio.close())
    return {row: clock.per_call() for row, clock in clocks.items()}


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
                measured.append(round_of_rows(server.url, x, calls))
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
