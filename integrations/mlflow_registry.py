"""Import MLflow model versions into the registry, and export the registry's versions into MLflow.

Import reads a version's ``MLmodel`` file itself (``yaml.safe_load``) before anything
else is downloaded, refuses every flavor but ``onnx`` (the others load pickles), then
downloads only the ONNX flavor's files, takes the version's tensor signature as the
input spec, checks it against the graph (:func:`registry.contract.check_onnx`) and
registers the version with MLflow's facts as tags and the run's metrics. Nothing is
ever unpickled and no MLflow flavor loader runs.

The sha256 of what was downloaded is recorded on the version (tag ``mlflow.sha256``): a
later import of the same MLflow version whose files hash differently is refused, since
an MLflow version's artifacts can be rewritten in its artifact store under the same number.

Everything read from MLflow is untrusted: sizes are bounded before a download, paths
must stay in the version's artifact folder, and each refusal is one line.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from protocol import codec, keys
from protocol.errors import InvalidInput, RegistryError
from registry import artifacts
from registry.contract import Contract, ContractError, check_onnx, self_contained
from registry.store import ModelVersion, Registry

if TYPE_CHECKING:
    import onnx
    from mlflow import MlflowClient

# Tags on our version: where it came from in MLflow, and the hash of what was downloaded.
TAG_NAME = "mlflow.model_name"
TAG_VERSION = "mlflow.version"
TAG_SOURCE = "mlflow.source"
TAG_RUN = "mlflow.run_id"
TAG_SHA256 = "mlflow.sha256"
TAG_URI = "mlflow.tracking_uri"
COPIED_TAG_PREFIX = "mlflow.tag."  # the MLflow version's own tags, copied
# Tags on the MLflow version: which of our versions it is.
OUR_MODEL, OUR_VERSION = "streamserve.model", "streamserve.version"
OUR_LABEL, OUR_LABELS, OUR_STAGE = "streamserve.label", "streamserve.labels", "streamserve.stage"
# Our stages as MLflow aliases (integrations.mlflow_sync keeps them in step, both ways).
STAGE_ALIASES = {"Production": ("production", "champion"), "Staging": ("staging", "challenger")}
STATE_TAG = "streamserve.alias."  # + alias, on the registered model: the version sync last pointed it at

MAX_MLMODEL_BYTES = 1 << 20  # an MLmodel file is a few KiB; it is parsed before anything is trusted
MAX_ONNX_BYTES = (1 << 31) - 1  # protobuf's limit: what one self-contained ONNX file can hold
MAX_COPIED_TAGS = 100
MAX_TAG_CHARS = 500
MAX_TENSORS = 64
MLFLOW_DATA_FILE = "model.onnx"  # the file mlflow.onnx.log_model writes the graph to
EXPORT_HINT = ("export it to ONNX first (torch.onnx.export for PyTorch, skl2onnx for scikit-learn) and "
               "log that with mlflow.onnx.log_model")
_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]{1,256})"
                        r"(?:@(?P<alias>[^/@]{1,256})|/(?P<version>[0-9]{1,18}))")
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}")
_METRIC_NAME = re.compile(r"[A-Za-z0-9_\-. /]{1,250}")


class MlflowRegistryError(RegistryError):
    """An MLflow version that cannot be imported or exported, or MLflow's own error: one line, why and what
    to do."""


@dataclass(frozen=True)
class MlflowVersion:
    """One MLflow model version, as its registry describes it."""

    name: str
    version: str
    source: str
    run_id: str
    tags: dict[str, str]
    description: str
    download_uri: str

    @property
    def uri(self) -> str:
        """``models:/NAME/VERSION``: the version itself, whatever alias led to it."""
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class TensorSig:
    """One tensor of an MLflow signature: its name (None if unnamed), wire dtype, per-sample shape."""

    name: str | None
    dtype: str
    shape: list[int]  # the batch axis (-1 in MLflow) left out; -1 = any size


@dataclass(frozen=True)
class Imported:
    """What an import did: the version (new, or the one an earlier import made) and what it fetched."""

    version: ModelVersion
    created: bool
    source: MlflowVersion
    downloaded: list[str] = field(default_factory=list)  # artifact paths, in fetch order


# ---- MLflow versions and their artifacts ---------------------------------------------------


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` → (name, alias, version)."""
    match = _MODEL_URI.fullmatch(uri)
    if match is None:
        raise MlflowRegistryError(f"{uri[:100]!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
    return match["name"], match["alias"], match["version"]


def lookup(client: MlflowClient, model_uri: str) -> MlflowVersion:
    """The MLflow version a ``models:/`` URI names (an alias is resolved to its version)."""
    name, alias, version = parse_model_uri(model_uri)
    found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(
        name, str(version))
    number = str(found.version)
    tags = {str(k): str(v) for k, v in (found.tags or {}).items()}
    return MlflowVersion(str(found.name), number, str(found.source or ""), str(found.run_id or ""), tags,
                         str(found.description or ""),
                         client.get_model_version_download_uri(str(found.name), number))


def safe_relative(path: Any, what: str) -> str:
    """An artifact path that stays inside the version's folder (no absolute path, no ``..``)."""
    pure = PurePosixPath(str(path))
    if not isinstance(path, str) or pure.is_absolute() or not all(_PART.fullmatch(p) for p in pure.parts):
        raise MlflowRegistryError(f"{what}: artifact path {str(path)[:100]!r} must be a relative path of "
                                  "[A-Za-z0-9_.-] names inside the model's folder")
    return str(pure)


class ArtifactFolder:
    """A model version's artifact folder in MLflow, fetched file by file into ``workdir``."""

    def __init__(self, download_uri: str, tracking_uri: str, workdir: Path, where: str) -> None:
        self.base = download_uri.rstrip("/")
        self.tracking_uri, self.workdir, self.where = tracking_uri, workdir, where
        self.fetched: list[str] = []

    def sizes(self, folder: str = "") -> dict[str, int]:
        """Relative path → size of the files directly in ``folder`` (the version's root by default)."""
        import mlflow.artifacts

        uri = f"{self.base}/{folder}" if folder else self.base
        infos = mlflow.artifacts.list_artifacts(artifact_uri=uri, tracking_uri=self.tracking_uri)
        prefix = f"{folder}/" if folder else ""
        return {prefix + PurePosixPath(str(i.path)).name: int(i.file_size or 0)
                for i in infos if not i.is_dir}

    def fetch(self, relative: str, size: int, limit: int) -> Path:
        """Download one file (``size`` as listed, refused over ``limit``), under ``workdir``."""
        import mlflow.artifacts

        if size > limit:
            raise MlflowRegistryError(f"{self.where}: {relative} is {size} bytes, over the {limit} allowed")
        target = self.workdir / "files" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{self.base}/{relative}",
                                                         dst_path=str(target.parent),
                                                         tracking_uri=self.tracking_uri))
        self.fetched.append(relative)
        if not local.resolve().is_relative_to(self.workdir.resolve()) or not local.is_file():
            raise MlflowRegistryError(f"{self.where}: {relative} did not download as a file")
        if local.stat().st_size > limit:  # the listing is the server's word: the file is checked too
            raise MlflowRegistryError(f"{self.where}: {relative} is over the {limit} bytes allowed")
        return local


