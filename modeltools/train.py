"""Train the reference HybridCNNLSTM, export it (ONNX + torch.export) and register it with its metrics."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from modeltools import reference
from protocol import connection
from protocol.settings import Settings
from registry import ModelVersion, Registry
from registry.contract import check_onnx
from worker.loader import make_golden, version_parity

GOLDEN_ROWS = 8  # inputs whose outputs every load must reproduce
PARITY_ROWS = 256


def train_and_register(settings: Settings, model: str, *, epochs: int = 4, n_train: int = 6000,
                       n_test: int = 2000, seed: int = 0, stage: str = "Production",
                       threads: int | None = None,
                       progress: Callable[[reference.Step], object] | None = None,
                       status: Callable[[str], object] = lambda _what: None) -> ModelVersion:
    """Train on synthetic data (seeded), register v(n+1) with golden outputs and parity; move to ``stage``.

    ``threads`` bounds torch's threads (default: the cores available), ``progress`` hears every
    batch and ``status`` each step after training (exports, registration, parity).
    """
    result = reference.train(n_train=n_train, n_test=n_test, epochs=epochs, seed=seed, threads=threads,
                             progress=progress)
    print(f"held-out accuracy {result.accuracy:.4f} on {result.n_test} samples "
          f"(chance: {1 / len(reference.LABELS):.2f}; trained on {result.n_train} for {epochs} epochs "
          f"in {result.train_seconds:.1f} s, torch threads: {torch.get_num_threads()})")
    with tempfile.TemporaryDirectory() as tmp, connection.connect(settings.redis_url) as client:
        registry = Registry(client, settings.artifact_dir, control_secret=settings.control_secret)
        status("tracing with torch.export")
        program = reference.export_program(result.model)
        status("exporting ONNX")
        onnx_path = reference.export_onnx(program, Path(tmp) / "model.onnx")
        torch_path = reference.export_torch(program, Path(tmp) / "model.pt2")
        status("registering")
        held_out, _ = reference.synthetic_dataset(PARITY_ROWS, seed=seed + 2)
        # The same contract check as `registry register`; the golden rows are real samples instead.
        contract = check_onnx(onnx_path, reference.input_spec(), list(reference.LABELS))
        mv = registry.register(
            model, onnx_path, input_spec=contract.input_spec, output_names=contract.output_names,
            output_spec=contract.output_spec, labels=list(reference.LABELS),
            description="HybridCNNLSTM on synthetic series",
            metrics={"accuracy": result.accuracy, "train_seconds": result.train_seconds,
                     "n_train": result.n_train, "n_test": result.n_test, "seed": seed},
            golden=make_golden(onnx_path, {reference.INPUT_NAME: held_out[:GOLDEN_ROWS]}),
            alternates={"torch_export": torch_path})
        status("checking parity torch_export vs onnx")
        parity = version_parity(registry, mv, inputs={reference.INPUT_NAME: held_out})
        mv = registry.update(model, mv.version, metrics=parity)
        print("parity torch_export vs onnx: " + ", ".join(f"{k}={v:.3g}" for k, v in parity.items()))
        if stage != "None":
            mv = registry.promote(model, mv.version, stage)
    return mv
