"""No code from artifacts: booby-trapped ``.pt2`` archives never run, artifact locations stay in the store.

Each trap is a real archive from ``torch.export.save`` with one thing changed; a control
test shows that ``torch.export.load`` runs every payload it can reach, so the refusals
below are refusals of live payloads. A payload "runs" when it creates its marker file.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import fakeredis
import models
import numpy as np
import pytest
from conftest import MODEL, ThreadedWorker, wait_until

from producer import Client
from protocol import keys
from protocol.errors import ArtifactIntegrityError, ConfigError, RegistryError
from protocol.settings import Settings
from registry import ModelVersion, Registry, sha256_of
from worker.loader import load_version
from worker.worker import Worker

X = np.random.default_rng(3).standard_normal((4, 60, 110)).astype(np.float32)
Members = dict[str, bytes]


class Booby:
    """Unpickling this creates the marker file: the payload of every pickle trap."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _code(marker: Path) -> str:
    """Python source that creates the marker: the payload of every JSON trap."""
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def _torch_saved(obj: object) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _edit_json(members: Members, name: str, edit: Callable[[dict], None]) -> None:
    doc = json.loads(members[name])
    edit(doc)
    members[name] = json.dumps(doc).encode()


# ---- the traps: each edits the archive's members (names relative to its root folder) ----------

def pickled_weight(m: Members, marker: Path) -> None:
    m["data/weights/weight_0"] = _torch_saved(Booby(marker))
    _edit_json(m, "data/weights/model_weights_config.json",
               lambda d: d["config"]["w"].update(use_pickle=True))


def legacy_weights_file(m: Members, marker: Path) -> None:
    m["data/weights/model.pt"] = _torch_saved(Booby(marker))


def _object_constant(prefix: str) -> Callable[[Members, Path], None]:
    def trap(m: Members, marker: Path) -> None:
        m[f"data/constants/{prefix}0"] = pickle.dumps(Booby(marker))
        entry = {"path_name": f"{prefix}0", "is_param": False, "use_pickle": True, "tensor_meta": None}
        _edit_json(m, "data/constants/model_constants_config.json", lambda d: d["config"].update(obj=entry))
    trap.__name__ = f"{prefix}constant"
    return trap


opaque_object_constant = _object_constant("opaque_obj_")
custom_object_constant = _object_constant("custom_obj_")


def sample_inputs(m: Members, marker: Path) -> None:
    m["data/sample_inputs/model.pt"] = _torch_saved(Booby(marker))


def guard_code(m: Members, marker: Path) -> None:
    _edit_json(m, "models/model.json", lambda d: d.update(guards_code=[f"{_code(marker)} is None"]))


def symbolic_shape(m: Members, marker: Path) -> None:
    def edit(doc: dict) -> None:
        size = doc["graph_module"]["graph"]["tensor_values"]["features"]["sizes"][0]["as_expr"]
        size["expr_str"] = f"Add({_code(marker)} or 0, {size['expr_str']})"
    _edit_json(m, "models/model.json", edit)


def input_name(m: Members, marker: Path) -> None:
    text = m["models/model.json"].decode()
    m["models/model.json"] = text.replace('"features"', json.dumps(f"features={_code(marker)}")).encode()


