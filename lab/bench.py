"""``streamserve bench``: the in-process floor versus end to end through Redis, in one run.

(a) ONNX Runtime in this process on the reference model: B=1 latency and the
    batch size with the best throughput, then that batch in ``processes``
    concurrent processes (the ceiling for a fleet of that size).
(b) Through Redis with a real worker fleet: one sequential client (latency),
    then enough concurrent clients to saturate the fleet (throughput).
(c) Latency around a hot reload.
(d) Overload at twice the fleet's capacity, with and without priority lanes
    (``lab/bench_overload.py``).
(e) A 3-master Redis Cluster with one shard of the model, then three: Redis CPU and
    bytes per request per node, and the capacity model (``lab/bench_cluster.py``).
(f) Deadline precision: how late a call with no reply returns, per timeout, sync and
    asyncio clients, on a server at ``hz 10`` (``lab/bench_deadlines.py``).
(g) Fleet down: Redis memory while every worker is stopped under load, against its
    bound, and how long the returning fleet takes to empty the stream
    (``lab/bench_fleetdown.py``).
(h) Multi-model: twenty small models served by one process each versus one multi-model
    fleet: memory (PSS), latency per model under a Zipf load, fairness and cold starts
    (``lab/bench_multimodel.py``).
Ratios (b)/(a) are the numbers to watch; absolute times on a shared box are noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from redis import Redis
from rich.console import Console
from rich.table import Table

from lab import bench_bulk, bench_cluster, bench_deadlines, bench_fleetdown, bench_multimodel, bench_overload
from lab.embedded_redis import EmbeddedCluster, EmbeddedRedis
from lab.fleet import Fleet
from lab.loadgen import LoadSpec, run_load
from modeltools import reference
from producer import Client
from protocol import connection, keys
from protocol.settings import Settings
from registry import Registry
from registry.rollout import wait_for_fleet
from worker.loader import make_golden

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
# Each names its server.
SERVED_SECTIONS = ("overload", "cluster", "bulk", "deadlines", "fleetdown", "multimodel")


def _session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _time_runs(session, x: np.ndarray, seconds: float) -> np.ndarray:
    for _ in range(5):
        session.run(None, {"features": x})
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        session.run(None, {"features": x})
        times.append(time.perf_counter() - t0)
    return np.array(times) * 1000


def in_process(path: Path, seconds: float) -> dict:
    """B=1 latency and throughput at each batch size, one thread, this process."""
    session = _session(path)
    x = np.random.default_rng(0).standard_normal((max(BATCH_SIZES), 60, 110)).astype(np.float32)
    sweep = {}
    for b in BATCH_SIZES:
        ms = _time_runs(session, x[:b], seconds / 2 if b > 1 else seconds)
        sweep[b] = {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
                    "throughput_rps": b * len(ms) / (ms.sum() / 1000)}
    best = max(sweep, key=lambda b: sweep[b]["throughput_rps"])
    return {"b1_p50_ms": sweep[1]["p50_ms"], "b1_p99_ms": sweep[1]["p99_ms"], "best_batch": best,
            "best_batch_rps": sweep[best]["throughput_rps"], "sweep": sweep,
            "b1_idle_gap_p50_ms": _idle_gap_p50_ms(session, x[:1])}


def _idle_gap_p50_ms(session, x: np.ndarray, runs: int = 300, gap_s: float = 0.001) -> float:
    """B=1 latency when each call follows an idle gap, as a lightly loaded worker sees it."""
    times = []
    for _ in range(runs):
        time.sleep(gap_s)
        t0 = time.perf_counter()
        session.run(None, {"features": x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def _parallel_child(path: str, batch: int, seconds: float, gate, out) -> None:
    session = _session(Path(path))
    x = np.random.default_rng(1).standard_normal((batch, 60, 110)).astype(np.float32)
    session.run(None, {"features": x})
    gate.wait()
    ms = _time_runs(session, x, seconds)
    out.put(batch * len(ms) / seconds)


def in_process_parallel(path: Path, batch: int, processes: int, seconds: float) -> float:
    """Summed throughput of ``processes`` concurrent single-thread sessions at ``batch``."""
    ctx = mp.get_context("spawn")
    gate, out = ctx.Event(), ctx.Queue()
    children = [ctx.Process(target=_parallel_child, args=(str(path), batch, seconds, gate, out))
                for _ in range(processes)]
    for c in children:
        c.start()
    time.sleep(2.0)  # let every child load its session before the gate opens
    gate.set()
    total = sum(out.get(timeout=seconds + 60) for _ in children)
    for c in children:
        c.join()
    return total


def low_load(url: str, model: str, requests: int, spin_ms: float = 0.0) -> dict:
    """One sequential client: each request waits for its reply before the next is sent.

    Also the workers' and this client's CPU per request, and the workers' CPU share
    over ``IDLE_S`` of idleness afterwards (what the low-latency mode costs at rest).
    """
    x = np.random.default_rng(2).standard_normal((60, 110)).astype(np.float32)
    with Client.from_url(url, timeout_s=5.0, spin_ms=spin_ms) as client:
        worker_pids = [w.pid for w in client.health(model).workers]
        for _ in range(50):
            client.predict(model, x)
        ms = []
        before, client_before = {p: cpu_seconds(p) for p in worker_pids}, time.process_time()
        for _ in range(requests):
            t0 = time.perf_counter()
            client.predict(model, x)
            ms.append((time.perf_counter() - t0) * 1000)
        client_cpu_s = time.process_time() - client_before
        worker_cpu_s = sum(cpu_seconds(p) - t for p, t in before.items())
        idle_from = {p: cpu_seconds(p) for p in worker_pids}
        time.sleep(IDLE_S)
        idle_cpu_s = sum(cpu_seconds(p) - t for p, t in idle_from.items())
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "n": requests,
            "spin_ms": spin_ms, "worker_cpu_us_per_request": worker_cpu_s / requests * 1e6,
            "client_cpu_us_per_request": client_cpu_s / requests * 1e6,
            "idle_worker_cpu_share": idle_cpu_s / IDLE_S}


IDLE_S = 3.0  # how long low_load watches the idle workers' CPU
HISTOGRAM_FLUSH_S = 1.5  # longer than the workers' heartbeat interval (1 s), when they flush it


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def saturated(url: str, model: str, bots: int, concurrency: int, requests: int, batch: int,
              server_pid: int) -> dict:
    """``bots`` client processes, each with ``concurrency`` pipelined predict_many calls of ``batch``.

    Also accounts the CPU each party used per prediction: on one small box the
    bots, Redis and the workers share the cores, and that sets the ceiling.
    """

    with Client.from_url(url) as client:
        worker_pids = [w.pid for w in client.health(model).workers]
    rows_before = batch_rows(url, model)
    before = {pid: cpu_seconds(pid) for pid in [*worker_pids, server_pid]}
    spec = LoadSpec(url, model, requests=requests, concurrency=concurrency, timeout_s=10.0,
                    batch_every=1 if batch > 1 else 0, batch_size=batch)
    result = run_load(spec, bots)
    used = {pid: cpu_seconds(pid) - t for pid, t in before.items()}
    time.sleep(HISTOGRAM_FLUSH_S)  # workers add their batch sizes to the histogram once a heartbeat
    rows = batch_rows(url, model) - rows_before
    n = max(1, len(result.latencies_ms))
    cpu_us = {"workers": sum(used[p] for p in worker_pids) / n * 1e6,
              "redis": used[server_pid] / n * 1e6, "bots": result.client_cpu_s / n * 1e6}
    return {"throughput_rps": len(result.latencies_ms) / result.elapsed_s,
            "cpu_us_per_prediction": cpu_us,
            "p50_ms": result.percentile(50), "p99_ms": result.percentile(99),
            "errors": dict(result.errors), "n": result.requests, "bots": bots,
            "concurrency": concurrency, "client_batch": batch,
            "mean_rows_per_model_call": sum(size * calls for size, calls in rows.items())
            / max(1, rows.total())}


def batch_rows(url: str, model: str) -> Counter[int]:
    """The model's batch-size histogram as it stands (shard 0): rows per model call → calls."""
    client = Redis.from_url(url)
    try:
        return Counter({int(k): int(v) for k, v in client.hgetall(keys.batch_histogram(model)).items()})
    finally:
        client.close()


