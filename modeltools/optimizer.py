"""The optimizer: a version's PyTorch program → ONNX, optimized and INT8 variants, gated and timed.

For each variant it measures parity against PyTorch on held-out inputs (max
absolute difference, argmax agreement, task accuracy), rejects those below the
gate, benchmarks all of them in fresh processes (latency, throughput, file
size, resident memory), and stores the accepted ones as artifacts of the same
registry version with their numbers as metrics. Needs the ``train`` extra.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modeltools.synthetic import N_FEATURES, TIMESTEPS
from protocol.errors import ConfigError
from registry import ModelVersion, Registry

log = logging.getLogger(__name__)
REFERENCE_SPEC = {"features": {"dtype": "<f4", "shape": [TIMESTEPS, N_FEATURES]}}  # its default data's
VARIANTS = ("pytorch", "onnx_fp32", "onnx_optimized", "onnx_int8_dynamic", "onnx_int8_static")
BATCH_SIZES = (1, 8, 32)


class NotOptimizable(ConfigError, ValueError):
    """The version lacks what the optimizer starts from: a PyTorch program (and data to judge by).

    A ``ValueError`` too, as this refusal was before it had a class of its own.
    """


def require_program(mv: ModelVersion, *, data_given: bool = True) -> None:
    """``NotOptimizable`` (one line, saying what is needed) unless ``mv`` can be optimized.

    The variants are built from the version's ``torch_export`` artifact; without ``data_given``
    only the reference model's synthetic data can judge them, so the version must take its inputs.
    """
    needs = ("a PyTorch export program (.pt2) registered as its torch_export artifact "
             "(`registry register ... --alternate torch_export=model.pt2`) and a data file "
             "(--data FILE.npz with x_test, y_test and x_calib)")
    if "torch_export" not in mv.alternates:
        raise NotOptimizable(f"{mv.name} {mv.title} has no torch_export artifact to optimize from: "
                             f"optimize needs {needs}")
    shapes = {n: (s.get("dtype"), s.get("shape")) for n, s in mv.input_spec.items()}
    if not data_given and shapes != {n: (s["dtype"], s["shape"]) for n, s in REFERENCE_SPEC.items()}:
        raise NotOptimizable(f"{mv.name} {mv.title} is not the reference model, whose synthetic data is the "
                             "default: optimize needs a data file (--data FILE.npz with x_test, y_test and "
                             "x_calib)")


@dataclass(frozen=True)
class Gate:
    """A variant must agree with PyTorch and keep its accuracy to be registered."""

    min_agreement: float = 0.99
    max_accuracy_drop_pp: float = 0.5

    def check(self, parity: dict[str, float]) -> str:
        """Empty when the variant passes, else why it does not."""
        reasons = []
        if parity["agreement"] < self.min_agreement:
            reasons.append(f"argmax agreement {parity['agreement']:.4f} < {self.min_agreement}")
        if -parity["accuracy_delta_pp"] > self.max_accuracy_drop_pp:
            drop = self.max_accuracy_drop_pp
            reasons.append(f"accuracy {parity['accuracy_delta_pp']:+.2f} pp < -{drop} pp")
        return "; ".join(reasons)


@dataclass
class EvalData:
    """Held-out inputs with labels, and a calibration sample of the training data."""

    x_test: np.ndarray
    y_test: np.ndarray
    x_calib: np.ndarray


@dataclass
class VariantResult:
    """Everything measured for one variant."""

    name: str
    path: Path
    fmt: str
    size_bytes: int
    parity: dict[str, float] = field(default_factory=dict)
    bench: dict[str, dict[str, float]] = field(default_factory=dict)
    rss_delta_mb: float = 0.0
    rejected: str = ""

    def metrics(self) -> dict[str, float]:
        """Flat version metrics: ``<variant>.<measure>``."""
        flat = {f"{self.name}.{k}": v for k, v in self.parity.items()}
        for batch, numbers in self.bench.items():
            flat |= {f"{self.name}.b{batch}_{k}": v for k, v in numbers.items()}
        return flat | {f"{self.name}.size_bytes": float(self.size_bytes),
                       f"{self.name}.rss_delta_mb": self.rss_delta_mb}


# ---- building ------------------------------------------------------------------------------

def build_variants(program_path: Path, workdir: Path, input_name: str, output_name: str,
                   x_calib: np.ndarray) -> dict[str, Path]:
    """ONNX FP32 (torch.export → ONNX, checked), ORT-optimized, INT8 dynamic, INT8 static QDQ."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    workdir.mkdir(parents=True, exist_ok=True)
    fp32 = _export_onnx(program_path, workdir / "fp32.onnx", input_name, output_name, x_calib.shape[1:])
    pre = workdir / "pre.onnx"
    quant_pre_process(str(fp32), str(pre))  # shape inference + folding: what the quantizers expect
    paths = {"onnx_fp32": fp32, "onnx_optimized": _ort_optimized(fp32, workdir / "optimized.onnx"),
             "onnx_int8_dynamic": workdir / "int8_dynamic.onnx",
             "onnx_int8_static": workdir / "int8_static.onnx"}
    quantize_dynamic(str(pre), str(paths["onnx_int8_dynamic"]), weight_type=QuantType.QInt8)
    quantize_static(str(pre), str(paths["onnx_int8_static"]), _Calibration(input_name, x_calib),
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                    per_channel=True)
    return paths


