"""``streamserve bench``'s deadline-precision scenario: how late does a call that gets no reply return?

A real server left at ``hz 10`` (Redis' default: it checks a blocked command's timeout
on its 100 ms cron tick), no worker, clients with ``fail_fast=False`` (so the request is
queued although nobody serves it): every call can only end with ``DeadlineExceeded``.
For each timeout (2, 5, 20, 50, 200 ms) ``calls`` sequential calls of the sync client and
of the asyncio client measure ``returned − asked`` in ms; the target is p99 within 2 ms.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from lab.embedded_redis import EmbeddedRedis
from producer import AsyncClient, Client
from protocol.errors import DeadlineExceeded

TARGET_P99_LATE_MS = 2.0
MODEL = "nobody-serves-this"  # no worker reads it: every call ends at its deadline
X = np.zeros((60, 110), np.float32)


@dataclass(frozen=True, slots=True)
class DeadlineConfig:
    """Timeouts to try and how many calls each, per client."""

    timeouts_ms: tuple[float, ...] = (2.0, 5.0, 20.0, 50.0, 200.0)
    calls: int = 100
    hz: int = 10

    @classmethod
    def from_args(cls, args: Any) -> DeadlineConfig:
        """From ``streamserve bench``'s flags (defaults where a flag is not wired)."""
        calls = getattr(args, "deadline_calls", None)
        return cls() if calls is None else cls(calls=calls)


def _queueing(cls: type[Client] | type[AsyncClient]) -> dict[str, Any]:
    """``fail_fast=False`` where the client has it (it queues for a model nobody serves)."""
    return {"fail_fast": False} if "fail_fast" in inspect.signature(cls).parameters else {}


def late_stats(late_ms: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of ``returned − asked`` (ms); NaN when nothing was measured."""
    if not late_ms:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    a = np.asarray(late_ms)
    return {"p50_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


def _record(late: list[float], errors: Counter[str], started: float, timeout_s: float,
            error: Exception | None) -> None:
    """A call that ended ``DeadlineExceeded`` counts its lateness; anything else is an error."""
    if isinstance(error, DeadlineExceeded):
        late.append((time.perf_counter() - started - timeout_s) * 1000)
    else:
        errors["answered" if error is None else type(error).__name__] += 1


def sync_run(url: str, timeout_s: float, calls: int) -> dict[str, Any]:
    """``calls`` sequential sync calls that no one answers."""
    late: list[float] = []
    errors: Counter[str] = Counter()
    with Client.from_url(url, timeout_s=timeout_s, **_queueing(Client)) as client:
        for _ in range(calls):
            started, error = time.perf_counter(), None
            try:
                client.predict(MODEL, X, timeout_s=timeout_s)
            except Exception as e:  # judged by _record: only DeadlineExceeded is the expected end
                error = e
            _record(late, errors, started, timeout_s, error)
    return {**late_stats(late), "n": len(late), "errors": dict(errors)}


async def _async_calls(url: str, timeout_s: float, calls: int) -> dict[str, Any]:
    late: list[float] = []
    errors: Counter[str] = Counter()
    async with AsyncClient.from_url(url, timeout_s=timeout_s, **_queueing(AsyncClient)) as client:
        for _ in range(calls):
            started, error = time.perf_counter(), None
            try:
                await client.predict(MODEL, X, timeout_s=timeout_s)
            except Exception as e:  # as in sync_run
                error = e
            _record(late, errors, started, timeout_s, error)
    return {**late_stats(late), "n": len(late), "errors": dict(errors)}


def async_run(url: str, timeout_s: float, calls: int) -> dict[str, Any]:
    """The same with the asyncio client, in an event loop of its own."""
    return asyncio.run(_async_calls(url, timeout_s, calls))


def run_deadlines(cfg: DeadlineConfig, binary: Path | None = None,
                  progress: Callable[[str], object] = print) -> dict[str, Any]:
    """Every timeout with both clients against a fresh server at ``hz``; the JSON section."""
    rows = []
    with EmbeddedRedis(binary=binary, extra_args=("--hz", str(cfg.hz))) as server:
        for name, run in (("sync", sync_run), ("asyncio", async_run)):
            for timeout_ms in cfg.timeouts_ms:
                progress(f"deadlines: {name} client, timeout {timeout_ms:g} ms x {cfg.calls} …")
                rows.append({"client": name, "timeout_ms": timeout_ms,
                             **run(server.url, timeout_ms / 1000, cfg.calls)})
        version = server.version()
    worst = max((r["p99_ms"] for r in rows if r["n"]), default=float("nan"))
    return {"server": version, "hz": cfg.hz, "config": asdict(cfg), "rows": rows,
            "worst_p99_late_ms": worst, "target_p99_late_ms": TARGET_P99_LATE_MS,
            "met": bool(worst <= TARGET_P99_LATE_MS)}


def print_deadlines(section: dict[str, Any]) -> None:
    """The scenario as a table: lateness per client and timeout."""
    table = Table(title=f"deadline precision: returned − asked, ms ({section['server']}, hz {section['hz']})")
    for col in ("client", "timeout ms", "calls", "p50", "p99", "max", "other outcomes"):
        table.add_column(col, justify="left" if col in ("client", "other outcomes") else "right")
    for r in section["rows"]:
        table.add_row(r["client"], f"{r['timeout_ms']:g}", str(r["n"]), f"{r['p50_ms']:.2f}",
                      f"{r['p99_ms']:.2f}", f"{r['max_ms']:.2f}",
                      ", ".join(f"{k} {v}" for k, v in r["errors"].items()))
    Console(width=max(Console().width, 110)).print(table)
    print(f"deadline precision: worst p99 late {section['worst_p99_late_ms']:.2f} ms "
          f"(target <= {section['target_p99_late_ms']:g} ms: {'met' if section['met'] else 'NOT met'})")