def file_operator(m: Members, marker: Path) -> None:
    def edit(doc: dict) -> None:
        node = doc["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.ops.aten.from_file.default"
        node["inputs"] = [{"name": "filename", "arg": {"as_string": str(marker)}, "kind": 1}]
    _edit_json(m, "models/model.json", edit)


RUN_BY_TORCH = [pickled_weight, legacy_weights_file, opaque_object_constant, sample_inputs, guard_code,
                symbolic_shape, input_name]
REFUSED = {pickled_weight: "weights entry is pickled", legacy_weights_file: "unexpected archive member",
           opaque_object_constant: "unexpected archive member",
           custom_object_constant: "unexpected archive member",
           guard_code: "under 'guards_code'", symbolic_shape: "under 'expr_str'",
           input_name: "under 'name'", file_operator: "under 'target'"}


def trapped(twin: Path, trap: Callable[[Members, Path], None], marker: Path) -> Path:
    """A copy of ``twin`` with ``trap`` applied, written as torch writes archives (stored members)."""
    with zipfile.ZipFile(twin) as z:
        root = z.namelist()[0].split("/")[0]
        members = {n.removeprefix(f"{root}/"): z.read(n) for n in z.namelist()}
    trap(members, marker)
    out = marker.with_name(f"{trap.__name__}.pt2")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(f"{root}/{name}", data)
    return out


# ---- fixtures ---------------------------------------------------------------------------------

class Unpickled(Exception):
    """Raised by every unpickler while ``no_unpickling`` is in force."""


@pytest.fixture
def no_unpickling(monkeypatch) -> list[str]:
    """Every unpickler ``torch.export.load`` can reach raises, and is recorded, for the test's duration."""
    torch = pytest.importorskip("torch")
    import torch._weights_only_unpickler as weights_only

    calls: list[str] = []

    def trap(name: str):
        def refuse(*_args, **_kwargs):
            calls.append(name)
            raise Unpickled(name)
        return refuse

    for owner, attr in [(pickle, "Unpickler"), (pickle, "loads"), (pickle, "load"), (torch, "load"),
                        (torch.serialization, "load"), (torch._C, "_pickle_load_obj"),
                        (weights_only, "load"), (weights_only, "Unpickler")]:
        monkeypatch.setattr(owner, attr, trap(f"{owner.__name__}.{attr}"))
    return calls


@pytest.fixture
def onnx_model(tmp_path: Path) -> Path:
    return models.linear_softmax(tmp_path / "m.onnx")


@pytest.fixture
def twin(onnx_model: Path, tmp_path: Path) -> Path:
    pytest.importorskip("torch")
    return models.torch_twin(onnx_model, tmp_path / "twin.pt2")


@pytest.fixture
def store(tmp_path: Path) -> Registry:
    """A registry on fakeredis: these tests need the store on disk, not a server."""
    return Registry(fakeredis.FakeRedis(), tmp_path / "store")


@pytest.fixture
def offline_settings(store: Registry) -> Settings:
    return Settings(artifact_dir=store.artifact_dir)


def broken_onnx(tmp_path: Path) -> Path:
    """A primary ONNX Runtime refuses, so a worker falls back to the torch artifact."""
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"this is not an onnx graph")
    return path


# ---- torch.export archives ----------------------------------------------------------------------

@pytest.mark.parametrize("trap", RUN_BY_TORCH, ids=lambda t: t.__name__)
def test_control_torch_export_load_runs_each_payload(twin, tmp_path, trap):
    import torch

    marker = tmp_path / "ran"
    path = trapped(twin, trap, marker)
    with warnings.catch_warnings(), contextlib.suppress(Exception):
        warnings.simplefilter("ignore")
        torch.export.load(path).module()(torch.zeros(2, 60, 110))
    assert marker.exists(), "the trap is not live: this test shows what the others guard against"


@pytest.mark.parametrize("trap", list(REFUSED), ids=lambda t: t.__name__)
def test_trapped_fallback_is_refused_naming_the_version_and_never_runs(
        store, offline_settings, twin, tmp_path, trap, no_unpickling):
    marker = tmp_path / "ran"
    mv = store.register(MODEL, broken_onnx(tmp_path), input_spec=models.SPEC, output_names=["probs"],
                        alternates={"torch_export": trapped(twin, trap, marker)})
    with pytest.raises(ConfigError) as refused:
        load_version(store, mv, offline_settings)
    message = str(refused.value)
    assert f"{MODEL} v{mv.version} torch_export: torch cannot load the artifact" in message
    assert REFUSED[trap] in message
    assert not marker.exists() and no_unpickling == []


def test_sample_inputs_are_never_read_so_a_trapped_file_there_is_inert(
        store, offline_settings, onnx_model, twin, tmp_path, no_unpickling):
    marker = tmp_path / "ran"
    mv = store.register(MODEL, broken_onnx(tmp_path), input_spec=models.SPEC, output_names=["probs"],
                        alternates={"torch_export": trapped(twin, sample_inputs, marker)})
    loaded = load_version(store, mv, offline_settings)
    assert loaded.variant == "torch_export"
    np.testing.assert_allclose(loaded.backend.run({"features": X})["probs"],
                               models.reference_outputs(onnx_model, X), rtol=1e-4, atol=1e-6)
    assert not marker.exists() and no_unpickling == []