# ---- the MLmodel file ----------------------------------------------------------------------


def read_mlmodel(path: Path, where: str) -> dict[str, Any]:
    """The MLmodel file as a mapping, parsed with ``yaml.safe_load`` (no object is ever constructed)."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise MlflowRegistryError(f"{where}: the MLmodel file is not YAML: {' '.join(str(e).split())[:200]}"
                                ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("flavors"), dict):
        raise MlflowRegistryError(f"{where}: the MLmodel file has no flavors mapping")
    return doc


def _flavor_names(flavors: dict[str, Any]) -> list[str]:
    def name(flavor: str, conf: Any) -> str:
        loader = conf.get("loader_module") if isinstance(conf, dict) else None
        return f"{flavor} (loader_module {loader})" if flavor == "python_function" else str(flavor)

    return [name(str(f), c) for f, c in list(flavors.items())[:20]]


def onnx_data_path(doc: dict[str, Any], where: str) -> str:
    """The ONNX flavor's model file (``flavors.onnx.data``); refused for every flavor that unpickles.

    Accepted: ``onnx``, and ``python_function`` only with ``loader_module: mlflow.onnx`` (how
    ``mlflow.onnx.log_model`` writes it). Anything else (pytorch, sklearn, keras, a custom pyfunc…)
    loads a pickle in MLflow's own loaders: the model must be exported to ONNX first.
    """
    flavors: dict[str, Any] = doc["flavors"]
    pyfunc = flavors.get("python_function")
    loader = pyfunc.get("loader_module") if isinstance(pyfunc, dict) else None
    others = [f for f in flavors if f not in ("onnx", "python_function")]
    if "onnx" not in flavors or others or ("python_function" in flavors and loader != "mlflow.onnx"):
        listed = ", ".join(_flavor_names(flavors))
        raise MlflowRegistryError(f"{where} is not an ONNX model (flavors: {listed}) and streamserve never "
                                  f"loads pickled models: {EXPORT_HINT}")
    conf = flavors["onnx"]
    data = conf.get("data") if isinstance(conf, dict) else None
    if data is None:
        raise MlflowRegistryError(f"{where}: the onnx flavor names no model file (flavors.onnx.data)")
    return safe_relative(data, where)


def signature(doc: dict[str, Any], where: str) -> tuple[list[TensorSig] | None, list[TensorSig] | None]:
    """The signature's inputs and outputs as tensors (None where the MLmodel has none)."""
    sig = doc.get("signature")
    if sig is None:
        return None, None
    if not isinstance(sig, dict):
        raise MlflowRegistryError(f"{where}: the MLmodel's signature is not a mapping")
    return _tensors(sig.get("inputs"), "input", where), _tensors(sig.get("outputs"), "output", where)


