"""The reference model: HybridCNNLSTM on synthetic market-like series.

Everything here needs the ``train`` extra (torch, onnx). Nothing is downloaded:
the data is generated from a seeded process with a learnable signal, so a short
CPU training run reaches a stable held-out accuracy.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modeltools.synthetic import LABELS, N_FEATURES, TIMESTEPS, synthetic_dataset

INPUT_NAME = "features"
OUTPUT_NAME = "probs"
__all__ = ["LABELS", "N_FEATURES", "TIMESTEPS", "HybridCNNLSTM", "synthetic_dataset", "train"]


class HybridCNNLSTM(nn.Module):
    """Conv1d feature extractor, LSTM over time, softmax over ``LABELS``."""

    def __init__(self, n_features: int = N_FEATURES, channels: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(n_features, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.ReLU(),
        )
        self.lstm = nn.LSTM(2 * channels, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, len(LABELS))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F) float32 → (B, 3) logits."""
        h = self.conv(x.transpose(1, 2)).transpose(1, 2)
        _, (h_n, _) = self.lstm(h)
        return self.head(h_n[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)


@dataclass(frozen=True)
class TrainResult:
    """What one training run produced."""

    model: HybridCNNLSTM
    accuracy: float
    train_seconds: float
    n_train: int
    n_test: int


def train(
    *, n_train: int = 6000, n_test: int = 2000, epochs: int = 4, seed: int = 0, progress=None
) -> TrainResult:
    """Train on CPU for a few epochs and report held-out accuracy."""
    torch.manual_seed(seed)
    x_train, y_train = synthetic_dataset(n_train, seed)
    x_test, y_test = synthetic_dataset(n_test, seed + 1)
    model = HybridCNNLSTM()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n_train)
        for start in range(0, n_train, 64):
            idx = order[start : start + 64]
            optimizer.zero_grad()
            loss_fn(model.logits(xt[idx]), yt[idx]).backward()
            optimizer.step()
        if progress is not None:
            progress(epoch + 1, epochs)
    accuracy = evaluate(model, x_test, y_test)
    return TrainResult(model, accuracy, time.perf_counter() - started, n_train, n_test)


def evaluate(model: HybridCNNLSTM, x: np.ndarray, y: np.ndarray) -> float:
    """Held-out accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(dim=-1).numpy()
    return float((predicted == y).mean())


def export_onnx(model: HybridCNNLSTM, path: Path) -> Path:
    """Export with torch.export (dynamic batch axis) and check the graph with the onnx checker."""
    import onnx

    model.eval()
    example = torch.zeros(2, TIMESTEPS, N_FEATURES)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter logs a warning per torchvision op it cannot register; we use none.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        # Tracing nn.LSTM makes torch warn about its own internals (flat weights re-assigned,
        # non-leaf .grad); the result is checked below and by the parity tests instead.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},), opset_version=18, dynamo=True, verbose=False,
            external_data=False,  # one self-contained file: the artifact is content-addressed
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def export_torch(model: HybridCNNLSTM, path: Path) -> Path:
    """A ``torch.export`` program with a dynamic batch axis: the serving fallback.

    Its weights are raw tensor bytes and its graph plain ``aten`` operators, which is what
    the worker's pickle-free loader (:mod:`worker.pt2`) accepts; the archive is read back
    that way before it is returned, so an export it would refuse fails here, not in a
    worker. (torch also writes pickled sample inputs into the archive; nothing of ours
    reads them.)
    """
    from worker.pt2 import load_program

    model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same LSTM tracing noise as export_onnx
        program = torch.export.export(model, (torch.zeros(2, TIMESTEPS, N_FEATURES),),
                                      dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    load_program(path.read_bytes())
    return path


def input_spec() -> dict[str, dict]:
    """The served input contract: name → dtype and per-sample shape."""
    return {INPUT_NAME: {"dtype": "<f4", "shape": [TIMESTEPS, N_FEATURES]}}
