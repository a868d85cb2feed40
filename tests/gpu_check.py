"""Device check, run by hand on a CUDA machine (not collected by pytest).

Exports the reference model with the local torch, then compares the
torch.export backend on CPU and on CUDA: output parity and B=1 / B=32 latency.
Writes JSON to $OUT/gpu_check.json (or stdout).
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from modeltools import reference
from worker.backend import TorchExportBackend


def timed(backend, x: np.ndarray, runs: int) -> float:
    for _ in range(5):
        backend.run({"features": x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        backend.run({"features": x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def main() -> int:
    torch.manual_seed(0)
    x, _ = reference.synthetic_dataset(256, seed=1)
    result = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    with tempfile.TemporaryDirectory() as tmp:
        program = reference.export_torch(reference.HybridCNNLSTM(), Path(tmp) / "m.pt2")
        cpu = TorchExportBackend(program, output_names=["probs"], intra_op_threads=4, device="cpu")
        gpu = TorchExportBackend(program, output_names=["probs"], device="cuda")
        auto = TorchExportBackend(program, output_names=["probs"], device="auto")
        diff = np.abs(cpu.run({"features": x})["probs"] - gpu.run({"features": x})["probs"]).max()
        result |= {"backend_names": [cpu.name, gpu.name, auto.name],
                   "max_abs_diff_cpu_vs_cuda": float(diff)}
        for batch in (1, 32, 256):
            result[f"cpu_b{batch}_p50_ms"] = timed(cpu, x[:batch], 50)
            result[f"cuda_b{batch}_p50_ms"] = timed(gpu, x[:batch], 200)
        # The worker's path on CUDA: the batch assembled in pinned host memory (BatchProcessor._call).
        staged = gpu.stage("features", x.shape, x.dtype)
        np.copyto(staged, x)
        result["staged_is_pinned"] = bool(gpu._pinned["features"].is_pinned())
        result["max_abs_diff_staged_vs_cpu"] = float(
            np.abs(gpu.run({"features": staged})["probs"] - cpu.run({"features": x})["probs"]).max())
        result["cuda_b256_staged_p50_ms"] = timed(gpu, staged, 200)
    text = json.dumps(result, indent=2)
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_check.json").write_text(text)
    print(text)
    ok = result["cuda"] and diff < 1e-4 and result["staged_is_pinned"]
    return 0 if ok and result["max_abs_diff_staged_vs_cpu"] < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