def _tensors(raw: Any, side: str, where: str) -> list[TensorSig] | None:
    if raw is None:
        return None
    try:
        entries = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        raise MlflowRegistryError(f"{where}: the signature's {side}s are not JSON") from None
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_TENSORS:
        raise MlflowRegistryError(f"{where}: the signature's {side}s must be a list of 1 to {MAX_TENSORS}")
    sigs = [_tensor(entry, side, where) for entry in entries]
    if len(sigs) > 1 and any(s.name is None for s in sigs):
        raise MlflowRegistryError(f"{where}: the signature has several {side}s, not all named")
    return sigs


def _tensor(entry: Any, side: str, where: str) -> TensorSig:
    kind = entry.get("type") if isinstance(entry, dict) else type(entry).__name__
    if kind != "tensor":
        raise MlflowRegistryError(f"{where}: the signature's {side}s are columns (type {str(kind)[:30]!r}), "
                                  "not tensors: log the model with a tensor signature, e.g. "
                                  "infer_signature(<numpy input>, <numpy output>)")
    name, spec = entry.get("name"), entry.get("tensor-spec")
    what = f"{where}: signature {side} {str(name)[:64]!r}" if name is not None else f"{where}: the {side}"
    if (name is not None and not isinstance(name, str)) or not isinstance(spec, dict):
        raise MlflowRegistryError(f"{what} needs a name string and a tensor-spec")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not shape or shape[0] != -1:
        raise MlflowRegistryError(f"{what}: shape {str(shape)[:64]} must start with -1 (the batch axis)")
    per_sample = shape[1:]
    sizes_ok = all(type(d) is int and (d >= 1 or d == -1) for d in per_sample)
    if len(per_sample) >= codec.MAX_NDIM or not sizes_ok:
        raise MlflowRegistryError(f"{what}: shape {str(shape)[:64]} must list -1 then positive sizes")
    return TensorSig(name, _wire_dtype(spec.get("dtype"), what), list(per_sample))


