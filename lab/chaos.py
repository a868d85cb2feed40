"""``streamserve chaos``: steady load while workers are SIGKILLed, plus hostile entries; is anything lost?

Worker processes are started one by one (as Kubernetes or systemd would run
them), and every ``kill_every_s`` a random one is SIGKILLed and replaced at
once. Bots send paced single predictions with a generous timeout, so a request
that is late is measured, not dropped. A fuzzer thread pushes malformed
entries beside them. At the end the run reports what the issue's targets ask:
requests lost, duplicate replies, the worst latency (taken-over requests are
the tail), whether the consumer group shrank back to the live workers, and how
the hostile entries were answered — and whether any worker died by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from redis import Redis
from rich.console import Console
from rich.table import Table

from lab import hostile
from lab.bench import serve_reference
from lab.embedded_redis import EmbeddedRedis
from lab.pacing import paced_bot
from producer import Client
from protocol import keys
from protocol.settings import Settings
from registry import Registry

MODEL = "chaos"
REQUEST_TIMEOUT_S = 60.0  # far past the takeover target: a late reply is measured, never cut off


@dataclass
class ChaosResult:
    """What the bots, the fuzzer and the group saw."""

    seconds: float
    rate_rps: float
    workers: int
    kill_every_s: float
    heartbeat_ttl_s: float
    server: str
    kills: int = 0
    crashes: int = 0  # workers that exited without being killed
    sent: int = 0
    answered: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    duplicate_replies: int = 0
    stream_length_end: int = 0
    pending_end: int = 0
    consumers_end: int = 0
    live_workers_end: int = 0
    hostile: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, float | bool]:
        """The numbers the targets are judged on."""
        lat = np.array(self.latencies_ms or [0.0])
        worst_ms = float(lat.max())
        return {"lost": self.sent - self.answered - sum(self.errors.values()),
                "worst_ms": worst_ms, "p50_ms": float(np.percentile(lat, 50)),
                "p99_ms": float(np.percentile(lat, 99)), "p999_ms": float(np.percentile(lat, 99.9)),
                "target_ms": 2000 * self.heartbeat_ttl_s,
                "ok": bool(self.answered == self.sent and self.duplicate_replies == 0 and not self.crashes
                           and worst_ms <= 2000 * self.heartbeat_ttl_s
                           and self.consumers_end == self.live_workers_end)}


class WorkerPool:
    """``workers`` separate worker processes; kill one, start its replacement, notice crashes."""

    def __init__(self, settings: Settings, workers: int, log_dir: Path) -> None:
        self.settings, self.log_dir = settings, log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.crashes = self.started = 0
        for _ in range(workers):
            self.start_one()

    def start_one(self) -> None:
        """One more worker process."""
        cmd = [sys.executable, "-m", "streamserve", "--redis-url", self.settings.redis_url,
               "--artifact-dir", str(self.settings.artifact_dir), "worker", "--model", MODEL]
        env = {**os.environ, "STREAMSERVE_HEARTBEAT_TTL_S": str(self.settings.heartbeat_ttl_s),
               "STREAMSERVE_HEARTBEAT_INTERVAL_S": str(self.settings.heartbeat_interval_s)}
        self.started += 1
        with open(self.log_dir / f"worker-{self.started}.log", "wb") as log:
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))

    def kill_one(self, rng: random.Random) -> None:
        """SIGKILL a random running worker and start its replacement."""
        running = [p for p in self.procs if p.poll() is None]
        victim = rng.choice(running)
        victim.kill()
        victim.wait()
        self.procs.remove(victim)
        self.start_one()

    def check(self) -> None:
        """Count and replace workers that died on their own (they must not)."""
        for p in [p for p in self.procs if p.poll() is not None]:
            self.crashes += 1
            self.procs.remove(p)
            self.start_one()

    def stop(self) -> None:
        """SIGTERM every worker (they drain and leave the group), then wait."""
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(30)


def _bot(url: str, rate_rps: float, stop: threading.Event, result: ChaosResult, lock: threading.Lock) -> None:
    def record(code: str | None, latency_ms: float) -> None:
        with lock:
            result.sent += 1
            if code is None:
                result.answered += 1
                result.latencies_ms.append(latency_ms)
            else:
                result.errors[code] = result.errors.get(code, 0) + 1

    paced_bot(url, MODEL, rate_rps, stop, record, timeout_s=REQUEST_TIMEOUT_S, seed=7)


def _wait_for_serving(client: Redis, workers: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    with Client(client) as c:
        while len([w for w in c.health(MODEL).workers if w.version is not None]) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not come up")
            time.sleep(0.2)


def _wait_for_pids(client: Redis, pids: set[int], timeout_s: float = 120.0) -> None:
    """Until each of ``pids`` serves: a replacement started by the last kill may still be
    importing on a busy box, and it joins the group only once it reads."""
    deadline = time.monotonic() + timeout_s
    with Client(client) as c:
        while not pids <= {w.pid for w in c.health(MODEL).workers if w.version is not None}:
            if time.monotonic() > deadline:
                raise RuntimeError("a replacement worker did not come up")
            time.sleep(0.2)


def _settle(client: Redis, s: Settings, result: ChaosResult, pids: set[int]) -> None:
    """After the load: let every running worker serve, the last victim's heartbeat expire and
    takeover finish, then count.

    ``pids`` are the worker processes alive; the group should shrink to them within a few TTLs.
    """
    _wait_for_pids(client, pids)
    running = len(pids)
    deadline = time.monotonic() + 3 * s.heartbeat_ttl_s
    stream, group = keys.request_stream(MODEL), keys.consumer_group(MODEL)
    while time.monotonic() < deadline:
        live = len(Client(client).health(MODEL).workers)
        consumers = len(client.xinfo_consumers(stream, group))
        if live == consumers == running and client.xpending(stream, group)["pending"] == 0:
            break
        time.sleep(0.2)
    result.live_workers_end = len(Client(client).health(MODEL).workers)
    result.consumers_end = len(client.xinfo_consumers(stream, group))
    result.pending_end = int(client.xpending(stream, group)["pending"])
    result.stream_length_end = int(client.xlen(stream))
    # A reply key still holding a reply after its bot took one is a second reply to the same request.
    reply_keys = client.scan_iter(keys.reply_key_pattern(MODEL))
    result.duplicate_replies = sum(int(client.llen(k)) for k in reply_keys
                                   if not k.decode().rsplit(":", 1)[-1].startswith(hostile.ID_PREFIX))


def run(settings: Settings, seconds: float, rate_rps: float, *, workers: int = 2, kill_every_s: float = 3.0,
        bots: int = 2, hostile_entries: int = 0, seed: int = 0, progress=print) -> ChaosResult:
    """Serve ``rate_rps`` for ``seconds`` while killing a worker every ``kill_every_s``."""
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory() as tmp:
        s = settings.with_overrides(redis_url=server.url, artifact_dir=Path(tmp) / "artifacts")
        client = Redis.from_url(server.url)
        registry = Registry(client, s.artifact_dir)
        serve_reference(registry, MODEL, Path(tmp))
        result = ChaosResult(seconds, rate_rps, workers, kill_every_s, s.heartbeat_ttl_s, server.version())
        pool = WorkerPool(s, workers, Path(tmp))
        _wait_for_serving(client, workers)
        stop, lock, rng = threading.Event(), threading.Lock(), random.Random(seed)
        threads = [threading.Thread(target=_bot, args=(server.url, rate_rps / bots, stop, result, lock))
                   for _ in range(bots)]
        fuzz = hostile.Fuzzer(server.url, MODEL, hostile_entries, seed, stop)
        threads.append(threading.Thread(target=fuzz.run))
        for t in threads:
            t.start()
        started = next_kill = time.monotonic()
        try:
            while (elapsed := time.monotonic() - started) < seconds:
                pool.check()
                if time.monotonic() >= next_kill + kill_every_s:
                    next_kill = time.monotonic()
                    pool.kill_one(rng)
                    result.kills += 1
                    progress(f"{elapsed:6.1f} s  kills {result.kills}  sent {result.sent}  "
                             f"answered {result.answered}")
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join()
        pool.check()
        result.crashes, result.hostile = pool.crashes, fuzz.counts(client)
        _settle(client, s, result, pids={p.pid for p in pool.procs})
        pool.stop()
        client.close()
    return result


def main(args: argparse.Namespace, settings: Settings) -> int:
    """Run the chaos, print the verdict, write the JSON."""
    console = Console()
    s = settings.with_overrides(heartbeat_ttl_s=args.heartbeat_ttl_s)
    result = run(s, args.seconds, args.rate, workers=args.workers, kill_every_s=args.kill_every_s,
                 bots=args.bots, hostile_entries=args.hostile, seed=args.seed, progress=console.print)
    summary = result.summary()
    data = asdict(result) | {"latencies_ms": len(result.latencies_ms)}
    args.out.write_text(json.dumps({"result": data, "summary": summary}, indent=2))
    console.print(_table(result, summary))
    console.print(f"wrote {args.out}")
    return 0 if summary["ok"] else 1


def _table(result: ChaosResult, summary: dict) -> Table:
    table = Table(title=f"chaos: {result.seconds:.0f} s at {result.rate_rps:.0f} req/s, "
                        f"{result.workers} workers, SIGKILL every {result.kill_every_s:g} s, {result.server}")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    table.add_row("workers SIGKILLed / died by themselves", f"{result.kills} / {result.crashes}")
    table.add_row("requests sent / answered", f"{result.sent} / {result.answered}")
    table.add_row("error replies", json.dumps(result.errors) if result.errors else "none")
    table.add_row("lost / duplicate replies", f"{summary['lost']} / {result.duplicate_replies}")
    table.add_row("latency p50 / p99 / p99.9 ms",
                  f"{summary['p50_ms']:.1f} / {summary['p99_ms']:.1f} / {summary['p999_ms']:.1f}")
    table.add_row("worst latency (taken-over requests)",
                  f"{summary['worst_ms'] / 1000:.2f} s (target ≤ {summary['target_ms'] / 1000:.0f} s)")
    table.add_row("consumers in the group / live workers",
                  f"{result.consumers_end} / {result.live_workers_end}")
    table.add_row("stream length / pending at the end", f"{result.stream_length_end} / {result.pending_end}")
    table.add_row("hostile entries", json.dumps(result.hostile) if result.hostile else "none")
    table.add_row("verdict", "PASS" if summary["ok"] else "FAIL")
    return table
