"""The checked contract of an ONNX model, made when it is registered.

:func:`check_onnx` loads the model with ONNX Runtime in the registering process,
so that a model that cannot serve its spec is refused before any worker sees it:
it compares every graph input's name, dtype and per-sample shape with the given
input spec, or infers the spec from the graph when none is given, runs a seeded
sample batch of :data:`SAMPLE_ROWS` rows through it, and checks that every output
keeps the batch axis and that the labels fit the first output. The result is the
version's :class:`Contract`: the input and output specs, the output names in graph
order, and golden inputs and outputs that every worker reproduces before it serves
the version (``worker.loader.check_golden``).

Every refusal is a :class:`ContractError` with one line naming the input or output
and both values. ONNX Runtime is imported here only when a check runs, so the
registry imports without it.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from protocol import codec
from protocol.errors import InvalidInput, RegistryError

if TYPE_CHECKING:
    from registry.store import ModelVersion, Registry

SAMPLE_ROWS = 2  # two, not one: a batch axis the graph fixes at 1 fails here, not in a worker
SAMPLE_SEED = 0
MAX_DETAIL_CHARS = 300  # ONNX Runtime's messages quote graph content and span lines
# ONNX Runtime's tensor element types → numpy wire dtypes (protocol.codec.DTYPES); others are refused.
ONNX_DTYPES = {
    "float": "<f4", "double": "<f8", "float16": "<f2", "int8": "|i1", "int16": "<i2", "int32": "<i4",
    "int64": "<i8", "uint8": "|u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "bool": "|b1",
}
_TENSOR = re.compile(r"tensor\((\w+)\)")

Dim = int | str | None  # ONNX Runtime's view of an axis: fixed, symbolic (named) or unknown


class ContractError(RegistryError):
    """The model does not fit its input spec, its labels or the serving contract (one line)."""


@dataclass(frozen=True)
class Contract:
    """What registration checked: the specs a worker serves and the outputs it must reproduce.

    ``input_spec``: name → ``{"dtype": "<f4", "shape": [per-sample dims]}``;
    ``output_spec``: name → ``{"dtype", "shape", "kind"}``, kind ``probabilities`` for the first
    output of a version with labels, else ``value``; ``output_names`` in graph order; ``golden``:
    ``input:<name>`` / ``output:<name>`` → arrays, as :meth:`Registry.register` takes them.
    """

    input_spec: dict[str, dict[str, Any]]
    output_spec: dict[str, dict[str, Any]]
    output_names: list[str]
    golden: dict[str, np.ndarray]


def check_onnx(path: Path, input_spec: dict | None, labels: list[str] | None = None) -> Contract:
    """Load ``path`` with ONNX Runtime, check it against ``input_spec`` (or infer one) and ``labels``.

    Raises :class:`ContractError` (one line) on any mismatch, ``RegistryError`` when ``path`` is
    not a file; nothing is stored.
    """
    session = _session(Path(path))
    graph = {arg.name: _graph_input(arg.name, arg.type, arg.shape) for arg in session.get_inputs()}
    for arg in session.get_outputs():
        _wire_dtype(f"output {arg.name!r}", arg.type)
    spec = infer_spec(graph) if input_spec is None else match_spec(input_spec, graph)
    inputs = sample_inputs(spec)
    outputs = _run(session, inputs, graph)
    output_spec = _output_spec(outputs, list(labels or []))
    # Bool outputs cannot be subtracted, which the golden check does: they are checked by shape only here.
    golden = {**{f"input:{k}": v for k, v in inputs.items()},
              **{f"output:{k}": v for k, v in outputs.items() if v.dtype.kind != "b"}}
    return Contract(spec, output_spec, list(outputs), golden)


def _session(path: Path):
    if not path.is_file():  # not a contract's matter: the error the store gives for it
        raise RegistryError(f"artifact {path} is not a file")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as a worker runs it: the golden outputs are reproduced exactly
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: a refusal is reported in one line below
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own untyped errors for bad files
        raise ContractError(f"ONNX Runtime cannot load {path}: {_short(e)}") from e


def _short(error: Exception) -> str:
    detail = " ".join(str(error).split()) or type(error).__name__
    return detail if len(detail) <= MAX_DETAIL_CHARS else detail[:MAX_DETAIL_CHARS] + "…"


def _wire_dtype(what: str, onnx_type: str) -> str:
    """The wire dtype of an ONNX tensor type (``tensor(float)`` → ``<f4``); refused if none."""
    match = _TENSOR.fullmatch(onnx_type)
    if match is None:
        raise ContractError(f"{what} is a {onnx_type}, not a tensor: a version's inputs and outputs "
                            "must be tensors")
    if match[1] not in ONNX_DTYPES:
        raise ContractError(f"{what} has element type {match[1]}, which streamserve cannot carry; "
                            f"supported: {', '.join(ONNX_DTYPES)}")
    return ONNX_DTYPES[match[1]]


def _graph_input(name: str, onnx_type: str, shape: list[Dim]) -> tuple[str, list[Dim]]:
    """(wire dtype, dims) of a graph input whose leading axis can be the batch axis."""
    dtype = _wire_dtype(f"input {name!r}", onnx_type)
    if not shape:
        raise ContractError(f"input {name!r} is a scalar in the graph: it needs a leading batch axis")
    lead = shape[0]
    if isinstance(lead, int) and lead > 1:
        raise ContractError(f"input {name!r}: the graph fixes the leading (batch) axis at {lead}; "
                            "export the model with a dynamic batch axis")
    return dtype, list(shape)


def _dims_text(dims: list[Dim]) -> str:
    """Per-sample dims as the messages show them: fixed ones as numbers, dynamic ones by name or '?'."""
    return "[" + ", ".join(str(d) if isinstance(d, int) else repr(d or "?") for d in dims) + "]"


def _fixed_or_raise(name: str, dims: list[Dim]) -> list[int]:
    for axis, dim in enumerate(dims, start=1):
        if not isinstance(dim, int) or dim < 1:
            what = f"dynamic ({dim or '?'})" if not isinstance(dim, int) else f"of size {dim}"
            raise ContractError(f"input {name!r}: axis {axis} is {what} in the graph, and a spec needs fixed "
                                "per-sample shapes: give the input spec (--input-spec)")
    return [int(d) for d in dims if isinstance(d, int)]


def infer_spec(graph: dict[str, tuple[str, list[Dim]]]) -> dict[str, dict[str, Any]]:
    """The input spec a graph implies: its dtypes and fixed per-sample shapes (axis 0 is the batch)."""
    return {name: {"dtype": dtype, "shape": _fixed_or_raise(name, dims[1:])}
            for name, (dtype, dims) in graph.items()}


def match_spec(spec: dict, graph: dict[str, tuple[str, list[Dim]]]) -> dict[str, dict[str, Any]]:
    """``spec`` checked against the graph's inputs (names, dtypes, per-sample shapes), dtypes normalised."""
    if not isinstance(spec, dict) or not spec:
        raise ContractError('the input spec must map input names to {"dtype": ..., "shape": [...]}')
    for name in spec:
        if name not in graph:
            raise ContractError(f"input {name!r} is not in the model: the graph's inputs are {list(graph)}")
    for name in graph:
        if name not in spec:
            raise ContractError(f"the model's input {name!r} is not in the spec: the spec's inputs are "
                                f"{list(spec)}")
    return {name: _match_input(name, spec[name], *graph[name]) for name in graph}