def _wire_dtype(value: Any, what: str) -> str:
    try:
        return codec.dtype_name(np.dtype(str(value)))
    except (TypeError, ValueError, InvalidInput):
        raise MlflowRegistryError(f"{what}: dtype {str(value)[:32]!r} is not one streamserve carries "
                                  f"({', '.join(sorted(codec.DTYPES))})") from None


def input_spec(sigs: list[TensorSig] | None, graph_inputs: list[str], where: str) -> dict[str, Any] | None:
    """The signature's inputs as an input spec (None: no signature, inferred from the graph).

    An unnamed input (MLflow's signature of one bare array) is the graph's one input.
    """
    if sigs is None:
        return None
    for s in sigs:
        if -1 in s.shape:
            name = s.name or graph_inputs[0]
            raise MlflowRegistryError(f"{where}: signature input {name!r} has a variable per-sample axis "
                                      f"({[-1, *s.shape]}): a spec needs fixed sizes")
    if len(sigs) == 1 and sigs[0].name is None:
        if len(graph_inputs) != 1:
            raise MlflowRegistryError(f"{where}: the signature's one input is unnamed and the graph has "
                                      f"{len(graph_inputs)} inputs {graph_inputs[:8]}")
        return {graph_inputs[0]: {"dtype": sigs[0].dtype, "shape": sigs[0].shape}}
    return {str(s.name): {"dtype": s.dtype, "shape": s.shape} for s in sigs}


def check_outputs(sigs: list[TensorSig] | None, contract: Contract) -> None:
    """The signature's outputs against what the graph gave on a sample batch (-1: any size)."""
    if sigs is None:
        return
    names = contract.output_names if [s.name for s in sigs] == [None] else [str(s.name) for s in sigs]
    if sorted(names) != sorted(contract.output_names):
        raise ContractError(f"outputs: {names} in the signature, {contract.output_names} in the graph")
    for sig, name in zip(sigs, names, strict=True):
        got = contract.output_spec[name]
        if sig.dtype != got["dtype"]:
            raise ContractError(f"output {name!r}: dtype {sig.dtype} in the signature, {got['dtype']} in the "
                                "graph")
        fits = len(sig.shape) == len(got["shape"]) and all(
            s in (-1, g) for s, g in zip(sig.shape, got["shape"], strict=True))
        if not fits:
            raise ContractError(f"output {name!r}: per-sample shape {sig.shape} in the signature, "
                                f"{got['shape']} in the graph")


# ---- the ONNX files ------------------------------------------------------------------------


