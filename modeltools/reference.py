"""The reference model: HybridCNNLSTM on synthetic market-like series.

Everything here needs the ``train`` extra (torch, onnx). Nothing is downloaded:
the data is generated from a seeded process with a learnable signal, so a short
CPU training run reaches a stable held-out accuracy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modeltools.synthetic import LABELS, N_FEATURES, TIMESTEPS, synthetic_dataset

INPUT_NAME = "features"
OUTPUT_NAME = "probs"
BATCH_SIZE = 64
__all__ = ["LABELS", "N_FEATURES", "TIMESTEPS", "HybridCNNLSTM", "Step", "available_cores", "bound_threads",
           "synthetic_dataset", "train"]


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


@dataclass(frozen=True)
class Step:
    """Where a training run is: after ``batch`` of ``batches`` in epoch ``epoch`` (1-based) of ``epochs``."""

    epoch: int
    epochs: int
    batch: int
    batches: int


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, bounded by a cgroup CPU quota when there is one.

    ``os.cpu_count()`` and torch's default thread count see the host's cores, which in a container
    can be many more than its quota lets it use.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota_cores()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_quota_cores() -> int | None:
    """The cgroup CPU quota in whole cores (v2 ``cpu.max``, v1 ``cfs_quota_us``); None when unlimited."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, int(quota) // int(period))
    with contextlib.suppress(OSError, ValueError):
        v1 = Path("/sys/fs/cgroup/cpu")
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        return None if quota_us <= 0 else max(1, quota_us // int((v1 / "cpu.cfs_period_us").read_text()))
    return None


def bound_threads(limit: int | None = None) -> int:
    """Let torch use at most ``limit`` threads (default: the available cores) and never more than those.

    torch starts one intra-op thread per core it sees; more threads than the cores this process
    actually gets only queue behind each other and wait at every parallel region's barrier for
    whichever was preempted, which on a busy machine makes training slower, not faster.
    """
    n = max(1, min(limit or available_cores(), available_cores()))
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # fixed once any inter-op work ran: a second training
        torch.set_num_interop_threads(n)
    return n


def train(
    *, n_train: int = 6000, n_test: int = 2000, epochs: int = 4, seed: int = 0, threads: int | None = None,
    progress: Callable[[Step], object] | None = None,
) -> TrainResult:
    """Train on CPU (at most ``threads`` threads) and report held-out accuracy; ``progress`` per batch."""
    bound_threads(threads)
    torch.manual_seed(seed)
    x_train, y_train = synthetic_dataset(n_train, seed)
    x_test, y_test = synthetic_dataset(n_test, seed + 1)
    model = HybridCNNLSTM()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    batches = -(-n_train // BATCH_SIZE)
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(n_train)
        for batch in range(batches):
            idx = order[batch * BATCH_SIZE : (batch + 1) * BATCH_SIZE]
            optimizer.zero_grad()
            loss_fn(model.logits(xt[idx]), yt[idx]).backward()
            optimizer.step()
            if progress is not None:
                progress(Step(epoch, epochs, batch + 1, batches))
    accuracy = evaluate(model, x_test, y_test)
    return TrainResult(model, accuracy, time.perf_counter() - started, n_train, n_test)


def evaluate(model: HybridCNNLSTM, x: np.ndarray, y: np.ndarray) -> float:
    """Held-out accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(dim=-1).numpy()
    return float((predicted == y).mean())


def export_program(model: HybridCNNLSTM) -> torch.export.ExportedProgram:
    """``model`` traced by ``torch.export`` with a dynamic batch axis (1 to 4096 rows).

    Tracing is most of an export's cost: torch unrolls the LSTM over its 60 steps on symbolic
    shapes to learn its output's, about 10 s of one core. Both artifacts are made from one
    program (:func:`export_onnx`, :func:`export_torch`) so a registration traces once.
    """
    model.eval()
    with warnings.catch_warnings():
        # Tracing nn.LSTM makes torch warn about its own internals (flat weights re-assigned,
        # non-leaf .grad); the result is checked by the exports and by the parity tests instead.
        warnings.simplefilter("ignore")
        example = torch.zeros(2, TIMESTEPS, N_FEATURES)
        return torch.export.export(model, (example,), dynamic_shapes=_batch_axis())


def _batch_axis() -> tuple[dict[int, object]]:
    """Axis 0 of the one input is the batch, 1 to 4096 rows."""
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def export_onnx(model: HybridCNNLSTM | torch.export.ExportedProgram, path: Path) -> Path:
    """Export to ONNX (opset 18, dynamic batch axis) and check the graph with the onnx checker."""
    import onnx

    program = model if isinstance(model, torch.export.ExportedProgram) else export_program(model)
    # The exporter logs a warning per torchvision op it cannot register; we use none.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same LSTM tracing noise as export_program
        torch.onnx.export(
            program, (torch.zeros(2, TIMESTEPS, N_FEATURES),), str(path), input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], opset_version=18, dynamo=True, verbose=False,
            dynamic_shapes=_batch_axis(),  # given with a program too: it names the ONNX axis "batch"
            external_data=False,  # one self-contained file: the artifact is content-addressed
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def export_torch(model: HybridCNNLSTM | torch.export.ExportedProgram, path: Path) -> Path:
    """A ``torch.export`` program with a dynamic batch axis: the serving fallback.

    Its weights are raw tensor bytes and its graph plain ``aten`` operators, which is what
    the worker's pickle-free loader (:mod:`worker.pt2`) accepts; the archive is read back
    that way before it is returned, so an export it would refuse fails here, not in a
    worker. (torch also writes pickled sample inputs into the archive; nothing of ours
    reads them.)
    """
    from worker.pt2 import load_program

    program = model if isinstance(model, torch.export.ExportedProgram) else export_program(model)
    torch.export.save(program, str(path))
    load_program(path.read_bytes())
    return path


def input_spec() -> dict[str, dict]:
    """The served input contract: name → dtype and per-sample shape."""
    return {INPUT_NAME: {"dtype": "<f4", "shape": [TIMESTEPS, N_FEATURES]}}