def _export_onnx(program_path: Path, out: Path, input_name: str, output_name: str, sample_shape) -> Path:
    import onnx
    import torch

    from worker.pt2 import load_program

    program = load_program(program_path.read_bytes())  # never torch.export.load: it unpickles
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter noise about LSTM internals; checked below
        torch.onnx.export(program, (torch.zeros(2, *sample_shape),), str(out), input_names=[input_name],
                          output_names=[output_name], dynamo=True, external_data=False, verbose=False,
                          opset_version=18)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    return out


def _ort_optimized(source: Path, out: Path) -> Path:
    """Graph optimizations applied once and saved. EXTENDED, not ALL: ALL adds layout
    transformations tied to this CPU, which ONNX Runtime advises against saving."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return out


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over a numpy sample, 16 rows a batch."""

    def __init__(self, input_name: str, x: np.ndarray) -> None:
        self._batches = iter([{input_name: x[i:i + 16]} for i in range(0, len(x), 16)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


# ---- measuring -----------------------------------------------------------------------------

def _backend(path: Path, fmt: str, output_name: str):
    from worker.backend import OnnxBackend, TorchExportBackend

    if fmt == "torch_export":
        return TorchExportBackend(path, output_names=[output_name], intra_op_threads=1)
    return OnnxBackend(path, intra_op_threads=1)


def parity(probs: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """How a variant's outputs compare with PyTorch's on the same held-out inputs."""
    accuracy = float(np.mean(probs.argmax(axis=1) == labels))
    reference_accuracy = float(np.mean(reference.argmax(axis=1) == labels))
    return {"max_abs_diff": float(np.max(np.abs(probs - reference))),
            "agreement": float(np.mean(probs.argmax(axis=1) == reference.argmax(axis=1))),
            "accuracy": accuracy, "accuracy_delta_pp": 100 * (accuracy - reference_accuracy)}


def predict_all(backend, input_name: str, output_name: str, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Outputs for ``x`` in chunks."""
    return np.concatenate([backend.run({input_name: x[i:i + batch]})[output_name]
                           for i in range(0, len(x), batch)])


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _bench_child(path: str, fmt: str, names: tuple[str, str], sample_shape: tuple, batch_sizes: tuple,
                 seconds: float, out: mp.Queue) -> None:
    if fmt == "torch_export":
        import torch  # imported before the RSS baseline, so the delta is the model's

        torch.set_num_threads(1)
    else:
        import onnxruntime  # noqa: F401
    before = _rss_mb()
    backend = _backend(Path(path), fmt, names[1])
    x = np.random.default_rng(0).standard_normal((max(batch_sizes), *sample_shape)).astype(np.float32)
    backend.run({names[0]: x[:1]})
    result: dict[str, Any] = {"rss_delta_mb": _rss_mb() - before, "bench": {}}
    for batch in batch_sizes:
        for _ in range(3):
            backend.run({names[0]: x[:batch]})
        times: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 5:
            t0 = time.perf_counter()
            backend.run({names[0]: x[:batch]})
            times.append(time.perf_counter() - t0)
        ms = np.array(times) * 1000
        result["bench"][str(batch)] = {"p50_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)),
                                       "throughput_rps": batch * len(ms) / (ms.sum() / 1000)}
    out.put(result)


def benchmark(path: Path, fmt: str, names: tuple[str, str], sample_shape: tuple, batch_sizes: tuple,
              seconds: float) -> dict:
    """Latency and throughput per batch size, and the RSS a fresh process gains by loading it."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_bench_child,
                        args=(str(path), fmt, names, sample_shape, batch_sizes, seconds, out))
    child.start()
    while True:
        try:
            result = out.get(timeout=0.5)
            break
        except queue.Empty:
            if not child.is_alive():
                raise RuntimeError(f"benchmark of {path} died with exit code {child.exitcode}") from None
    child.join()
    return result


# ---- the whole run -------------------------------------------------------------------------

@dataclass
class OptimizeReport:
    """All variants of one version, what was registered, and the recommendation."""

    model: str
    version: int
    variants: list[VariantResult]
    recommended: str

    def to_json(self) -> dict:
        """The JSON document ``streamserve optimize`` writes."""
        return {"model": self.model, "version": self.version, "recommended": self.recommended,
                "variants": {v.name: {"format": v.fmt, "size_bytes": v.size_bytes, "parity": v.parity,
                                      "bench": v.bench, "rss_delta_mb": v.rss_delta_mb,
                                      "accepted": not v.rejected, "rejected": v.rejected}
                             for v in self.variants}}


def optimize(registry: Registry, mv: ModelVersion, data: EvalData, workdir: Path, *,
             gate: Gate = Gate(), batch_sizes: tuple[int, ...] = BATCH_SIZES, seconds: float = 1.0,
             extra: dict[str, Path] | None = None,
             progress: Callable[[str], None] = lambda _msg: None) -> OptimizeReport:
    """Build, check, time and register the variants of ``mv`` (which needs a torch_export artifact).

    ``extra`` adds ready-made ONNX variants to judge alongside (e.g. a hand-edited graph).
    """
    require_program(mv)
    input_name, output_name = next(iter(mv.input_spec)), mv.output_names[0]
    # A private copy of the verified bytes: later reads cannot see a file swapped after the check.
    workdir.mkdir(parents=True, exist_ok=True)
    program = workdir / "program.pt2"
    program.write_bytes(registry.artifact_bytes(mv, "torch_export"))
    progress("exporting and quantizing")
    paths = {"pytorch": program, **build_variants(program, workdir, input_name, output_name, data.x_calib),
             **(extra or {})}
    progress("PyTorch reference outputs on held-out data")
    reference = predict_all(_backend(program, "torch_export", output_name), input_name, output_name,
                            data.x_test)
    results = []
    for name, path in paths.items():
        fmt = "torch_export" if name == "pytorch" else "onnx"
        progress(f"{name}: parity and benchmark")
        result = VariantResult(name, path, fmt, path.stat().st_size)
        probs = predict_all(_backend(path, fmt, output_name), input_name, output_name, data.x_test)
        result.parity = parity(probs, reference, data.y_test)
        result.rejected = "" if name == "pytorch" else gate.check(result.parity)
        timing = benchmark(path, fmt, (input_name, output_name), data.x_test.shape[1:], batch_sizes, seconds)
        result.bench, result.rss_delta_mb = timing["bench"], timing["rss_delta_mb"]
        results.append(result)
    _register(registry, mv, results)
    accepted = [r for r in results if not r.rejected]
    recommended = min(accepted, key=lambda r: r.bench[str(min(batch_sizes))]["p50_ms"]).name
    return OptimizeReport(mv.name, mv.version, results, recommended)


def _register(registry: Registry, mv: ModelVersion, results: list[VariantResult]) -> None:
    for result in results:
        if result.name == "pytorch":  # already stored as the torch_export artifact
            registry.update(mv.name, mv.version, metrics=result.metrics())
        elif not result.rejected:
            # Golden outputs come from the FP32 model; a quantized variant is held to the
            # difference it showed on the held-out set, with room to spare.
            atol = max(mv.golden_atol, 2 * result.parity["max_abs_diff"])
            registry.add_variant(mv.name, mv.version, result.name, result.path, fmt="onnx",
                                 metrics=result.metrics(), parity=result.parity, golden_atol=atol)