def external_files(model: onnx.ModelProto, where: str) -> list[str]:
    """The external data files a graph's tensors name (``save_as_external_data``), checked as paths."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    locations = {ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)}
    return sorted(safe_relative(loc, where) for loc in locations)


def files_sha256(files: dict[str, Path]) -> str:
    """One file: its sha256 (what ``sha256sum`` prints); several: the sha256 of their sorted manifest.

    The manifest is ``sha256sum``'s output for the files, by relative path: ``<sha256>  <path>\\n``.
    """
    if len(files) == 1:
        return artifacts.sha256_of(next(iter(files.values())))
    manifest = "".join(f"{artifacts.sha256_of(p)}  {name}\n" for name, p in sorted(files.items()))
    return hashlib.sha256(manifest.encode()).hexdigest()


def fetch_onnx(folder: ArtifactFolder, data: str) -> tuple[Path, dict[str, Path], list[str]]:
    """Download the ONNX file and its external data files: (model path, relative → local, graph inputs)."""
    import onnx

    parent = str(PurePosixPath(data).parent)
    listed = folder.sizes("" if parent == "." else parent)
    if data not in listed:
        raise MlflowRegistryError(f"{folder.where}: the onnx flavor's file {data} is not among its artifacts")
    path = folder.fetch(data, listed[data], MAX_ONNX_BYTES)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and onnx's own: the file is not an ONNX graph
        raise MlflowRegistryError(f"{folder.where}: {data} is not an ONNX model: {type(e).__name__}"
                                  ) from None
    files = {data: path}
    budget = MAX_ONNX_BYTES - listed[data]
    for location in external_files(model, folder.where):
        relative = str(PurePosixPath(data).parent / location)
        if relative not in listed:
            raise MlflowRegistryError(f"{folder.where}: the graph's external data {location} is not among "
                                      "the version's artifacts")
        files[relative] = folder.fetch(relative, listed[relative], budget)
        budget -= listed[relative]
    weights = {t.name for t in model.graph.initializer}  # old exporters list initializers as inputs too
    return path, files, [i.name for i in model.graph.input if i.name not in weights]


# ---- import --------------------------------------------------------------------------------


def imported_as(registry: Registry, name: str, source: MlflowVersion) -> ModelVersion | None:
    """Our version an earlier import (or export) recorded for this MLflow version, if any."""
    for mv in registry.versions(name):
        tags = mv.tags
        if (tags.get(TAG_NAME), tags.get(TAG_VERSION), tags.get(TAG_SOURCE)) == (
                source.name, source.version, source.source):
            return mv
    return None


def _labels(given: list[str] | None, source: MlflowVersion) -> list[str]:
    """Class labels: as given, else the MLflow version's ``streamserve.labels`` tag (a JSON list)."""
    if given is not None:
        return given
    try:
        labels = json.loads(source.tags.get(OUR_LABELS, "[]"))
    except json.JSONDecodeError:
        labels = None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise MlflowRegistryError(f"{source.uri}: tag {OUR_LABELS} is not a JSON list of strings; "
                                  "give --labels")
    return labels


def _tags(source: MlflowVersion, sha256: str, tracking_uri: str) -> dict[str, str]:
    copied = {f"{COPIED_TAG_PREFIX}{k}"[:MAX_TAG_CHARS]: v[:MAX_TAG_CHARS]
              for k, v in list(source.tags.items())[:MAX_COPIED_TAGS]}
    return {**copied, TAG_NAME: source.name, TAG_VERSION: source.version, TAG_SOURCE: source.source,
            TAG_RUN: source.run_id, TAG_SHA256: sha256, TAG_URI: tracking_uri}


def run_metrics(client: MlflowClient, run_id: str) -> dict[str, float]:
    """The run's latest metrics (finite ones: the registry stores JSON numbers)."""
    if not run_id:
        return {}
    metrics = client.get_run(run_id).data.metrics
    return {str(k): float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


@contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="streamserve-mlflow-") as tmp:
        yield Path(tmp)


def our_name(source_name: str, as_name: str | None) -> str:
    """The model name here: ``--as``, else MLflow's name if it is a valid one."""
    name = as_name or source_name
    try:
        return keys.check_model_name(name)
    except InvalidInput:
        raise MlflowRegistryError(f"MLflow model {source_name[:80]!r} is not a valid model name here "
                                  "([A-Za-z0-9_.-], at most 64 chars): give --as NAME") from None


