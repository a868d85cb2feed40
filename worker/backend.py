"""Model backends: load a verified artifact, check it against the input spec, run batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from protocol.errors import ConfigError, InvalidInput


class Backend(Protocol):
    """What the worker needs from a loaded model."""

    name: str

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Batched inputs (leading axis = rows) → outputs with the same leading axis."""
        ...


class OnnxBackend:
    """ONNX Runtime on CPU, with a bounded intra-op thread pool (one worker per core)."""

    name = "onnxruntime"

    def __init__(self, path: Path, *, intra_op_threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own untyped errors for bad files
            raise ConfigError(f"ONNX Runtime cannot load {path}: {e}") from e
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One session.run for the whole batch."""
        values = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, values, strict=True))


class TorchExportBackend:
    """A ``torch.export`` program (``.pt2``): graph and weights, no arbitrary pickle.

    The fallback when a version's ONNX artifact cannot load. Needs the ``train``
    extra (torch); outputs are matched to ``output_names`` in order.
    """

    name = "torch_export"

    def __init__(self, path: Path, *, output_names: list[str], intra_op_threads: int = 1) -> None:
        try:
            import torch
        except ImportError as e:
            raise ConfigError("the torch fallback needs torch installed (pip install '.[train]')") from e
        if intra_op_threads:
            torch.set_num_threads(intra_op_threads)
        try:
            self.module = torch.export.load(str(path)).module()
        except Exception as e:  # torch raises many unrelated types for a bad archive
            raise ConfigError(f"torch cannot load {path}: {e}") from e
        self.output_names = output_names
        self._torch = torch

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass over the batch, without autograd."""
        torch = self._torch
        with torch.inference_mode():
            result = self.module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs.values()))
        values = result if isinstance(result, tuple | list) else (result,)
        return {n: v.numpy() for n, v in zip(self.output_names, values, strict=True)}


class InputSpec:
    """The served version's inputs: name → (dtype, per-sample shape)."""

    def __init__(self, spec: dict[str, dict[str, Any]]) -> None:
        self.fields = {name: (np.dtype(s["dtype"]), tuple(s["shape"])) for name, s in spec.items()}

    def check(self, inputs: dict[str, np.ndarray], max_rows: int) -> None:
        """Raise ``InvalidInput`` naming the first mismatch."""
        if set(inputs) != set(self.fields):
            raise InvalidInput(f"inputs {sorted(inputs)} do not match the model's {sorted(self.fields)}")
        for name, array in inputs.items():
            dtype, shape = self.fields[name]
            if array.dtype != dtype:
                raise InvalidInput(f"input {name!r} has dtype {array.dtype.str}, expected {dtype.str}")
            if array.shape[1:] != shape:
                raise InvalidInput(
                    f"input {name!r} has per-sample shape {list(array.shape[1:])}, expected {list(shape)}"
                )
            if array.shape[0] > max_rows:
                raise InvalidInput(f"input {name!r} has {array.shape[0]} rows; limit is {max_rows}")