def reference_artifact(directory: Path, seed: int = 0) -> Path:
    """The reference architecture with seeded weights (speed does not depend on training)."""
    torch.manual_seed(seed)
    return reference.export_onnx(reference.HybridCNNLSTM(), directory / f"reference-{seed}.onnx")


def serve_reference(registry: Registry, model: str, directory: Path) -> int:
    """Register the seeded reference artifact under ``model`` and promote it; its version."""
    mv = registry.register(model, reference_artifact(directory), input_spec=reference.input_spec(),
                           output_names=[reference.OUTPUT_NAME], labels=list(reference.LABELS))
    registry.promote(model, mv.version)
    return mv.version


def reload_latency(url: str, registry, model: str, new_path: Path, threads: int, seconds: float) -> dict:
    """Latency of steady traffic before a reload versus in the seconds around it.

    ``threads`` sequential clients keep the fleet moderately busy; halfway through,
    a new version is registered, promoted (which publishes the reload), and the
    fleet is awaited. "Around" spans 0.5 s before the promote to 1 s after the
    last worker switched.
    """

    samples: list[tuple[float, float, int]] = []
    stop = threading.Event()
    x = np.random.default_rng(4).standard_normal((60, 110)).astype(np.float32)

    def loop() -> None:
        with Client.from_url(url, timeout_s=5.0) as client:
            while not stop.is_set():
                t0 = time.perf_counter()
                p = client.predict(model, x)
                samples.append((time.monotonic(), (time.perf_counter() - t0) * 1000, p.model_version))

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    time.sleep(seconds / 2)
    mv = registry.register(model, new_path, input_spec=reference.input_spec(),
                           output_names=[reference.OUTPUT_NAME], labels=list(reference.LABELS),
                           golden=make_golden(new_path, {"features": x[None]}))
    promoted_at = time.monotonic()
    registry.promote(model, mv.version, reason="bench reload")
    report = wait_for_fleet(registry.redis, model, mv.version, timeout_s=60)
    switched_at = time.monotonic()
    time.sleep(seconds / 2)
    stop.set()
    for w in workers:
        w.join()
    steady = [ms for t, ms, _ in samples if t < promoted_at - 0.5]
    around = [ms for t, ms, _ in samples if promoted_at - 0.5 <= t <= switched_at + 1.0]
    return {"steady_p50_ms": float(np.median(steady)), "steady_p99_ms": float(np.percentile(steady, 99)),
            "reload_p50_ms": float(np.median(around)), "reload_p99_ms": float(np.percentile(around, 99)),
            "switch_s": switched_at - promoted_at, "fleet_ok": report.ok, "n": len(samples),
            "versions_seen": sorted({v for *_, v in samples}), "threads": threads}