def import_version(registry: Registry, client: MlflowClient, model_uri: str, *, tracking_uri: str,
                   as_name: str | None = None, labels: list[str] | None = None,
                   label: str | None = None) -> Imported:
    """Import the MLflow version ``model_uri`` names (see the module's docstring for every check).

    An MLflow version imported before, with the same files, is not registered again: its
    version here is returned (``created`` False). Its files changed since: refused.
    """
    source = lookup(client, model_uri)
    name = our_name(source.name, as_name)
    with _workdir() as workdir:
        folder = ArtifactFolder(source.download_uri, tracking_uri, workdir, source.uri)
        listed = folder.sizes()
        if "MLmodel" not in listed:
            raise MlflowRegistryError(f"{source.uri} has no MLmodel file among its artifacts")
        doc = read_mlmodel(folder.fetch("MLmodel", listed["MLmodel"], MAX_MLMODEL_BYTES), source.uri)
        data = onnx_data_path(doc, source.uri)  # refused here, before any weights are downloaded
        inputs, outputs = signature(doc, source.uri)
        path, files, graph_inputs = fetch_onnx(folder, data)
        sha256 = files_sha256(files)
        previous = imported_as(registry, name, source)
        if previous is not None:
            return Imported(_same_files(previous, source, sha256), False, source, folder.fetched)
        chosen = _free_label(registry, name, label or f"mlflow-{source.version}")
        spec = input_spec(inputs, graph_inputs, source.uri)
        artifact = self_contained(path, workdir)  # external weights inlined: one stored file
        class_labels = _labels(labels, source)
        contract = check_onnx(artifact, spec, class_labels)
        check_outputs(outputs, contract)
        mv = registry.register(
            name, artifact, input_spec=contract.input_spec, output_names=contract.output_names,
            labels=class_labels, label=chosen, output_spec=contract.output_spec, golden=contract.golden,
            fmt="onnx", metrics=run_metrics(client, source.run_id), tags=_tags(source, sha256, tracking_uri),
            description=source.description)
        return Imported(mv, True, source, folder.fetched)


def _free_label(registry: Registry, name: str, label: str) -> str:
    try:
        registry.check_label(name, label)  # before the model is run
    except RegistryError as e:
        raise MlflowRegistryError(f"{e}; choose another with --label") from None
    return label


def _same_files(previous: ModelVersion, source: MlflowVersion, sha256: str) -> ModelVersion:
    recorded = previous.tags.get(TAG_SHA256, "")
    if recorded != sha256:
        raise MlflowRegistryError(
            f"{source.uri}: its files changed since it was imported as {previous.name} {previous.title} "
            f"(sha256 {sha256[:16]}…, recorded {recorded[:16] or 'none'}…): an MLflow version must not "
            "change; log the new files as a new version")
    return previous


# ---- export --------------------------------------------------------------------------------


def mlflow_version_of(mv: ModelVersion, mlflow_name: str) -> str | None:
    """The MLflow version of ``mlflow_name`` that ``mv`` was imported from or exported as."""
    return mv.tags.get(TAG_VERSION) if mv.tags.get(TAG_NAME) == mlflow_name else None


def _model_signature(mv: ModelVersion) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def spec(name: str, s: Mapping[str, Any]) -> TensorSpec:
        return TensorSpec(np.dtype(s["dtype"]), (-1, *s["shape"]), name)

    inputs = Schema([spec(n, s) for n, s in mv.input_spec.items()])
    if not all(n in mv.output_spec for n in mv.output_names):  # registered before output specs were kept
        return ModelSignature(inputs=inputs)
    outputs = Schema([spec(n, mv.output_spec[n]) for n in mv.output_names])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _mlflow_tags(mv: ModelVersion) -> dict[str, str]:
    return {OUR_MODEL: mv.name, OUR_VERSION: str(mv.version), OUR_LABEL: mv.label, OUR_STAGE: mv.stage,
            OUR_LABELS: json.dumps(mv.labels)}


def existing_export(client: MlflowClient, mv: ModelVersion, mlflow_name: str) -> str | None:
    """The MLflow version ``mv`` already is in ``mlflow_name`` (None if none, or it was deleted there)."""
    from mlflow.exceptions import MlflowException

    version = mlflow_version_of(mv, mlflow_name)
    if version is None:
        return None
    try:
        found = client.get_model_version(mlflow_name, version)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return version if str(found.source or "") == mv.tags.get(TAG_SOURCE) else None


