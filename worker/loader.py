"""Resolve model → Production version → verified artifact → backend."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from protocol.errors import ConfigError, StreamserveError
from protocol.settings import Settings
from registry import PRIMARY, ModelVersion, Registry
from worker.backend import Backend, OnnxBackend, TorchExportBackend
from worker.cache import measure_load
from worker.inputs import InputSpec

log = logging.getLogger(__name__)
WARMUP_RUNS = 3
# One load at a time in a process: a model's size is the RSS its load added, which only means
# something when no other load grows the process meanwhile (Ray Serve's multiplexer does the same).
LOAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class LoadedModel:
    """A version ready to serve: registry record, backend, input contract, and why a fallback."""

    version: ModelVersion
    backend: Backend
    spec: InputSpec
    variant: str = PRIMARY
    fallback_reason: str = ""


def open_backend(source: Path | bytes, fmt: str, mv: ModelVersion, intra_op_threads: int,
                 device: str = "cpu") -> Backend:
    """The backend for one artifact (its verified bytes, or a path) and format, on ``device``."""
    if fmt == "onnx":
        return OnnxBackend(source, intra_op_threads=intra_op_threads, device=device)
    if fmt == "torch_export":
        return TorchExportBackend(source, output_names=mv.output_names, intra_op_threads=intra_op_threads,
                                  device=device)
    raise ConfigError(f"{mv!r}: format {fmt!r} has no backend")


def load_version(registry: Registry, mv: ModelVersion, settings: Settings) -> LoadedModel:
    """Load the first format that works (ONNX first, then the fallbacks), each fully checked.

    Every format is verified (sha256), warmed up and, when the version has golden
    outputs, checked against them; the first failure is kept as the fallback reason.
    Each error names the version and variant (``m v3 torch_export: …``).
    """
    errors: list[StreamserveError] = []
    for variant in mv.load_order:
        try:
            loaded = _load_variant(registry, mv, variant, settings)
        except StreamserveError as e:
            errors.append(e)
            log.warning("%s v%s: variant %s not servable: %s", mv.name, mv.version, variant, e)
            continue
        return replace(loaded, fallback_reason="; ".join(map(str, errors)))
    if len(errors) == 1:
        raise errors[0]
    raise ConfigError(f"{mv.name} v{mv.version}: no format could be served ({' | '.join(map(str, errors))})")


def _load_variant(registry: Registry, mv: ModelVersion, variant: str, settings: Settings) -> LoadedModel:
    # One read: the bytes whose sha256 is checked are the bytes loaded (raises ArtifactIntegrityError,
    # naming the version and variant, on a mismatch or a location outside the artifact directory).
    data = registry.artifact_bytes(mv, variant)
    try:
        return _open_checked(data, mv, variant, registry, settings)
    except ConfigError as e:
        # Same class (GoldenCheckFailed stays one), message prefixed with what failed to load.
        raise type(e)(f"{mv.name} v{mv.version} {variant}: {e}") from e


def _open_checked(data: bytes, mv: ModelVersion, variant: str, registry: Registry,
                  settings: Settings) -> LoadedModel:
    backend = open_backend(data, mv.variant_format(variant), mv, settings.intra_op_threads, settings.device)
    spec = InputSpec(mv.input_spec)
    warm = {n: np.zeros((1, *shape), dtype=dt) for n, (dt, shape) in spec.fields.items()}
    for _ in range(WARMUP_RUNS):
        backend.run(warm)
    if mv.golden:
        atol = mv.alternates.get(variant, {}).get("golden_atol", mv.golden_atol)
        check_golden(backend, registry.golden(mv), atol)
    log.info("loaded %r (variant %s)", mv, variant)
    return LoadedModel(mv, backend, spec, variant)


# Relative to each expected value, beside the registered absolute tolerance: another CPU's or a
# GPU's summation order moves an output of size 700 by about 1e-3 (a softmax's by far less than atol).
GOLDEN_RTOL = 1e-4


def check_golden(backend: Backend, golden: dict[str, np.ndarray], atol: float) -> None:
    """Run the golden inputs; every expected output must match within ``atol + GOLDEN_RTOL·|expected|``."""
    inputs = {k.removeprefix("input:"): v for k, v in golden.items() if k.startswith("input:")}
    outputs = backend.run(inputs)
    for key, expected in golden.items():
        if not key.startswith("output:"):
            continue
        name = key.removeprefix("output:")
        got = outputs.get(name)
        if got is None or got.shape != expected.shape:
            raise GoldenCheckFailed(f"golden output {name!r}: missing or shape mismatch")
        excess = np.abs(got - expected) - GOLDEN_RTOL * np.abs(expected)
        worst = float(np.max(excess)) if got.size else 0.0
        if not worst <= atol:  # NaN fails too
            raise GoldenCheckFailed(f"golden output {name!r} differs by {worst:.3g} beyond "
                                    f"{GOLDEN_RTOL:g} of its values, > atol {atol:g}")


def version_parity(registry: Registry, mv: ModelVersion, *, inputs: dict[str, np.ndarray] | None = None,
                   rows: int = 64, intra_op_threads: int = 1) -> dict[str, float]:
    """Output parity of every alternate format against the primary, as version metrics.

    ``inputs`` default to seeded standard-normal samples shaped by the input spec.
    Per alternate: ``parity_<fmt>_max_abs_diff`` and ``parity_<fmt>_argmax_agreement``.
    """
    spec = InputSpec(mv.input_spec)
    if inputs is None:
        rng = np.random.default_rng(0)
        inputs = {n: rng.standard_normal((rows, *shape)).astype(dt) for n, (dt, shape) in spec.fields.items()}
    reference = open_backend(registry.artifact_bytes(mv), mv.format, mv, intra_op_threads).run(inputs)
    metrics: dict[str, float] = {}
    for fmt in mv.alternates:
        other = open_backend(registry.artifact_bytes(mv, fmt), mv.variant_format(fmt), mv,
                             intra_op_threads).run(inputs)
        first = mv.output_names[0]
        metrics[f"parity_{fmt}_max_abs_diff"] = max(
            float(np.max(np.abs(reference[n] - other[n]))) for n in mv.output_names)
        metrics[f"parity_{fmt}_argmax_agreement"] = float(
            np.mean(reference[first].argmax(axis=-1) == other[first].argmax(axis=-1)))
    return metrics


def make_golden(path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Golden inputs plus what ONNX Runtime outputs for them, to register with a version."""
    outputs = OnnxBackend(path).run(inputs)
    return {**{f"input:{k}": v for k, v in inputs.items()}, **{f"output:{k}": v for k, v in outputs.items()}}


