"""``streamserve soak``: steady load on an embedded server for minutes; does Redis memory stay flat?

Bots send ``rate_rps`` single predictions per second (paced, not as fast as
possible) to a worker fleet; every ``sample_s`` the server's ``used_memory``
is recorded. After a warm-up, a least-squares line through the samples gives
the slope; "flat" means the memory at the end is within 10 % of the memory at
the end of the warm-up.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from redis import Redis
from rich.console import Console
from rich.table import Table
from scipy import stats

from lab.bench import serve_reference
from lab.embedded_redis import EmbeddedRedis
from lab.fleet import Fleet
from lab.pacing import paced_bot
from protocol import keys
from protocol.settings import Settings
from registry import Registry

MODEL = "soak"
FLAT_WITHIN = 0.10


@dataclass
class SoakResult:
    """Memory samples and what the bots saw."""

    minutes: float
    rate_rps: float
    server: str
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, used_memory)
    sent: int = 0
    answered: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    stream_length_end: int = 0

    def after_warmup(self, warmup_s: float) -> list[tuple[float, int]]:
        """Samples taken once the warm-up is over."""
        return [(t, m) for t, m in self.samples if t >= warmup_s]

    def summary(self, warmup_s: float) -> dict[str, float]:
        """Slope (bytes/min) after warm-up, and end vs start-of-steady-state memory."""
        steady = self.after_warmup(warmup_s)
        t, m = np.array([s[0] for s in steady]), np.array([s[1] for s in steady], dtype=float)
        fit = stats.linregress(t, m)
        return {"slope_bytes_per_min": float(fit.slope * 60),
                "slope_stderr_bytes_per_min": float(fit.stderr * 60),
                "start_mb": m[0] / 2**20, "end_mb": m[-1] / 2**20, "change": float(m[-1] / m[0] - 1),
                "flat": bool(abs(m[-1] / m[0] - 1) <= FLAT_WITHIN)}


def _bot(url: str, rate_rps: float, stop: threading.Event, result: SoakResult, lock: threading.Lock) -> None:
    def record(code: str | None, _latency_ms: float) -> None:
        with lock:
            result.sent += 1
            result.answered += code is None
            if code:
                result.errors[code] = result.errors.get(code, 0) + 1

    paced_bot(url, MODEL, rate_rps, stop, record, timeout_s=5.0)


def run(settings: Settings, minutes: float, rate_rps: float, *, bots: int = 2, processes: int = 2,
        sample_s: float = 10.0, progress=print) -> SoakResult:
    """Serve ``rate_rps`` for ``minutes`` on a fresh embedded server, sampling its memory."""
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory() as tmp:
        s = settings.with_overrides(redis_url=server.url, artifact_dir=Path(tmp) / "artifacts")
        client = Redis.from_url(server.url)
        registry = Registry(client, s.artifact_dir)
        serve_reference(registry, MODEL, Path(tmp))
        result = SoakResult(minutes, rate_rps, server.version())
        stop, lock = threading.Event(), threading.Lock()
        with Fleet(s, MODEL, processes):
            threads = [threading.Thread(target=_bot, args=(server.url, rate_rps / bots, stop, result, lock))
                       for _ in range(bots)]
            for t in threads:
                t.start()
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < minutes * 60:
                used = int(client.info("memory")["used_memory"])
                result.samples.append((elapsed, used))
                progress(f"{elapsed / 60:5.1f} min  used_memory {used / 2**20:7.2f} MB  sent {result.sent}")
                stop.wait(sample_s)
            stop.set()
            for t in threads:
                t.join()
        result.stream_length_end = int(client.xlen(keys.request_stream(MODEL)))
        client.close()
    return result


def main(args: argparse.Namespace, settings: Settings) -> int:
    """Run the soak, print the samples' summary, write the JSON."""
    console = Console()
    result = run(settings, args.minutes, args.rate, bots=args.bots, processes=args.processes,
                 sample_s=args.sample_s, progress=console.print)
    summary = result.summary(args.warmup_s)
    args.out.write_text(json.dumps({"result": asdict(result), "summary": summary}, indent=2))
    table = Table(title=f"soak: {args.minutes} min at {args.rate} req/s, {result.server}")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    table.add_row("requests sent / answered", f"{result.sent} / {result.answered}")
    table.add_row("errors", json.dumps(result.errors) if result.errors else "none")
    table.add_row(f"used_memory after {args.warmup_s:.0f} s warm-up", f"{summary['start_mb']:.2f} MB")
    table.add_row("used_memory at the end", f"{summary['end_mb']:.2f} MB")
    table.add_row("change", f"{summary['change']:+.1%} ({'flat' if summary['flat'] else 'NOT flat'})")
    table.add_row("slope (least squares)", f"{summary['slope_bytes_per_min'] / 1024:+.1f} KB/min "
                  f"± {summary['slope_stderr_bytes_per_min'] / 1024:.1f}")
    table.add_row("request stream length at the end", f"{result.stream_length_end}")
    console.print(table)
    console.print(f"wrote {args.out}")
    return 0 if summary["flat"] else 1
