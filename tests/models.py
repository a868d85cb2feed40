"""Small ONNX models built in code for the tests (no torch, no training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SPEC = {"features": {"dtype": "<f4", "shape": [60, 110]}}
LABELS = ["down", "flat", "up"]


def linear_softmax(path: Path, *, seed: int = 0, slow_width: int = 0) -> Path:
    """(B, 60, 110) → mean over time → linear → softmax (B, 3) named ``probs``.

    ``slow_width`` > 0 adds a (60·110 → width → width) detour whose result is
    multiplied by zero: same outputs, seconds of compute for SIGTERM/SIGKILL tests.
    """
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((110, 3)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("ReduceMean", ["features", "axes"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "w"], ["logits"]),
    ]
    inits = [w, axes]
    if slow_width:
        nodes, inits = _add_slow_path(nodes, inits, slow_width, rng)
    nodes.append(helper.make_node("Softmax", ["logits_out" if slow_width else "logits"], ["probs"], axis=-1))
    graph = helper.make_graph(
        nodes, "test_model",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 60, 110])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _add_slow_path(nodes, inits, width, rng):
    shape = numpy_helper.from_array(np.array([0, 60 * 110], dtype=np.int64), "flat_shape")
    w1 = numpy_helper.from_array(rng.standard_normal((60 * 110, width)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), "w2")
    w3 = numpy_helper.from_array(np.zeros((width, 3), dtype=np.float32), "w3")
    nodes = nodes + [
        helper.make_node("Reshape", ["features", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["h1"]),
        *[helper.make_node("MatMul", [f"h{i}", "w2"], [f"h{i + 1}"]) for i in range(1, 40)],
        helper.make_node("MatMul", ["h40", "w3"], ["zero"]),
        helper.make_node("Add", ["logits", "zero"], ["logits_out"]),
    ]
    return nodes, inits + [shape, w1, w2, w3]


def reference_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    """What the model should answer, computed with plain numpy from the stored weights."""
    model = onnx.load(str(path))
    w = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "w")
    logits = x.mean(axis=1) @ w
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def torch_twin(onnx_path: Path, out: Path, *, perturb: float = 0.0) -> Path:
    """The same model as ``linear_softmax`` (same weights) as a torch.export ``.pt2`` program."""
    import torch

    model = onnx.load(str(onnx_path))
    w = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "w")
    weight = torch.from_numpy(w.copy() + perturb * np.random.default_rng(9).standard_normal(w.shape))

    class Twin(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(weight.float(), requires_grad=False)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return torch.softmax(features.mean(dim=1) @ self.w, dim=-1)

    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(Twin().eval(), (torch.zeros(2, 60, 110),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(out))
    return out