def test_a_good_archive_loads_without_calling_any_unpickler(onnx_model, twin, no_unpickling):
    from worker.backend import TorchExportBackend

    out = TorchExportBackend(twin.read_bytes(), output_names=["probs"]).run({"features": X})
    np.testing.assert_allclose(out["probs"], models.reference_outputs(onnx_model, X), rtol=1e-4, atol=1e-6)
    assert no_unpickling == []


def test_control_torch_export_load_of_a_good_archive_unpickles(twin, no_unpickling):
    import torch

    with pytest.raises(Unpickled):
        torch.export.load(twin)
    assert no_unpickling, "the unpickler traps catch torch's own load path"


def test_our_reference_export_loads_pickle_free_with_the_same_outputs(tmp_path):
    torch = pytest.importorskip("torch")
    from modeltools.reference import HybridCNNLSTM, export_torch
    from worker.pt2 import load_program

    torch.manual_seed(0)
    path = export_torch(HybridCNNLSTM(), tmp_path / "ref.pt2")
    x = torch.from_numpy(X)
    with torch.inference_mode():
        ours = load_program(path.read_bytes()).module(check_guards=False)(x)
        theirs = torch.export.load(path).module()(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def payload_too_short(m: Members, _marker: Path) -> None:
    m["data/weights/weight_0"] = m["data/weights/weight_0"][:-4]


def complex_dtype(m: Members, _marker: Path) -> None:
    _edit_json(m, "data/weights/model_weights_config.json",
               lambda d: d["config"]["w"]["tensor_meta"].update(dtype=10))


def extra_file(m: Members, _marker: Path) -> None:
    m["extra/module_info.json"] = b"{}"


def no_members(m: Members, _marker: Path) -> None:
    m.clear()


@pytest.mark.parametrize(("edit", "reason"), [
    (payload_too_short, "reaches past the end of its payload"), (complex_dtype, "dtype or layout"),
    (extra_file, "unexpected archive member"), (no_members, "empty archive")], ids=lambda v: str(v))
def test_malformed_archives_are_refused(twin, tmp_path, edit, reason):
    from worker.pt2 import ArchiveRefused, load_program

    path = trapped(twin, edit, tmp_path / "unused")
    with pytest.raises(ArchiveRefused, match=reason):
        load_program(path.read_bytes())


def test_compressed_members_are_refused(twin, tmp_path):
    from worker.pt2 import ArchiveRefused, load_program

    squeezed = tmp_path / "deflated.pt2"
    with zipfile.ZipFile(twin) as src, zipfile.ZipFile(squeezed, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    with pytest.raises(ArchiveRefused, match="not stored plainly"):
        load_program(squeezed.read_bytes())


@pytest.mark.timeout(60)  # a torch export, then waits: the worker's 10 s, calls of 1 s, 20 s
def test_worker_keeps_serving_the_last_good_version_when_the_fallback_is_trapped(
        r, settings, registry, production, twin, tmp_path, no_unpickling):
    marker = tmp_path / "ran"
    v2 = registry.register(MODEL, broken_onnx(tmp_path), input_spec=models.SPEC, output_names=["probs"],
                           labels=models.LABELS,
                           alternates={"torch_export": trapped(twin, pickled_weight, marker)})
    with ThreadedWorker(Worker(settings, MODEL)), Client.from_url(settings.redis_url) as client:
        assert client.predict(MODEL, X[0]).model_version == production.version
        registry.promote(MODEL, v2.version)
        failed = wait_until(
            lambda: [w for w in client.health(MODEL).workers if w.failed_version == v2.version],
            20, message="the worker did not report the trapped version as failed")
        assert client.predict(MODEL, X[0]).model_version == production.version
    assert f"{MODEL} v{v2.version} torch_export" in failed[0].error and "pickled" in failed[0].error
    assert not marker.exists() and no_unpickling == []



# ---- artifact locations -------------------------------------------------------------------------

HEX_RUN = re.compile(r"[0-9a-f]{8}")


def _point_at(store: Registry, mv: ModelVersion, relative: str, sha256: str) -> ModelVersion:
    """Rewrite a version's primary artifact as a hostile registry writer would."""
    store.redis.hset(keys.version_hash(mv.name, mv.version), mapping={"artifact": relative, "sha256": sha256})
    return store.get(mv.name, mv.version)


def _assert_refused_quietly(store: Registry, mv: ModelVersion, outside: Path) -> None:
    for read in (store.artifact_path, store.artifact_bytes):
        with pytest.raises(ArtifactIntegrityError, match="outside the artifact directory") as refused:
            read(mv)
        message = str(refused.value)
        assert message.startswith(f"m v{mv.version} primary:")
        assert str(outside.parent) not in message and not HEX_RUN.search(message)


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_a_location_outside_the_store_is_refused_even_with_its_true_hash(store, onnx_model, tmp_path, where):
    mv = store.register("m", onnx_model, input_spec=models.SPEC, output_names=["probs"])
    outside = tmp_path / "attacker.onnx"
    outside.write_bytes(models.linear_softmax(tmp_path / "other.onnx", seed=7).read_bytes())
    relative = str(outside) if where == "absolute" else "sha256/../../attacker.onnx"
    _assert_refused_quietly(store, _point_at(store, mv, relative, sha256_of(outside)), outside)


def test_a_symlink_leading_out_of_the_store_is_refused(store, onnx_model, tmp_path):
    mv = store.register("m", onnx_model, input_spec=models.SPEC, output_names=["probs"])
    outside = tmp_path / "attacker.onnx"
    outside.write_bytes(b"the attacker's model")
    link = store.artifact_dir / "sha256" / "zz" / "evil.onnx"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    _assert_refused_quietly(store, _point_at(store, mv, "sha256/zz/evil.onnx", sha256_of(outside)), outside)


def test_a_symlink_that_stays_inside_the_store_is_followed(store, onnx_model):
    mv = store.register("m", onnx_model, input_spec=models.SPEC, output_names=["probs"])
    link = store.artifact_dir / "sha256" / "zz" / "alias.onnx"
    link.parent.mkdir(parents=True)
    link.symlink_to(store.artifact_dir / mv.artifact)
    moved = _point_at(store, mv, "sha256/zz/alias.onnx", mv.sha256)
    assert store.artifact_bytes(moved) == onnx_model.read_bytes()


def test_registering_through_a_symlinked_store_folder_is_refused(store, onnx_model, tmp_path):
    digest = sha256_of(onnx_model)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (store.artifact_dir / "sha256").mkdir(parents=True)
    (store.artifact_dir / "sha256" / digest[:2]).symlink_to(outside)
    with pytest.raises(RegistryError, match="leads outside it"):
        store.register("m", onnx_model, input_spec=models.SPEC, output_names=["probs"])
    assert list(outside.iterdir()) == []


def test_gc_does_not_follow_a_symlinked_folder_out_of_the_store(store, onnx_model, tmp_path):
    store.register("m", onnx_model, input_spec=models.SPEC, output_names=["probs"])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "precious.onnx").write_bytes(b"not the store's")
    (store.artifact_dir / "sha256" / "zz").symlink_to(outside)
    assert store.gc() == []
    assert (outside / "precious.onnx").exists()


def test_variant_metadata_cannot_redirect_its_artifact(store, onnx_model, tmp_path):
    mv = store.register("m", onnx_model, input_spec=models.SPEC, output_names=["probs"])
    with pytest.raises(RegistryError, match="may not set"):
        store.add_variant("m", mv.version, "evil", onnx_model, artifact=str(tmp_path / "attacker.onnx"))


def test_a_hash_mismatch_names_the_version_and_variant_but_no_hash(store, onnx_model, tmp_path):
    fallback = tmp_path / "fallback.pt2"
    fallback.write_bytes(b"pretend program")
    mv = store.register("m", onnx_model, input_spec=models.SPEC, output_names=["probs"],
                        alternates={"torch_export": fallback})
    tampered = store.artifact_dir / mv.alternates["torch_export"]["artifact"]
    tampered.write_bytes(b"someone else's bytes")
    actual = sha256_of(tampered)
    with pytest.raises(ArtifactIntegrityError) as mismatch:
        store.artifact_bytes(mv, "torch_export")
    message = str(mismatch.value)
    assert message.startswith(f"m v{mv.version} torch_export: artifact bytes do not match")
    assert actual[:6] not in message and not HEX_RUN.search(message) and str(tmp_path) not in message
