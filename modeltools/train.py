"""Train the reference HybridCNNLSTM, export it (ONNX + torch.export) and register it with its metrics."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from modeltools import reference
from protocol import connection
from protocol.settings import Settings
from registry import ModelVersion, Registry
from worker.loader import make_golden, version_parity

GOLDEN_ROWS = 8  # inputs whose outputs every load must reproduce
PARITY_ROWS = 256


def train_and_register(settings: Settings, model: str, *, epochs: int = 4, n_train: int = 6000,
                       seed: int = 0, stage: str = "Production",
                       progress: Callable[[int, int], None] | None = None) -> ModelVersion:
    """Train on synthetic data (seeded), register v(n+1) with golden outputs and parity; move to ``stage``."""
    result = reference.train(n_train=n_train, epochs=epochs, seed=seed, progress=progress)
    print(f"held-out accuracy {result.accuracy:.4f} on {result.n_test} samples "
          f"({result.train_seconds:.1f} s on CPU)")
    with tempfile.TemporaryDirectory() as tmp, connection.connect(settings.redis_url) as client:
        registry = Registry(client, settings.artifact_dir, control_secret=settings.control_secret)
        onnx_path = reference.export_onnx(result.model, Path(tmp) / "model.onnx")
        torch_path = reference.export_torch(result.model, Path(tmp) / "model.pt2")
        held_out, _ = reference.synthetic_dataset(PARITY_ROWS, seed=seed + 2)
        mv = registry.register(
            model, onnx_path, input_spec=reference.input_spec(), output_names=[reference.OUTPUT_NAME],
            labels=list(reference.LABELS), description="HybridCNNLSTM on synthetic series",
            metrics={"accuracy": result.accuracy, "train_seconds": result.train_seconds,
                     "n_train": result.n_train, "n_test": result.n_test, "seed": seed},
            golden=make_golden(onnx_path, {reference.INPUT_NAME: held_out[:GOLDEN_ROWS]}),
            alternates={"torch_export": torch_path})
        parity = version_parity(registry, mv, inputs={reference.INPUT_NAME: held_out})
        mv = registry.update(model, mv.version, metrics=parity)
        print("parity torch_export vs onnx: " + ", ".join(f"{k}={v:.3g}" for k, v in parity.items()))
        if stage != "None":
            mv = registry.promote(model, mv.version, stage)
    return mv
