"""Backends: the torch.export fallback, per-format integrity, and output parity."""

import models
import numpy as np
import pytest
from conftest import MODEL, ThreadedWorker

from producer import Client
from protocol.errors import ArtifactIntegrityError, ConfigError
from streamserve.cli import main
from worker.backend import TorchExportBackend
from worker.loader import load_version, version_parity
from worker.worker import Worker

X = np.random.default_rng(11).standard_normal((3, 60, 110)).astype(np.float32)


@pytest.fixture
def twin(model_path, tmp_path):
    return models.torch_twin(model_path, tmp_path / "twin.pt2")


def test_torch_export_backend_matches_the_onnx_model(model_path, twin):
    out = TorchExportBackend(twin, output_names=["probs"]).run({"features": X})
    np.testing.assert_allclose(out["probs"], models.reference_outputs(model_path, X), rtol=1e-4, atol=1e-6)


def test_a_file_that_is_not_a_program_is_refused(tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(ConfigError, match="torch cannot load"):
        TorchExportBackend(bad, output_names=["probs"])


def test_broken_onnx_falls_back_to_torch_and_says_so(r, settings, registry, tmp_path, twin, model_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not an onnx graph")
    mv = registry.register(MODEL, broken, input_spec=models.SPEC, output_names=["probs"],
                           labels=models.LABELS, alternates={"torch_export": twin})
    registry.promote(MODEL, mv.version)
    with ThreadedWorker(Worker(settings, MODEL)), Client.from_url(settings.redis_url) as client:
        p = client.predict(MODEL, X[0])
        worker = client.health(MODEL).workers[0]
    np.testing.assert_allclose(p.outputs["probs"], models.reference_outputs(model_path, X[:1])[0],
                               rtol=1e-4, atol=1e-6)
    assert worker.backend == "torch_export" and worker.variant == "torch_export"
    assert "primary: ONNX Runtime cannot load" in worker.fallback


def test_fallback_artifact_is_verified_too(registry, settings, tmp_path, twin, model_path):
    mv = registry.register(MODEL, model_path, input_spec=models.SPEC, output_names=["probs"],
                           alternates={"torch_export": twin})
    (settings.artifact_dir / mv.alternates["torch_export"]["artifact"]).write_bytes(b"evil")
    with pytest.raises(ArtifactIntegrityError):
        registry.artifact_path(mv, "torch_export")
    (settings.artifact_dir / mv.artifact).write_bytes(b"evil too")
    with pytest.raises(ConfigError, match="no format could be served"):
        load_version(registry, mv, settings)


def test_parity_is_measured_per_alternate(registry, tmp_path, model_path, twin):
    same = registry.register(MODEL, model_path, input_spec=models.SPEC, output_names=["probs"],
                             alternates={"torch_export": twin})
    metrics = version_parity(registry, same)
    assert metrics["parity_torch_export_max_abs_diff"] < 1e-5
    assert metrics["parity_torch_export_argmax_agreement"] == 1.0
    damaged = models.torch_twin(model_path, tmp_path / "damaged.pt2", perturb=3.0)
    off = registry.register(MODEL, model_path, input_spec=models.SPEC, output_names=["probs"],
                            alternates={"torch_export": damaged})
    assert version_parity(registry, off)["parity_torch_export_argmax_agreement"] < 0.9


def test_registry_register_cli_records_parity(settings, registry, model_path, twin, capsys):
    import json

    base = ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir)]
    assert main([*base, "registry", "register", MODEL, str(model_path), "--input-spec",
                 json.dumps(models.SPEC), "--alternate", f"torch_export={twin}"]) == 0
    mv = registry.get(MODEL, 1)
    assert set(mv.alternates) == {"torch_export"}
    assert mv.metrics["parity_torch_export_argmax_agreement"] == 1.0
    assert "parity_torch_export_max_abs_diff" in capsys.readouterr().out


def test_cuda_requested_without_cuda_is_a_clear_error_and_auto_falls_back(model_path, twin):
    from worker.backend import OnnxBackend

    with pytest.raises(ConfigError, match="no CUDAExecutionProvider"):
        OnnxBackend(model_path, device="cuda")
    with pytest.raises(ConfigError, match="no CUDA device"):
        TorchExportBackend(twin, output_names=["probs"], device="cuda")
    assert OnnxBackend(model_path, device="auto").name == "onnxruntime"
    assert TorchExportBackend(twin, output_names=["probs"], device="auto").name == "torch_export"


def test_device_setting_is_validated():
    import pydantic

    from protocol.settings import Settings

    with pytest.raises(pydantic.ValidationError):
        Settings(device="gpu")


def test_a_batch_is_assembled_where_the_backend_stages_it(model_path, twin):
    """On CUDA the torch backend hands out pinned host memory to assemble a batch in (checked by
    tests/gpu_check.py on a device); on the CPU it stages nothing and batches are concatenated."""
    from types import SimpleNamespace

    from protocol import messages
    from worker.backend import OnnxBackend
    from worker.inputs import InputSpec
    from worker.processing import BatchProcessor

    assert TorchExportBackend(twin, output_names=["probs"]).stage("features", (4, 60, 110), X.dtype) is None
    onnx = OnnxBackend(model_path)
    staged = np.full((4, 60, 110), np.nan, np.float32)
    seen = []

    class Staging:
        def stage(self, name, shape, dtype):
            assert (name, shape, dtype) == ("features", staged.shape, staged.dtype)
            return staged

        def run(self, inputs):
            seen.append(inputs["features"])
            return onnx.run(inputs)

    def entry(request_id, x):  # the fields as Redis hands them back: bytes
        fields = messages.encode_request(request_id, {"features": x}, deadline_ms=2**40)
        return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}

    requests = [messages.decode_request(f"1-{i}", entry(f"r{i}", x), max_bytes=1 << 24)
                for i, x in enumerate((X[:1], X[1:3], X[:1]))]
    loaded = SimpleNamespace(backend=Staging(), spec=InputSpec({"features": {"dtype": "float32",
                                                                              "shape": [60, 110]}}),
                             version=SimpleNamespace(labels=None))  # the call checks the labels too
    out = BatchProcessor._call(loaded, requests)
    assert np.shares_memory(seen[0], staged), "the batch was assembled in the staged buffer"
    np.testing.assert_array_equal(staged, np.concatenate([X[:1], X[1:3], X[:1]]))
    np.testing.assert_allclose(out["probs"], onnx.run({"features": staged})["probs"])