def machine() -> dict:
    """Where the numbers were measured."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "platform": platform.platform()}


def run(settings: Settings, args: argparse.Namespace, progress=print) -> dict:
    """All measurements (each scenario unless skipped by its flag); returns the JSON document."""
    doc: dict = {"machine": machine(),
                 "config": vars(args) | {"out": str(args.out), "redis_server": str(args.redis_server)}}
    with tempfile.TemporaryDirectory() as tmp:
        path = reference_artifact(Path(tmp))
        if not args.skip_base:
            doc |= _base(settings, args, path, Path(tmp), progress)
        if not args.skip_overload:
            doc["overload"] = _overload(settings, args, Path(tmp), progress)
        if not args.skip_cluster:
            doc["cluster"] = _cluster(settings, args, Path(tmp), progress)
        if not args.skip_bulk:
            cfg = bench_bulk.BulkConfig.from_args(args)
            doc["bulk"] = bench_bulk.run_bulk(settings, path, Path(tmp), args.processes, cfg,
                                              args.redis_server, progress)
        if not args.skip_deadlines:
            doc["deadlines"] = bench_deadlines.run_deadlines(bench_deadlines.DeadlineConfig.from_args(args),
                                                             args.redis_server, progress)
        if not args.skip_fleetdown:
            doc["fleetdown"] = _fleetdown(settings, args, Path(tmp), progress)
        if not args.skip_multimodel:
            doc["multimodel"] = _multimodel(settings, args, path, Path(tmp), progress)
    servers = [doc.pop("server", None), *(doc.get(k, {}).get("server") for k in SERVED_SECTIONS)]
    doc["machine"]["server"] = next((s for s in servers if s), "none")
    if "overload" in doc or "cluster" in doc:
        doc["capacity_model"] = bench_cluster.capacity_model(doc.get("cluster"), doc.get("overload"))
    return doc


def _fleet_args(args: argparse.Namespace) -> tuple[str, ...]:
    return "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)


def _base(settings: Settings, args: argparse.Namespace, path: Path, tmp: Path, progress) -> dict:
    """(a) the in-process floor, (b) end to end at low load and saturated, (c) around a reload."""
    progress("in-process ONNX Runtime sweep …")
    floor = in_process(path, args.seconds)
    progress(f"in-process at batch {floor['best_batch']} in {args.processes} processes …")
    floor["parallel_rps"] = in_process_parallel(path, floor["best_batch"], args.processes, args.seconds)
    with EmbeddedRedis(binary=args.redis_server) as server:
        assert server.process is not None  # started by __enter__
        server_version = server.version()
        s = settings.with_overrides(redis_url=server.url, artifact_dir=tmp / "artifacts")
        registry = Registry(Redis.from_url(server.url), s.artifact_dir)
        mv = registry.register("bench", path, input_spec=reference.input_spec(),
                               output_names=[reference.OUTPUT_NAME], labels=list(reference.LABELS))
        registry.promote("bench", mv.version)
        with Fleet(s, "bench", args.processes, *_fleet_args(args)):
            progress("end to end, one sequential client …")
            low = low_load(server.url, "bench", args.requests)
            progress(f"end to end, {args.bots} clients x {args.concurrency} in flight …")
            sat = saturated(server.url, "bench", args.bots, args.concurrency,
                            args.saturation_requests, args.client_batch, server.process.pid)
            progress("latency around a hot reload …")
            reload = reload_latency(server.url, registry, "bench", reference_artifact(tmp, seed=1),
                                    args.reload_threads, args.reload_seconds)
        with Fleet(s, "bench", args.processes, *_fleet_args(args), "--spin-ms", str(args.spin_ms)):
            progress(f"end to end, one sequential client, low-latency mode (spin {args.spin_ms} ms) …")
            fast = low_load(server.url, "bench", args.requests, spin_ms=args.spin_ms)
    in_process_cpu_us = 1e6 / floor["best_batch_rps"]
    # The measure: in-process at the batch size the workers actually ran (nearest swept).
    mean_rows = max(1.0, sat["mean_rows_per_model_call"])
    same = min(floor["sweep"], key=lambda b: abs(math.log(int(b) / mean_rows)))
    same_cpu_us = 1e6 / floor["sweep"][same]["throughput_rps"]
    ratios = {"low_load_p50_vs_inprocess_b1": low["p50_ms"] / floor["b1_p50_ms"],
              "low_latency_p50_vs_inprocess_b1": fast["p50_ms"] / floor["b1_p50_ms"],
              "low_load_p50_vs_inprocess_b1_idle_gap": low["p50_ms"] / floor["b1_idle_gap_p50_ms"],
              "saturated_vs_inprocess_parallel": sat["throughput_rps"] / floor["parallel_rps"],
              "worker_cpu_vs_inprocess_cpu": sat["cpu_us_per_prediction"]["workers"] / in_process_cpu_us,
              "worker_cpu_vs_inprocess_cpu_same_batch": sat["cpu_us_per_prediction"]["workers"] / same_cpu_us,
              "reload_p99_vs_steady_p99": reload["reload_p99_ms"] / reload["steady_p99_ms"]}
    return {"server": server_version, "in_process": floor, "low_load": low, "low_latency": fast,
            "saturated": sat,
            "reload": reload, "ratios": ratios,
            "targets": {"low_load_p50_vs_inprocess_b1": "<= 1.25",
                        "saturated_vs_inprocess_parallel": ">= 0.85", "reload_p99_vs_steady_p99": "<= 2"}}


def _overload(settings: Settings, args: argparse.Namespace, tmp: Path, progress) -> dict:
    """The overload scenario on a Redis of its own, serving the reference model.

    With ``--overload-pin`` the fleet (one worker process) runs on the first core alone and this
    process, Redis, the bots and the senders on the others, as bots on other machines would."""
    cores = sorted(os.sched_getaffinity(0))
    fleet_cores = {cores[0]} if args.overload_pin else None
    processes = 1 if args.overload_pin else args.processes
    if args.overload_pin:
        os.sched_setaffinity(0, set(cores[1:]))  # inherited by Redis, the bots and the senders
    try:
        with EmbeddedRedis(binary=args.redis_server) as server:
            s = settings.with_overrides(redis_url=server.url, artifact_dir=tmp / "artifacts-overload")
            client = Redis.from_url(server.url)
            serve_reference(Registry(client, s.artifact_dir), "bench", tmp)
            client.close()
            section = bench_overload.run_overload(s, "bench", processes, _fleet_args(args),
                                                  bench_overload.OverloadConfig.from_args(args), progress,
                                                  fleet_cores)
            return section | {"server": server.version(), "pinned": args.overload_pin}
    finally:
        os.sched_setaffinity(0, set(cores))


def _fleetdown(settings: Settings, args: argparse.Namespace, tmp: Path, progress) -> dict:
    """The fleet-down scenario on a Redis of its own, serving the reference model."""
    with EmbeddedRedis(binary=args.redis_server) as server:
        s = settings.with_overrides(redis_url=server.url, artifact_dir=tmp / "artifacts-fleetdown")
        client = Redis.from_url(server.url)
        serve_reference(Registry(client, s.artifact_dir), "bench", tmp)
        client.close()
        section = bench_fleetdown.run_fleetdown(s, "bench", args.processes, _fleet_args(args),
                                                bench_fleetdown.FleetDownConfig.from_args(args), progress)
        return section | {"server": server.version()}


def _multimodel(settings: Settings, args: argparse.Namespace, path: Path, tmp: Path, progress) -> dict:
    """The multi-model scenario on a Redis of its own; the reference model joins its cold start."""
    ref = bench_multimodel.ReferenceModel(path, reference.input_spec(), [reference.OUTPUT_NAME],
                                          list(reference.LABELS))
    with EmbeddedRedis(binary=args.redis_server) as server:
        s = settings.with_overrides(redis_url=server.url, artifact_dir=tmp / "artifacts-multimodel")
        section = bench_multimodel.run_multimodel(s, bench_multimodel.MultiModelConfig.from_args(args), tmp,
                                                  _fleet_args(args), ref, progress)
        return section | {"server": server.version()}


def _cluster(settings: Settings, args: argparse.Namespace, tmp: Path, progress) -> dict:
    """The cluster scenario on a 3-master cluster of its own, serving the reference model."""
    with EmbeddedCluster(3, binary=args.redis_server) as cluster:
        node = Redis(port=cluster.nodes[0].port)
        model = bench_cluster.spread_model_name(node, "bench", 3)
        node.close()
        client = connection.connect(cluster.url)
        s = settings.with_overrides(redis_url=cluster.url, artifact_dir=tmp / "artifacts-cluster")
        serve_reference(Registry(client, s.artifact_dir), model, tmp)
        client.close()
        return bench_cluster.run_cluster(cluster, s, model, args.processes, _fleet_args(args),
                                         bench_cluster.ClusterConfig.from_args(args), progress)


def print_table(doc: dict) -> None:
    """The human-readable summary: a table per scenario that ran, then its ratios."""
    if "in_process" in doc:
        _print_base(doc)
    if "overload" in doc:
        bench_overload.print_overload(doc["overload"])
    if "cluster" in doc:
        bench_cluster.print_cluster(doc["cluster"])
    if "capacity_model" in doc:
        bench_cluster.print_capacity_model(doc["capacity_model"])
    if "bulk" in doc:
        bench_bulk.print_bulk(doc["bulk"])
    if "deadlines" in doc:
        bench_deadlines.print_deadlines(doc["deadlines"])
    if "fleetdown" in doc:
        bench_fleetdown.print_fleetdown(doc["fleetdown"])
    if "multimodel" in doc:
        bench_multimodel.print_multimodel(doc["multimodel"])


def _print_base(doc: dict) -> None:
    f, low, sat, r = doc["in_process"], doc["low_load"], doc["saturated"], doc["ratios"]
    m = doc["machine"]
    table = Table(title=f"streamserve bench — {m['cpu']} ({m['cores']} cores), {m['server']}")
    for col in ("measurement", "p50 ms", "p99 ms", "throughput/s"):
        table.add_column(col, justify="right" if col != "measurement" else "left")
    table.add_row("in-process ORT, B=1, 1 thread", f"{f['b1_p50_ms']:.3f}", f"{f['b1_p99_ms']:.3f}",
                  f"{f['sweep'][1]['throughput_rps']:.0f}")
    best = f["sweep"][f["best_batch"]]
    table.add_row(f"in-process ORT, B={f['best_batch']} (best), 1 proc", f"{best['p50_ms']:.3f}",
                  f"{best['p99_ms']:.3f}", f"{best['throughput_rps']:.0f}")
    table.add_row(f"in-process ORT, B={f['best_batch']}, {doc['config']['processes']} procs", "", "",
                  f"{f['parallel_rps']:.0f}")
    table.add_row("in-process ORT, B=1, after 1 ms idle", f"{f['b1_idle_gap_p50_ms']:.3f}", "", "")
    table.add_row("end to end, 1 sequential client", f"{low['p50_ms']:.3f}", f"{low['p99_ms']:.3f}",
                  f"{1000 / low['p50_ms']:.0f}")
    fast = doc["low_latency"]
    table.add_row(f"  … low-latency mode (spin {fast['spin_ms']:g} ms)", f"{fast['p50_ms']:.3f}",
                  f"{fast['p99_ms']:.3f}", f"{1000 / fast['p50_ms']:.0f}")
    table.add_row(f"end to end, saturated ({sat['bots']}x{sat['concurrency']})", f"{sat['p50_ms']:.2f}",
                  f"{sat['p99_ms']:.2f}", f"{sat['throughput_rps']:.0f}")
    rl = doc["reload"]
    table.add_row(f"end to end, {rl['threads']} clients, steady", f"{rl['steady_p50_ms']:.3f}",
                  f"{rl['steady_p99_ms']:.3f}", "")
    table.add_row(f"  … around a reload ({rl['switch_s']:.2f} s to switch)", f"{rl['reload_p50_ms']:.3f}",
                  f"{rl['reload_p99_ms']:.3f}", "")
    Console().print(table)
    print(f"low-load p50 / in-process B=1 p50 = {r['low_load_p50_vs_inprocess_b1']:.2f} (target <= 1.25)")
    print(f"low-load p50 / in-process B=1 after idle p50 = {r['low_load_p50_vs_inprocess_b1_idle_gap']:.2f}")
    print(f"low-latency mode p50 / in-process B=1 p50 = {r['low_latency_p50_vs_inprocess_b1']:.2f}")
    for name, run in (("sequential", low), ("low-latency", fast)):
        print(f"{name}: CPU per request workers {run['worker_cpu_us_per_request']:.0f} us, client "
              f"{run['client_cpu_us_per_request']:.0f} us; idle workers use "
              f"{run['idle_worker_cpu_share']:.1%} of a core")
    print(f"saturated / in-process parallel = {r['saturated_vs_inprocess_parallel']:.2f} (target >= 0.85)")
    print(f"reload p99 / steady p99 = {r['reload_p99_vs_steady_p99']:.2f} (target <= 2)")
    cpu = sat["cpu_us_per_prediction"]
    print(f"CPU per prediction at saturation: workers {cpu['workers']:.0f} us, Redis {cpu['redis']:.0f} us, "
          f"bots {cpu['bots']:.0f} us; in-process model alone {1e6 / f['best_batch_rps']:.0f} us "
          f"(worker overhead x{r['worker_cpu_vs_inprocess_cpu']:.2f}); at the workers' mean batch of "
          f"{sat['mean_rows_per_model_call']:.1f} rows x{r['worker_cpu_vs_inprocess_cpu_same_batch']:.2f} "
          "(target <= 1.15)")


def main(args: argparse.Namespace, settings: Settings) -> int:
    """Run the benchmark, write the JSON, print the table."""
    doc = run(settings, args)
    args.out.write_text(json.dumps(doc, indent=2, default=str))
    print_table(doc)
    print(f"wrote {args.out}")
    return 0
