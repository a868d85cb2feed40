"""``streamserve``: one command; each package contributes its subcommands."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import pydantic

from producer import cli as producer_cli
from protocol.errors import StreamserveError
from protocol.settings import Settings
from registry import cli as registry_cli

DEFAULT_MODEL = "hybrid_cnn_lstm"


def build_parser() -> argparse.ArgumentParser:
    """The full command tree (``streamserve --help``)."""
    parser = argparse.ArgumentParser(
        prog="streamserve", description="Redis-stream inference workers, client, registry.",
        epilog="Every setting can also come from STREAMSERVE_<NAME> environment variables.")
    parser.add_argument("--redis-url", help="default: $STREAMSERVE_REDIS_URL or redis://localhost:6379/0")
    parser.add_argument("--artifact-dir", type=Path, help="content-addressed artifact store")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_worker(sub)
    _add_train(sub)
    producer_cli.register(sub)
    from worker import bench, demo, ops, optimize_cli

    registry_cli.register(sub, fleet_waiter=ops.fleet_waiter, parity_checker=ops.parity_checker)
    ops.register(sub)
    optimize_cli.register(sub)
    from experiments import cli as experiments_cli

    experiments_cli.register(sub)
    bench.register(sub)
    demo.register(sub)
    return parser


def _add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="serve a model from its request stream")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--processes", type=int, default=1, help="worker processes (one per core)")
    p.add_argument("--max-batch", type=int)
    p.add_argument("--max-wait-ms", type=float)
    p.add_argument("--intra-op-threads", type=int)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="default: cpu")
    p.add_argument("--max-queue-ms", type=float, default=0.0,
                   help="shed requests queued longer than this with OVERLOADED (0 = never)")
    p.add_argument("--burst", action="store_true", help="drain the stream, then exit")
    p.set_defaults(func=_worker)


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    settings = settings.with_overrides(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                       intra_op_threads=args.intra_op_threads, device=args.device)
    if args.processes > 1 and not args.burst:
        from worker.supervisor import Supervisor

        return Supervisor(settings, args.model, args.processes, max_queue_ms=args.max_queue_ms).run()
    from worker.worker import Worker

    worker = Worker(settings, args.model, burst=args.burst, max_queue_ms=args.max_queue_ms)
    worker.install_signal_handlers()
    worker.run()
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the reference HybridCNNLSTM on synthetic data and register it")
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--n-train", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage", default="Production", choices=["None", "Staging", "Production"])
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace, settings: Settings) -> int:
    import redis
    from rich.progress import Progress

    from registry import Registry
    from worker import reference
    from worker.loader import make_golden, version_parity

    with Progress(transient=True) as bar:
        task = bar.add_task("training HybridCNNLSTM", total=args.epochs)
        result = reference.train(n_train=args.n_train, epochs=args.epochs, seed=args.seed,
                                 progress=lambda done, total: bar.update(task, completed=done))
    print(f"held-out accuracy {result.accuracy:.4f} on {result.n_test} samples "
          f"({result.train_seconds:.1f} s on CPU)")
    with tempfile.TemporaryDirectory() as tmp, redis.Redis.from_url(settings.redis_url) as client:
        registry = Registry(client, settings.artifact_dir)
        onnx_path = reference.export_onnx(result.model, Path(tmp) / "model.onnx")
        torch_path = reference.export_torch(result.model, Path(tmp) / "model.pt2")
        held_out, _ = reference.synthetic_dataset(256, seed=args.seed + 2)
        mv = registry.register(
            args.model, onnx_path, input_spec=reference.input_spec(), output_names=[reference.OUTPUT_NAME],
            labels=list(reference.LABELS), description="HybridCNNLSTM on synthetic series",
            metrics={"accuracy": result.accuracy, "train_seconds": result.train_seconds,
                     "n_train": result.n_train, "n_test": result.n_test, "seed": args.seed},
            golden=make_golden(onnx_path, {reference.INPUT_NAME: held_out[:8]}),
            alternates={"torch_export": torch_path})
        parity = version_parity(registry, mv, inputs={reference.INPUT_NAME: held_out})
        mv = registry.update(args.model, mv.version, metrics=parity)
        print("parity torch_export vs onnx: " + ", ".join(f"{k}={v:.3g}" for k, v in parity.items()))
        if args.stage != "None":
            mv = registry.promote(args.model, mv.version, args.stage)
    print(f"registered {mv!r}")
    return 0


def configure_logging(verbose: bool) -> None:
    """Our packages at INFO (DEBUG with -v); third-party libraries only at WARNING."""
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    for package in ("protocol", "producer", "registry", "experiments", "worker"):
        logging.getLogger(package).setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``streamserve`` command."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        settings = Settings().with_overrides(redis_url=args.redis_url, artifact_dir=args.artifact_dir)
        return args.func(args, settings)
    except pydantic.ValidationError as e:
        print(f"streamserve: invalid settings:\n{e}", file=sys.stderr)
    except StreamserveError as e:
        print(f"streamserve: {type(e).__name__}: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
