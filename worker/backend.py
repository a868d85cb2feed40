"""Model backends: load a verified artifact, check it against the input spec, run batches.

Each backend takes the artifact's bytes (the bytes whose sha256 the registry checked,
so nothing can swap the file between the check and the load) or, for tools working
on their own files, a path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from protocol.errors import ConfigError
from worker.pt2 import load_program

MAX_ERROR_CHARS = 300  # errors quote artifact content; they go to logs and the heartbeat


class Backend(Protocol):
    """What the worker needs from a loaded model."""

    name: str

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Batched inputs (leading axis = rows) → outputs with the same leading axis."""
        ...

    def stage(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """Where to assemble input ``name`` of the next batch, or None for a fresh array."""
        ...


class OnnxBackend:
    """ONNX Runtime with a bounded intra-op thread pool (one worker per core); CUDA on request."""

    name = "onnxruntime"

    def __init__(self, source: Path | bytes, *, intra_op_threads: int = 1, device: str = "cpu") -> None:
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
            model = source if isinstance(source, bytes) else str(source)
            self.session = ort.InferenceSession(model, options, providers=providers)
        except Exception as e:  # ORT raises its own untyped errors for bad files
            raise ConfigError(f"ONNX Runtime cannot load {_label(source)}: {_short(e)}") from e
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One session.run for the whole batch."""
        values = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, values, strict=True))

    def stage(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """None: ONNX Runtime copies host arrays itself (to the device with the CUDA provider)."""
        return None


class TorchExportBackend:
    """A ``torch.export`` program (``.pt2``) read by :mod:`worker.pt2`, on the CPU or CUDA.

    Nothing in the archive is unpickled or run as Python: weights are raw bytes, the
    graph may call ``aten`` operators only, and an archive holding anything else is
    refused. The fallback when a version's ONNX artifact cannot load. Needs the
    ``train`` extra (torch); outputs are matched to ``output_names`` in order.
    """

    def __init__(self, source: Path | bytes, *, output_names: list[str], intra_op_threads: int = 1,
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
            program = load_program(source if isinstance(source, bytes) else source.read_bytes())
        except Exception as e:  # refusals, and the many unrelated types torch raises for a bad graph
            raise ConfigError(f"torch cannot load {_label(source)}: {_short(e)}") from e
        if cuda:
            # Tensors the graph creates itself (an LSTM's initial state) carry the export
            # device; .to() would move only the weights. Rewrite the graph's devices instead.
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, self.device)
        # Inputs checked by a pre-hook, not by a guard function generated as Python source and
        # exec'd: the archive's own guard code is refused already, and none is derived from it.
        self.module = program.module(check_guards=False)
        self.output_names = output_names
        self._torch = torch
        # CUDA: per input, page-locked host memory the batch is assembled in, grown to the largest
        # batch so far (rows ≤ max_batch, or one request's max_request_rows): one buffer per input.
        self._pinned: dict[str, Any] = {}

    def stage(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """On CUDA, a view of pinned host memory to assemble the batch in: the copy to the device is
        then one DMA, started without waiting, instead of a staging copy first. None on the CPU."""
        if self.device.type != "cuda":
            return None
        torch, size = self._torch, int(np.prod(shape))
        buffer = self._pinned.get(name)
        if buffer is None or buffer.numel() < size or buffer.numpy().dtype != dtype:
            like = torch.from_numpy(np.empty(0, dtype))
            buffer = self._pinned[name] = torch.empty(size, dtype=like.dtype, pin_memory=True)
        return buffer[:size].numpy().reshape(shape)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass over the batch, without autograd (inputs copied to the device).

        From pinned memory (``stage``) the copies run asynchronously on the device's stream,
        ahead of the kernels that use them; reading the outputs back waits for all of it, so a
        staged buffer is free again when this returns.
        """
        torch = self._torch
        with torch.inference_mode():
            tensors = (torch.from_numpy(np.ascontiguousarray(a)).to(self.device, non_blocking=True)
                       for a in inputs.values())
            result = self.module(*tensors)
        values = result if isinstance(result, tuple | list) else (result,)
        return {n: v.cpu().numpy() for n, v in zip(self.output_names, values, strict=True)}


def _label(source: Path | bytes) -> str:
    return "the artifact" if isinstance(source, bytes) else str(source)


def _short(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "…"


def _use_cuda(device: str, available: bool, missing: str) -> bool:
    """Resolve ``cpu`` / ``cuda`` / ``auto`` against what the runtime offers."""
    if device == "cuda" and not available:
        raise ConfigError(f"device=cuda requested but {missing}")
    return device in ("cuda", "auto") and available