class GoldenCheckFailed(ConfigError):
    """The loaded model does not reproduce the outputs recorded with its version."""


class Reloader:
    """Loads a new version beside the served one, in a background thread.

    The worker asks for a target with :meth:`request` and, between batches,
    swaps in whatever :meth:`take_ready` returns; in-flight batches finish on
    the old version. A failed load leaves the old version serving and is kept
    in ``failures`` (version → reason) for the heartbeat.
    """

    def __init__(self, load: Callable[[ModelVersion], LoadedModel]) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._ready: LoadedModel | None = None
        self.loading: tuple[int, str] | None = None  # (version, serving variant)
        self.failures: dict[int, str] = {}
        self.last_size_bytes, self.last_load_ms = 0, 0.0  # of the last load that worked (measure_load)

    def request(self, target: ModelVersion) -> None:
        """Start loading ``target`` unless it is loading already."""
        with self._lock:
            if self.loading == (target.version, target.serving_variant):
                return
            self.loading = (target.version, target.serving_variant)
        threading.Thread(target=self._run, args=(target,), name=f"load-v{target.version}",
                         daemon=True).start()

    def _run(self, target: ModelVersion) -> None:
        try:
            loaded, size_bytes, load_ms = measured(lambda: self._load(target))
        except Exception as e:  # any load failure must leave the old version serving
            log.error("cannot load %s v%s: %s", target.name, target.version, e)
            with self._lock:
                self.failures[target.version] = f"{type(e).__name__}: {e}"
                self.loading = None
            return
        with self._lock:
            self._ready, self.loading = loaded, None
            self.last_size_bytes, self.last_load_ms = size_bytes, load_ms
            self.failures.pop(target.version, None)

    def discard(self) -> None:
        """Drop a loaded model not yet taken (the model was evicted meanwhile)."""
        with self._lock:
            self._ready = None


    def take_ready(self) -> LoadedModel | None:
        """The loaded model waiting to be swapped in, if any (only once)."""
        with self._lock:
            ready, self._ready = self._ready, None
            return ready


def measured(load: Callable[[], LoadedModel]) -> tuple[LoadedModel, int, float]:
    """``load()`` under :data:`LOAD_LOCK`, with the RSS it added (bytes) and its duration (ms)."""
    with LOAD_LOCK:
        return measure_load(load)
