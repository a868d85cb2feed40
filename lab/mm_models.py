"""The multi-model bench's models: many small, distinct ONNX MLPs, each fitted to data of its own.

Each model reads a (30, 16) window (``features``), flattens it to 480 values, goes through a
hidden layer of 64 ReLU units and a 3-way softmax (``probs``: down, flat, up). The hidden
layer's weights are seeded random features; the output layer is fitted by ridge least squares
to one-hot labels of the model's own synthetic data (a seeded linear teacher on the window's
time-mean). Training takes milliseconds, needs neither torch nor a download, and every model
gets different weights and golden outputs, as twenty separately trained models would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from registry import Registry
from registry.contract import register_onnx

TIMESTEPS, FEATURES, HIDDEN = 30, 16, 64
LABELS = ["down", "flat", "up"]
SAMPLE_SHAPE = (TIMESTEPS, FEATURES)
INPUT_SPEC = {"features": {"dtype": "<f4", "shape": list(SAMPLE_SHAPE)}}
OUTPUT_NAME = "probs"
TRAIN_SAMPLES = 512
RIDGE = 1e-2  # keeps the least-squares fit well conditioned with 64 features and 512 samples


def model_names(prefix: str, count: int) -> list[str]:
    """``mm_00`` … for ``count`` models (zero-padded: a name's rank sorts as its number)."""
    width = max(2, len(str(count - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


def synthetic_data(seed: int, n: int = TRAIN_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """Windows (n, 30, 16) and labels 0..2 from a seeded linear teacher on the time-mean."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, TIMESTEPS, FEATURES)).astype(np.float32)
    teacher = rng.standard_normal((FEATURES, len(LABELS)))
    return x, (x.mean(axis=1) @ teacher).argmax(axis=1)


@dataclass(frozen=True, slots=True)
class Mlp:
    """Weights of one model and its accuracy on its own training data."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    train_accuracy: float


def hidden_layer(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random ReLU features that look at the time-mean (what the labels depend on), plus
    a little per-step noise: weights (480, 64) and biases (64,)."""
    per_feature = rng.standard_normal((FEATURES, HIDDEN)) * np.sqrt(TIMESTEPS / FEATURES)
    noise = 0.02 * rng.standard_normal((TIMESTEPS * FEATURES, HIDDEN))
    return np.tile(per_feature / TIMESTEPS, (TIMESTEPS, 1)) + noise, 0.1 * rng.standard_normal(HIDDEN)


def ridge(h: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The output layer (weights, biases) fitted by ridge least squares to one-hot labels ``y``."""
    design = np.hstack([h, np.ones((len(h), 1))])
    target = np.eye(len(LABELS))[y] * 4.0 - 2.0  # logits of about ±2: a softmax that is not flat
    solution = np.linalg.solve(design.T @ design + RIDGE * np.eye(design.shape[1]), design.T @ target)
    return solution[:-1], solution[-1]


def fit(seed: int) -> Mlp:
    """Random hidden features, then the output layer by ridge least squares on the model's own data."""
    x, y = synthetic_data(seed)
    w1, b1 = hidden_layer(np.random.default_rng(seed + 10_000))  # a stream of its own: not the data's
    h = np.maximum(x.reshape(len(x), -1).astype(np.float64) @ w1 + b1, 0.0)
    w2, b2 = ridge(h, y)
    accuracy = float(((h @ w2 + b2).argmax(axis=1) == y).mean())
    f32 = np.float32
    return Mlp(w1.astype(f32), b1.astype(f32), w2.astype(f32), b2.astype(f32), accuracy)


def to_onnx(mlp: Mlp, path: Path) -> Path:
    """(B, 30, 16) → Reshape (B, 480) → MatMul + Add → Relu → MatMul + Add → Softmax ``probs``."""
    arrays = {"w1": mlp.w1, "b1": mlp.b1, "w2": mlp.w2, "b2": mlp.b2,
              "flat_shape": np.array([-1, TIMESTEPS * FEATURES], dtype=np.int64)}
    graph = helper.make_graph(
        _nodes(), "mm_mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", TIMESTEPS, FEATURES])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", len(LABELS)])],
        [numpy_helper.from_array(a, name) for name, a in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _nodes() -> list[onnx.NodeProto]:
    return [
        helper.make_node("Reshape", ["features", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["h_lin"]),
        helper.make_node("Add", ["h_lin", "b1"], ["h_pre"]),
        helper.make_node("Relu", ["h_pre"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["logits_lin"]),
        helper.make_node("Add", ["logits_lin", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=-1),
    ]


def register_models(registry: Registry, names: list[str], directory: Path, seed: int = 0) -> dict[str, float]:
    """Fit, export, register (contract check and golden outputs) and promote each of ``names``.

    Model ``i`` is fitted with seed ``seed + i``. Returns each model's training accuracy."""
    directory.mkdir(parents=True, exist_ok=True)
    accuracy = {}
    for i, name in enumerate(names):
        mlp = fit(seed + i)
        path = to_onnx(mlp, directory / f"{name}.onnx")
        mv = register_onnx(registry, name, path, input_spec=INPUT_SPEC, labels=LABELS,
                           output_names=[OUTPUT_NAME], description="multi-model bench MLP")
        registry.promote(name, mv.version)
        accuracy[name] = mlp.train_accuracy
    return accuracy
