"""Model backends: load a verified artifact, check it against the input spec, run batches."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from protocol.errors import ConfigError


class Backend(Protocol):
    """What the worker needs from a loaded model."""

    name: str

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Batched inputs (leading axis = rows) → outputs with the same leading axis."""
        ...


class OnnxBackend:
    """ONNX Runtime with a bounded intra-op thread pool (one worker per core); CUDA on request."""

    name = "onnxruntime"

    def __init__(self, path: Path, *, intra_op_threads: int = 1, device: str = "cpu") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        cuda = _use_cuda(device, "CUDAExecutionProvider" in ort.get_available_providers(),
                         "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self.name = "onnxruntime-cuda" if cuda else "onnxruntime"
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # ORT raises its own untyped errors for bad files
            raise ConfigError(f"ONNX Runtime cannot load {path}: {e}") from e
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One session.run for the whole batch."""
        values = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, values, strict=True))


class TorchExportBackend:
    """A ``torch.export`` program (``.pt2``): graph and weights, no arbitrary pickle, CPU or CUDA.

    The fallback when a version's ONNX artifact cannot load. Needs the ``train``
    extra (torch); outputs are matched to ``output_names`` in order.
    """

    def __init__(self, path: Path, *, output_names: list[str], intra_op_threads: int = 1,
                 device: str = "cpu") -> None:
        try:
            import torch
        except ImportError as e:
            raise ConfigError("the torch fallback needs torch installed (pip install '.[train]')") from e
        if intra_op_threads:
            torch.set_num_threads(intra_op_threads)
        cuda = _use_cuda(device, torch.cuda.is_available(), "torch sees no CUDA device")
        self.device = torch.device("cuda" if cuda else "cpu")
        self.name = "torch_export-cuda" if cuda else "torch_export"
        try:
            program = torch.export.load(str(path))
        except Exception as e:  # torch raises many unrelated types for a bad archive
            raise ConfigError(f"torch cannot load {path}: {e}") from e
        if cuda:
            # Tensors the graph creates itself (an LSTM's initial state) carry the export
            # device; .to() would move only the weights. Rewrite the graph's devices instead.
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, self.device)
        self.module = program.module()
        self.output_names = output_names
        self._torch = torch

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass over the batch, without autograd (inputs copied to the device)."""
        torch = self._torch
        with torch.inference_mode():
            tensors = (torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in inputs.values())
            result = self.module(*tensors)
        values = result if isinstance(result, tuple | list) else (result,)
        return {n: v.cpu().numpy() for n, v in zip(self.output_names, values, strict=True)}


def _use_cuda(device: str, available: bool, missing: str) -> bool:
    """Resolve ``cpu`` / ``cuda`` / ``auto`` against what the runtime offers."""
    if device == "cuda" and not available:
        raise ConfigError(f"device=cuda requested but {missing}")
    return device in ("cuda", "auto") and available
