"""Bulk throughput: entries of many samples, large batches; end to end against the in-process ceiling.

The scenario of a GPU deployment (issue 12, item 6): a bot sends, say, 64 samples per
stream entry, the workers run batches of up to ``--bulk-max-batch`` rows, and what counts
is samples per second. The ceiling is the same backend in-process at the same batch, in
as many processes as the fleet has. ``--bulk-device cuda`` runs both on the GPU where one
is present; on a CPU-only box the scenario measures the same path on the CPU.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from redis import Redis
from rich.console import Console
from rich.table import Table

from lab.embedded_redis import EmbeddedRedis
from lab.fleet import Fleet
from modeltools import reference
from producer import Client
from protocol.settings import Settings
from registry import Registry
from worker.backend import OnnxBackend

SHAPE = (60, 110)


@dataclass(frozen=True)
class BulkConfig:
    """The scenario's knobs (``--bulk-*`` flags)."""

    samples: int = 64  # per stream entry
    max_batch: int = 256  # rows per model call
    device: str = "cpu"
    bots: int = 2  # client processes
    in_flight: int = 4  # calls in flight per client process
    seconds: float = 8.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BulkConfig:
        """From the bench's parsed flags."""
        return cls(args.bulk_samples, args.bulk_max_batch, args.bulk_device, args.bulk_bots,
                   args.bulk_in_flight, args.bulk_seconds)


def _ceiling_child(path: str, rows: int, device: str, seconds: float, gate, out) -> None:
    backend = OnnxBackend(Path(path), device=device)
    x = {"features": np.random.default_rng(1).standard_normal((rows, *SHAPE)).astype(np.float32)}
    backend.run(x)  # warm-up: allocations, and on CUDA the kernels' first launch
    gate.wait()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        backend.run(x)
        calls += 1
    out.put(rows * calls / (time.perf_counter() - t0))


def in_process_ceiling(path: Path, rows: int, device: str, processes: int, seconds: float) -> float:
    """Samples/s of ``processes`` concurrent in-process backends, each running ``rows``-row batches."""
    ctx = mp.get_context("spawn")
    gate, out = ctx.Event(), ctx.Queue()
    children = [ctx.Process(target=_ceiling_child, args=(str(path), rows, device, seconds, gate, out))
                for _ in range(processes)]
    for c in children:
        c.start()
    time.sleep(3.0)  # every child loads its session before the gate opens
    gate.set()
    total = sum(out.get(timeout=seconds + 120) for _ in children)
    for c in children:
        c.join()
    return total


def _bot(url: str, model: str, cfg: BulkConfig, gate, out) -> None:
    x = np.random.default_rng(2).standard_normal((cfg.samples, *SHAPE)).astype(np.float32)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def loop(client: Client, until: float) -> None:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            try:
                client.predict(model, x, sample_ndim=len(SHAPE))
            except Exception:  # any failure counts; the scenario reports them
                with lock:
                    errors[0] += 1
                continue
            with lock:
                latencies.append((time.perf_counter() - t0) * 1000)

    with Client.from_url(url, timeout_s=30.0) as client:
        for _ in range(3):
            client.predict(model, x, sample_ndim=len(SHAPE))
        gate.wait()
        t0 = time.perf_counter()
        until = t0 + cfg.seconds
        threads = [threading.Thread(target=loop, args=(client, until)) for _ in range(cfg.in_flight)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    out.put({"entries": len(latencies), "errors": errors[0], "elapsed_s": elapsed, "latencies_ms": latencies})


def end_to_end(url: str, model: str, cfg: BulkConfig) -> dict:
    """``cfg.bots`` processes × ``cfg.in_flight`` threads, each sending ``cfg.samples``-sample entries."""
    ctx = mp.get_context("spawn")
    gate, out = ctx.Event(), ctx.Queue()
    bots = [ctx.Process(target=_bot, args=(url, model, cfg, gate, out)) for _ in range(cfg.bots)]
    for b in bots:
        b.start()
    time.sleep(3.0)  # connected and warmed up
    gate.set()
    reports = [out.get(timeout=cfg.seconds + 120) for _ in bots]
    for b in bots:
        b.join()
    entries = sum(r["entries"] for r in reports)
    elapsed = max(r["elapsed_s"] for r in reports)
    latencies = [ms for r in reports for ms in r["latencies_ms"]]
    return {"samples_per_s": entries * cfg.samples / elapsed, "entries": entries,
            "errors": sum(r["errors"] for r in reports),
            "p50_ms": float(np.median(latencies)) if latencies else float("nan"),
            "p99_ms": float(np.percentile(latencies, 99)) if latencies else float("nan")}


def run_bulk(settings: Settings, path: Path, tmp: Path, processes: int, cfg: BulkConfig,
             redis_server: Path | None, progress, **model_info: Any) -> dict:
    """The ceiling, then the fleet end to end on a Redis of its own; samples/s and their ratio.

    ``path`` is an ONNX model taking ``features`` of per-sample shape (60, 110); ``model_info``
    (``input_spec``, ``output_names``, ``labels``) registers it, the reference model's by default.
    """
    progress(f"bulk: in-process ceiling, {cfg.max_batch}-row batches in {processes} processes …")
    ceiling = in_process_ceiling(path, cfg.max_batch, cfg.device, processes, cfg.seconds)
    info = {"input_spec": reference.input_spec(), "output_names": [reference.OUTPUT_NAME],
            "labels": list(reference.LABELS)} | model_info
    with EmbeddedRedis(binary=redis_server) as server:
        s = settings.with_overrides(redis_url=server.url, artifact_dir=tmp / "artifacts-bulk")
        client = Redis.from_url(server.url)
        registry = Registry(client, s.artifact_dir)
        registry.promote("bulk", registry.register("bulk", path, **info).version)
        client.close()
        progress(f"bulk: end to end, {cfg.bots} x {cfg.in_flight} in flight, "
                 f"{cfg.samples} samples per entry …")
        with Fleet(s, "bulk", processes, "--max-batch", str(cfg.max_batch), "--device", cfg.device):
            e2e = end_to_end(server.url, "bulk", cfg)
        version = server.version()
    return {"server": version, "config": cfg.__dict__, "processes": processes,
            "in_process_samples_per_s": ceiling, "end_to_end": e2e,
            "ratio": e2e["samples_per_s"] / ceiling, "target": ">= 0.25"}


def print_bulk(doc: dict) -> None:
    """The scenario's table and ratio."""
    cfg, e2e = doc["config"], doc["end_to_end"]
    table = Table(title=f"bulk: {cfg['samples']} samples per entry, batches of up to "
                        f"{cfg['max_batch']} rows, device {cfg['device']}, {doc['processes']} worker "
                        f"processes, {doc['server']}")
    for col in ("measurement", "samples/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    table.add_row(f"in-process, {cfg['max_batch']}-row batches", f"{doc['in_process_samples_per_s']:.0f}",
                  "", "")
    table.add_row(f"end to end ({cfg['bots']} x {cfg['in_flight']} in flight, errors {e2e['errors']})",
                  f"{e2e['samples_per_s']:.0f}", f"{e2e['p50_ms']:.1f}", f"{e2e['p99_ms']:.1f}")
    Console().print(table)
    print(f"bulk end to end / in-process ceiling = {doc['ratio']:.2f} (target {doc['target']})")