def _match_input(name: str, given: Any, dtype: str, dims: list[Dim]) -> dict[str, Any]:
    if not isinstance(given, dict) or "dtype" not in given or "shape" not in given:
        raise ContractError(f"input {name!r}: the spec needs a dtype and a shape, got {str(given)[:100]}")
    shape = given["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 1 for d in shape):
        raise ContractError(f"input {name!r}: shape {str(shape)[:100]} in the spec must be a list of "
                            "positive ints (the per-sample shape)")
    try:
        wire = codec.dtype_name(np.dtype(given["dtype"]))
    except (TypeError, ValueError, InvalidInput):
        raise ContractError(f"input {name!r}: dtype {str(given['dtype'])[:32]!r} in the spec is not a "
                            f"wire dtype ({', '.join(sorted(codec.DTYPES))})") from None
    if wire != dtype:
        onnx_name = next(k for k, v in ONNX_DTYPES.items() if v == dtype)
        raise ContractError(f"input {name!r}: dtype {wire} in the spec, {dtype} ({onnx_name}) in the graph")
    per_sample = dims[1:]
    differs = len(shape) != len(per_sample) or any(
        isinstance(g, int) and g != s for g, s in zip(per_sample, shape, strict=True))
    if differs:
        raise ContractError(f"input {name!r}: per-sample shape {shape} in the spec, {_dims_text(per_sample)} "
                            "in the graph")
    return {**given, "dtype": wire, "shape": list(shape)}


# The sample batch may not be larger than a request could be (the default ``max_message_bytes``): a
# spec or graph naming a per-sample shape of gigabytes is refused before anything is allocated.
MAX_SAMPLE_BYTES = 16 * 1024 * 1024


def sample_inputs(spec: dict[str, dict[str, Any]], rows: int = SAMPLE_ROWS) -> dict[str, np.ndarray]:
    """Seeded inputs of ``rows`` rows: normal floats, 0/1 integers (valid indices), random bools."""
    sizes = {name: rows * math.prod(s["shape"]) * np.dtype(s["dtype"]).itemsize for name, s in spec.items()}
    if sum(sizes.values()) > MAX_SAMPLE_BYTES:
        biggest = max(sizes, key=sizes.__getitem__)
        raise ContractError(f"input {biggest!r}: per-sample shape {spec[biggest]['shape']} makes a "
                            f"{rows}-row sample of {sum(sizes.values()):,} bytes, over the "
                            f"{MAX_SAMPLE_BYTES:,} a request may carry")
    rng = np.random.default_rng(SAMPLE_SEED)
    arrays = {}
    for name, s in spec.items():
        dtype, shape = np.dtype(s["dtype"]), (rows, *s["shape"])
        if dtype.kind == "f":
            arrays[name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        elif dtype.kind == "b":
            arrays[name] = rng.integers(0, 2, shape).astype(bool)
        else:
            arrays[name] = rng.integers(0, 2, shape).astype(dtype)
    return arrays


def _run(session, inputs: dict[str, np.ndarray],
         graph: dict[str, tuple[str, list[Dim]]]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, inputs)
    except Exception as e:  # ORT's own untyped errors: a shape the graph refuses, a failing op
        fixed = [n for n, (_, dims) in graph.items() if dims[0] == 1]
        hint = f" (the graph fixes the batch axis of {fixed} at 1)" if fixed else ""
        raise ContractError(f"the model fails on a sample batch of {SAMPLE_ROWS} rows{hint}: "
                            f"{_short(e)}") from e
    return {n: np.asarray(v) for n, v in zip(names, values, strict=True)}


def _output_spec(outputs: dict[str, np.ndarray], labels: list[str]) -> dict[str, dict[str, Any]]:
    spec: dict[str, dict[str, Any]] = {}
    for i, (name, value) in enumerate(outputs.items()):
        if value.ndim == 0 or value.shape[0] != SAMPLE_ROWS:
            raise ContractError(f"output {name!r} does not keep the batch axis: a batch of {SAMPLE_ROWS} "
                                f"rows gave shape {list(value.shape)}")
        kind = "probabilities" if labels and i == 0 else "value"
        spec[name] = {"dtype": codec.dtype_name(value.dtype), "shape": list(value.shape[1:]), "kind": kind}
    first = next(iter(outputs))
    if labels and spec[first]["shape"] != [len(labels)]:
        raise ContractError(f"labels: {len(labels)} given, but the first output {first!r} has per-sample "
                            f"shape {spec[first]['shape']}; it must be [{len(labels)}]")
    return spec


def register_onnx(registry: Registry, name: str, path: Path, *, input_spec: dict | None = None,
                  labels: list[str] | None = None, label: str | None = None,
                  output_names: list[str] | None = None, **register_kwargs: Any) -> ModelVersion:
    """Check an ONNX model (:func:`check_onnx`) and register it with its contract and golden outputs.

    ``output_names``, when given, must be the graph's outputs in order. Other keyword
    arguments go to :meth:`Registry.register` (metrics, tags, description, alternates…).
    """
    registry.check_label(name, label)  # a taken label is refused before the model is run
    with tempfile.TemporaryDirectory() as workdir:
        path = self_contained(Path(path), Path(workdir))
        contract = check_onnx(path, input_spec, labels)
        if output_names is not None and list(output_names) != contract.output_names:
            raise ContractError(f"outputs: {list(output_names)} given, the graph's outputs are "
                                f"{contract.output_names}")
        return registry.register(name, path, input_spec=contract.input_spec,
                                 output_names=contract.output_names, labels=list(labels or []), label=label,
                                 output_spec=contract.output_spec, golden=contract.golden, fmt="onnx",
                                 **register_kwargs)


def self_contained(path: Path, workdir: Path) -> Path:
    """``path``, or a copy in ``workdir`` with its external data files inlined.

    torch's exporter writes large weights to ``model.onnx.data`` beside the graph; ONNX Runtime
    finds it next to the file here, but the store keeps one file per artifact, so a worker
    elsewhere could not load it. onnx (the ``train`` extra) is needed only for such a file.
    """
    try:
        import onnx
        from onnx.external_data_helper import uses_external_data
    except ImportError:
        return path  # without onnx nothing can be inlined; check_onnx still runs the file as it is
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a readable ONNX file: check_onnx gives the one-line reason
        return path
    if not any(uses_external_data(t) for t in graph.graph.initializer):  # where exporters put weights
        return path
    out = workdir / f"inlined-{path.name}"  # never the file being read, wherever it lies
    try:
        onnx.save(onnx.load(str(path)), str(out))  # onnx refuses data paths outside the model's folder
    except Exception as e:  # onnx's ValidationError too: a missing data file, a path outside the folder
        raise ContractError(f"{path.name}: its external weights cannot be inlined into one ONNX file: "
                            f"{' '.join(str(e).split())[:200]}") from None
    return out
