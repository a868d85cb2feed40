"""The reference HybridCNNLSTM: learnable synthetic data, ONNX parity, the train command."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from modeltools import reference
from streamserve.cli import main
from worker.loader import load_version


def test_synthetic_data_has_a_learnable_signal_and_is_seeded():
    x, y = reference.synthetic_dataset(600, seed=3)
    assert x.shape == (600, 60, 110) and x.dtype == np.float32
    assert set(np.unique(y)) == {0, 1, 2}
    x2, y2 = reference.synthetic_dataset(600, seed=3)
    np.testing.assert_array_equal(x, x2)
    # A one-line baseline (mean of the series vs class) must already beat chance.
    means = x.mean(axis=(1, 2))
    predicted = np.digitize(means, np.quantile(means, [1 / 3, 2 / 3]))
    assert (predicted == y).mean() > 0.5


@pytest.mark.timeout(60)  # about 9 s on 2 busy cores
def test_onnx_export_matches_torch_at_several_batch_sizes(tmp_path):
    torch.manual_seed(0)
    model = reference.HybridCNNLSTM().eval()
    path = reference.export_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, _ = reference.synthetic_dataset(9, seed=1)
    for batch in (1, 4, 9):
        (onnx_probs,) = session.run(None, {"features": x[:batch]})
        with torch.no_grad():
            torch_probs = model(torch.from_numpy(x[:batch])).numpy()
        np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-5)
        np.testing.assert_allclose(onnx_probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.timeout(180)
def test_train_command_registers_a_version_with_metrics(settings, registry, capsys):
    code = main(["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir),
                 "train", "--model", "ref", "--epochs", "2", "--n-train", "1200"])
    assert code == 0
    mv = registry.production("ref")
    assert mv.labels == ["down", "flat", "up"] and mv.input_spec == reference.input_spec()
    assert mv.metrics["accuracy"] > 0.5, "well above the 1/3 of chance after a short run"
    assert "held-out accuracy" in capsys.readouterr().out
    assert mv.golden and set(mv.alternates) == {"torch_export"}
    assert mv.metrics["parity_torch_export_max_abs_diff"] < 1e-4
    assert mv.metrics["parity_torch_export_argmax_agreement"] == 1.0
    loaded = load_version(registry, mv, settings)  # verifies sha256, loads the stored file alone
    x, y = reference.synthetic_dataset(200, seed=7)
    probs = loaded.backend.run({"features": x})["probs"]
    assert probs.shape == (200, 3) and (probs.argmax(axis=1) == y).mean() > 0.5
