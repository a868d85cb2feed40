"""``streamserve train`` and ``streamserve optimize NAME VERSION`` (torch: the ``train`` extra)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from modeltools.optimizer import EvalData
from protocol import connection
from protocol.settings import Settings

if TYPE_CHECKING:
    from rich.console import Console

    from modeltools.reference import Step


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``optimize``."""
    p = subparsers.add_parser("train", help="train the reference model on synthetic data, register it")
    p.add_argument("--model", help="registry name (default: the `model` setting)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--n-train", type=int, default=6000)
    p.add_argument("--n-test", type=int, default=2000, help="held-out samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: the cores this process may use)")
    p.add_argument("--stage", default="Production", choices=["None", "Staging", "Production"])
    p.set_defaults(func=_train)
    p = subparsers.add_parser("optimize", help="ONNX / optimized / INT8 variants of a version, "
                              "parity-gated, benchmarked, registered")
    p.add_argument("name")
    p.add_argument("version", help="number, alias or label; the version needs a torch_export (.pt2) artifact")
    p.add_argument("--data", type=Path, help="npz with x_test, y_test, x_calib (default: the reference "
                   "model's synthetic data, regenerated from the version's seed)")
    p.add_argument("--min-agreement", type=float, default=0.99)
    p.add_argument("--max-accuracy-drop-pp", type=float, default=0.5)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--seconds", type=float, default=1.0, help="timing per variant and batch size")
    p.add_argument("--variant", help="then serve this variant: 'recommended' or a name "
                   "(also later: `streamserve registry variant NAME VERSION VARIANT`)")
    p.add_argument("--out", type=Path, default=Path("optimize-results.json"))
    p.set_defaults(func=_optimize)


def _train(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console

    from modeltools.train import train_and_register

    with TrainingBars(Console(), "training HybridCNNLSTM") as bars:
        mv = train_and_register(settings, args.model or settings.model, epochs=args.epochs,
                                n_train=args.n_train, n_test=args.n_test, seed=args.seed, stage=args.stage,
                                threads=args.threads, progress=bars.step, status=bars.status)
    print(f"registered {mv!r}")
    return 0


class TrainingBars:
    """Rich bars for one training run: epochs, and batches within the epoch so that a slow machine
    still shows movement; then a spinner per export and registration step.

    Drawn only on a terminal: piped to a file, the caller's own lines say what happened.
    """

    def __init__(self, console: Console, label: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True,
                                 disable=not console.is_terminal)
        self.label = label
        self.epochs = self.progress.add_task(f"{label}: generating the data", total=None)
        self.batches = self.progress.add_task("batches", total=None, visible=False)
        self.after = self.progress.add_task("", total=None, visible=False)

    def step(self, s: Step) -> None:
        """After each batch (``train``'s ``progress``)."""
        self.progress.update(self.epochs, description=f"{self.label}: epochs", total=s.epochs,
                             completed=s.epoch - 1 + (s.batch == s.batches))
        self.progress.update(self.batches, description=f"epoch {s.epoch}: batches", total=s.batches,
                             completed=s.batch, visible=True)

    def status(self, what: str) -> None:
        """A step after training (``train_and_register``'s ``status``)."""
        self.progress.update(self.epochs, visible=False)
        self.progress.update(self.batches, visible=False)
        self.progress.update(self.after, description=f"{self.label}: {what}", visible=True)

    def __enter__(self) -> TrainingBars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def reference_data(mv) -> EvalData:
    """The reference model's held-out set and a calibration sample of its training data."""
    from modeltools import reference

    seed, n_test = int(mv.metrics.get("seed", 0)), int(mv.metrics.get("n_test", 2000))
    x_test, y_test = reference.synthetic_dataset(n_test, seed + 1)  # what `train` held out
    x_train, _ = reference.synthetic_dataset(int(mv.metrics.get("n_train", 6000)), seed)
    sample = np.random.default_rng(seed).choice(len(x_train), size=min(256, len(x_train)), replace=False)
    return EvalData(x_test, y_test, x_train[sample])


def _optimize(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from modeltools.optimizer import Gate, optimize, require_program
    from registry import Registry

    console = Console()
    gate = Gate(args.min_agreement, args.max_accuracy_drop_pp)
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    with connection.connect(settings.redis_url) as client, tempfile.TemporaryDirectory() as tmp:
        registry = Registry(client, settings.artifact_dir, control_secret=settings.control_secret)
        mv = registry.resolve(args.name, args.version)
        require_program(mv, data_given=args.data is not None)  # before any data is made: one line
        data = EvalData(**dict(np.load(args.data, allow_pickle=False))) if args.data else reference_data(mv)
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("optimizing", total=None)
            report = optimize(registry, mv, data, Path(tmp), gate=gate, batch_sizes=sizes,
                              seconds=args.seconds, progress=lambda m: bar.update(task, description=m))
        if args.variant:
            variant = report.recommended if args.variant == "recommended" else args.variant
            variant = "torch_export" if variant == "pytorch" else variant
            registry.select_variant(args.name, mv.version, variant, reason=f"optimize --variant {variant}")
    args.out.write_text(json.dumps(report.to_json(), indent=2))
    print_table(console, report, sizes)
    console.print(f"recommended (lowest B={min(sizes)} p50 among accepted): {report.recommended}")
    if args.variant:
        console.print(f"serving variant: {variant}")
    console.print(f"wrote {args.out}")
    return 0


def _status(v) -> str:
    if v.name == "pytorch":
        return "reference"
    return f"REJECTED: {v.rejected}" if v.rejected else "registered"


def print_table(console, report, sizes: tuple[int, ...]) -> None:
    """One row per variant: parity, latency and throughput per batch size, size, memory."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report.model} v{report.version}: variants, 1 thread each "
                        f"(p50 ms / throughput per s; p95 in the JSON)")
    for col in ("variant", "agree", "acc Δpp", "max |Δ|", *[f"B={b}" for b in sizes], "KB", "RSS MB",
                "status"):
        table.add_column(col, justify="left" if col in ("variant", "status") else "right")
    for v in report.variants:
        p, b = v.parity, v.bench
        table.add_row(
            v.name, f"{p['agreement']:.4f}", f"{p['accuracy_delta_pp']:+.2f}", f"{p['max_abs_diff']:.1e}",
            *[f"{b[str(s)]['p50_ms']:.2f} / {b[str(s)]['throughput_rps']:.0f}" for s in sizes],
            f"{v.size_bytes / 1024:.0f}", f"{v.rss_delta_mb:.1f}", _status(v))
    wide = console if console.width >= 140 else Console(width=140)  # e.g. piped to a file
    wide.print(table)