def export_version(registry: Registry, client: MlflowClient, name: str, ref: str | int, *,
                   tracking_uri: str, mlflow_name: str | None = None) -> tuple[ModelVersion, str, bool]:
    """Log one of our versions into MLflow as a new version of ``mlflow_name`` (default: ``name``).

    The ONNX artifact is logged with ``mlflow.onnx.log_model`` (a signature from our specs, no
    pickle), the metrics as its run's, our stage as an alias. A version exported before (and
    still there) is not logged again. Returns (our version, MLflow version, whether it was logged now).
    """
    mv = registry.resolve(name, ref)
    target = mlflow_name or name
    done = existing_export(client, mv, target)
    if done is not None:
        return mv, done, False
    if mv.tags.get(TAG_NAME, target) != target:  # its provenance stays: one MLflow version per version
        raise MlflowRegistryError(f"{name} {mv.title} is MLflow's models:/{mv.tags[TAG_NAME]}/"
                                  f"{mv.tags.get(TAG_VERSION)}; export it to that registered model")
    if mv.format != "onnx":
        raise MlflowRegistryError(f"{name} {mv.title} is a {mv.format} artifact; only ONNX versions are "
                                  "exported")
    version, source, run_id, sha256 = _log_onnx(registry, client, mv, target, tracking_uri)
    mv = registry.update(name, mv.version, tags={TAG_NAME: target, TAG_VERSION: version, TAG_SOURCE: source,
                                                 TAG_RUN: run_id, TAG_SHA256: sha256, TAG_URI: tracking_uri})
    point_aliases(client, target, mv.stage, version)
    return mv, version, True


def point_aliases(client: MlflowClient, mlflow_name: str, stage: str, version: str, *,
                  only: list[str] | None = None) -> list[str]:
    """Point ``stage``'s aliases (none for None and Archived; ``only`` these) at ``version``.

    Each is noted in the registered model's tags as where sync left it: an alias found
    elsewhere later was moved by a person.
    """
    aliases = [a for a in STAGE_ALIASES.get(stage, ()) if only is None or a in only]
    for alias in aliases:
        client.set_registered_model_alias(mlflow_name, alias, version)
        client.set_registered_model_tag(mlflow_name, STATE_TAG + alias, version)
    return aliases


def _log_onnx(registry: Registry, client: MlflowClient, mv: ModelVersion, target: str,
              tracking_uri: str) -> tuple[str, str, str, str]:
    """Log the artifact in a run of experiment ``streamserve``: (version, source, run id, sha256)."""
    import mlflow
    import mlflow.onnx
    import onnx

    model = onnx.load_model_from_string(registry.artifact_bytes(mv))
    # mlflow.onnx.log_model writes the graph with onnx.save_model, without external data: these bytes.
    sha256 = hashlib.sha256(model.SerializeToString()).hexdigest()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    mlflow.set_experiment("streamserve")
    with mlflow.start_run(run_name=f"streamserve {mv.name} {mv.title}") as run:
        mlflow.log_metrics({k: v for k, v in mv.metrics.items() if _METRIC_NAME.fullmatch(k)})
        mlflow.set_tags({OUR_MODEL: mv.name, OUR_VERSION: str(mv.version)})
        info = mlflow.onnx.log_model(
            model, name="model", signature=_model_signature(mv), registered_model_name=target,
            # Requirements given: MLflow would otherwise load the model to infer them.
            save_as_external_data=False, pip_requirements=["onnxruntime"])
    version = str(info.registered_model_version)
    for key, value in _mlflow_tags(mv).items():
        client.set_model_version_tag(target, version, key, value)
    if mv.description:
        client.update_model_version(target, version, description=mv.description)
    source = str(client.get_model_version(target, version).source or "")
    return version, source, run.info.run_id, sha256
