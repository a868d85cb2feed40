"""The optimizer on the reference model: export parity, INT8 agreement, the gate, serving a variant."""

import json

import numpy as np
import onnx
import pytest
from conftest import ThreadedWorker
from onnx import numpy_helper

from modeltools.cli import reference_data
from modeltools.optimizer import VARIANTS, Gate, optimize, parity
from producer import Client
from streamserve.cli import main
from worker.worker import Worker

NAME = "hybrid_cnn_lstm"


def damaged_copy(source, out, scale=0.8):
    """The same graph with every weight tensor perturbed: a variant the gate must reject."""
    model = onnx.load(str(source))
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:
        w = numpy_helper.to_array(tensor)
        if w.dtype == np.float32 and w.size > 100:
            noise = scale * rng.standard_normal(w.shape).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(w + noise, tensor.name))
    onnx.save(model, str(out))
    return out


@pytest.mark.timeout(300)
def test_optimize_gates_benchmarks_registers_and_serves_int8(settings, registry, tmp_path, capsys):
    base = ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir)]
    assert main([*base, "train", "--epochs", "2", "--n-train", "1200", "--n-test", "600"]) == 0
    mv = registry.get(NAME, 1)
    data = reference_data(mv)
    damaged = damaged_copy(registry.artifact_path(mv), tmp_path / "damaged.onnx")
    report = optimize(registry, mv, data, tmp_path / "work", seconds=0.05, extra={"damaged": damaged})

    doc = report.to_json()
    assert set(doc["variants"]) == {*VARIANTS, "damaged"}
    for v in doc["variants"].values():
        assert set(v["bench"]) == {"1", "8", "32"}
        assert all(v["bench"][b]["p50_ms"] > 0 and v["bench"][b]["throughput_rps"] > 0 for b in v["bench"])
        assert v["size_bytes"] > 0 and v["rss_delta_mb"] > 0
    fp32 = doc["variants"]["onnx_fp32"]["parity"]
    assert fp32["max_abs_diff"] < 1e-4 and fp32["agreement"] == 1.0, "export round trip"
    for name in ("onnx_int8_dynamic", "onnx_int8_static"):
        assert doc["variants"][name]["parity"]["agreement"] >= 0.99 and doc["variants"][name]["accepted"]
    assert not doc["variants"]["damaged"]["accepted"]
    assert "agreement" in doc["variants"]["damaged"]["rejected"]

    mv = registry.get(NAME, 1)
    assert set(mv.alternates) == {"torch_export", "onnx_fp32", "onnx_optimized", "onnx_int8_dynamic",
                                  "onnx_int8_static"}, "accepted variants registered, the damaged one not"
    assert mv.metrics["onnx_int8_dynamic.b1_p50_ms"] > 0 and "damaged.agreement" not in mv.metrics
    assert report.recommended in doc["variants"] and doc["variants"][report.recommended]["accepted"]

    registry.select_variant(NAME, 1, "onnx_int8_dynamic")
    with ThreadedWorker(Worker(settings, NAME)), Client.from_url(settings.redis_url) as client:
        p = client.predict(NAME, data.x_test[0])
        worker = client.health(NAME).workers[0]
    assert worker.variant == "onnx_int8_dynamic" and p.model_version == 1
    assert p.label in ("down", "flat", "up")
    assert main([*base, "registry", "list", NAME]) == 0
    assert "onnx_int8_dynamic" in capsys.readouterr().out


def test_gate_thresholds():
    gate = Gate(min_agreement=0.99, max_accuracy_drop_pp=0.5)
    assert gate.check({"agreement": 0.995, "accuracy_delta_pp": -0.4}) == ""
    assert "agreement" in gate.check({"agreement": 0.98, "accuracy_delta_pp": 0.0})
    assert "accuracy" in gate.check({"agreement": 1.0, "accuracy_delta_pp": -0.6})


def test_parity_numbers():
    reference = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    variant = np.array([[0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.5, 0.3, 0.2], [0.6, 0.3, 0.1]])
    labels = np.array([0, 1, 2, 1])
    p = parity(variant, reference, labels)
    assert p["agreement"] == 0.75 and p["max_abs_diff"] == pytest.approx(0.3)
    assert p["accuracy"] == 0.5 and p["accuracy_delta_pp"] == pytest.approx(-25.0)


@pytest.mark.timeout(240)  # trains, then optimizes: 27-36 s measured on 2 cores, 53 s on 2 busy ones
def test_optimize_cli_writes_json(settings, registry, tmp_path):
    base = ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir)]
    assert main([*base, "train", "--epochs", "1", "--n-train", "600", "--n-test", "400"]) == 0
    out = tmp_path / "opt.json"
    assert main([*base, "optimize", NAME, "1", "--seconds", "0.01", "--batch-sizes", "1",
                 "--min-agreement", "0.9", "--max-accuracy-drop-pp", "5", "--variant", "recommended",
                 "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["variants"]) == set(VARIANTS)
    selected = registry.get(NAME, 1).serving_variant
    assert selected == ("torch_export" if doc["recommended"] == "pytorch" else doc["recommended"])
