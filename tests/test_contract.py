"""The ONNX contract checked at registration: input spec matched or inferred, outputs, labels, golden."""

from __future__ import annotations

import json

import models
import numpy as np
import onnx
import pytest
from conftest import MODEL
from onnx import TensorProto, helper, numpy_helper

from protocol import keys
from protocol.errors import RegistryError
from registry.contract import ContractError, check_onnx, register_onnx
from streamserve.cli import main
from worker.worker import Worker


def save(path, nodes, inputs, outputs, inits=()):
    """A graph of ``nodes`` saved as an opset-18 model (the way tests/models.py builds its own)."""
    graph = helper.make_graph(nodes, "contract_test", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def identity(path, shape, dtype=TensorProto.FLOAT):
    """x → y, both of ``shape`` (its first axis the batch axis, fixed or not)."""
    return save(path, [helper.make_node("Identity", ["x"], ["y"])],
                [helper.make_tensor_value_info("x", dtype, shape)],
                [helper.make_tensor_value_info("y", dtype, shape)])


def regression(path):
    """Inputs x (float, named batch axis) and n (int64, unnamed batch axis); outputs score (N, 1),
    flat (N,), positive (bool, N x 4) and count (N, 1): a multi-output model with no class probabilities."""
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(4, 1), "w")
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["score"]),
             helper.make_node("Squeeze", ["score", "axes"], ["flat"]),
             helper.make_node("Greater", ["x", "zero"], ["positive"]),
             helper.make_node("Cast", ["n"], ["count"], to=TensorProto.FLOAT)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
              helper.make_tensor_value_info("n", TensorProto.INT64, [None, 1])]
    outputs = [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1]),
               helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["N"]),
               helper.make_tensor_value_info("positive", TensorProto.BOOL, ["N", 4]),
               helper.make_tensor_value_info("count", TensorProto.FLOAT, [None, 1])]
    return save(path, nodes, inputs, outputs, [w, zero, axes])


def base(settings):
    return ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir)]


def nothing_registered(r, settings) -> bool:
    store = settings.artifact_dir
    return r.keys("*") == [] and (not store.exists() or not any(p.is_file() for p in store.rglob("*")))


@pytest.mark.parametrize(("spec", "message"), [
    ({"x": {"dtype": "<f4", "shape": [60, 110]}},
     "input 'x' is not in the model: the graph's inputs are ['features']"),
    ({"features": {"dtype": "<f8", "shape": [60, 110]}},
     "input 'features': dtype <f8 in the spec, <f4 (float) in the graph"),
    ({"features": {"dtype": "float32", "shape": [60, 100]}},
     "input 'features': per-sample shape [60, 100] in the spec, [60, 110] in the graph"),
    ({"features": {"dtype": "<f4", "shape": [6600]}},
     "input 'features': per-sample shape [6600] in the spec, [60, 110] in the graph"),
    ({"features": {"dtype": "<f4", "shape": [60, 110]}, "extra": {"dtype": "<f4", "shape": [1]}},
     "input 'extra' is not in the model: the graph's inputs are ['features']"),
])
def test_a_spec_that_does_not_fit_the_graph_is_one_line_and_registers_nothing(
        r, settings, registry, model_path, spec, message):
    with pytest.raises(ContractError) as caught:
        register_onnx(registry, MODEL, model_path, input_spec=spec, labels=models.LABELS)
    assert str(caught.value) == message
    assert nothing_registered(r, settings)


def test_the_cli_refuses_a_wrong_spec_in_one_line_with_exit_status_2(r, settings, model_path, capsys):
    spec = json.dumps({"features": {"dtype": "<f8", "shape": [60, 110]}})
    assert main([*base(settings), "registry", "register", MODEL, str(model_path), "--input-spec", spec]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "ContractError: input 'features': dtype <f8 in the spec, <f4 (float) in the graph" in err
    assert nothing_registered(r, settings)


def test_the_spec_is_inferred_from_a_dynamic_batch_axis_and_printed(settings, registry, model_path, capsys):
    assert main([*base(settings), "registry", "register", MODEL, str(model_path),
                 "--labels", "down,flat,up"]) == 0
    out = capsys.readouterr().out
    assert f"input spec (inferred from the graph): {json.dumps(models.SPEC)}" in out
    mv = registry.get(MODEL, 1)
    assert mv.input_spec == models.SPEC and mv.output_names == ["probs"] and mv.labels == models.LABELS
    assert mv.output_spec == {"probs": {"dtype": "<f4", "shape": [3], "kind": "probabilities"}}


def test_a_fixed_batch_axis_is_refused(r, settings, registry, tmp_path):
    with pytest.raises(ContractError, match=r"^input 'x': the graph fixes the leading \(batch\) axis at 4; "):
        register_onnx(registry, MODEL, identity(tmp_path / "four.onnx", [4, 3]))
    # Fixed at 1, it is the batch axis in the graph's eyes, but a batch of 2 rows shows it is not one.
    with pytest.raises(ContractError, match=r"^the model fails on a sample batch of 2 rows \(the graph fixes "
                                            r"the batch axis of \['x'\] at 1\): "):
        register_onnx(registry, MODEL, identity(tmp_path / "one.onnx", [1, 3]))
    assert nothing_registered(r, settings)


def test_a_dynamic_per_sample_axis_needs_a_spec_which_must_fit_its_fixed_axes(registry, tmp_path):
    path = identity(tmp_path / "ragged.onnx", ["batch", "time", 3])
    with pytest.raises(ContractError, match=r"^input 'x': axis 1 is dynamic \(time\) in the graph, and a "
                                            r"spec needs fixed per-sample shapes: give the input spec"):
        check_onnx(path, None)
    with pytest.raises(ContractError, match=r"^input 'x': per-sample shape \[5, 4\] in the spec, "
                                            r"\['time', 3\] in the graph$"):
        check_onnx(path, {"x": {"dtype": "<f4", "shape": [5, 4]}})
    mv = register_onnx(registry, MODEL, path, input_spec={"x": {"dtype": "<f4", "shape": [5, 3]}})
    assert mv.input_spec == {"x": {"dtype": "<f4", "shape": [5, 3]}}
    assert mv.output_spec == {"y": {"dtype": "<f4", "shape": [5, 3], "kind": "value"}}


def test_an_output_without_the_batch_axis_is_refused(r, settings, registry, tmp_path):
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    path = save(tmp_path / "total.onnx", [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [axes])
    with pytest.raises(ContractError) as caught:
        register_onnx(registry, MODEL, path)
    assert str(caught.value) == "output 'y' does not keep the batch axis: a batch of 2 rows gave shape [3]"
    assert nothing_registered(r, settings)


def test_labels_must_fit_the_first_output(r, settings, registry, model_path):
    with pytest.raises(ContractError) as caught:
        register_onnx(registry, MODEL, model_path, labels=["down", "up"])
    assert str(caught.value) == ("labels: 2 given, but the first output 'probs' has per-sample shape [3]; "
                                 "it must be [2]")
    assert nothing_registered(r, settings)


def test_a_regression_model_with_several_outputs_registers_with_kind_value(registry, tmp_path):
    mv = register_onnx(registry, MODEL, regression(tmp_path / "reg.onnx"), label="1.0.0")
    assert mv.input_spec == {"x": {"dtype": "<f4", "shape": [4]}, "n": {"dtype": "<i8", "shape": [1]}}
    assert mv.output_names == ["score", "flat", "positive", "count"]
    assert mv.output_spec == {"score": {"dtype": "<f4", "shape": [1], "kind": "value"},
                              "flat": {"dtype": "<f4", "shape": [], "kind": "value"},
                              "positive": {"dtype": "|b1", "shape": [4], "kind": "value"},
                              "count": {"dtype": "<f4", "shape": [1], "kind": "value"}}
    assert registry.get(MODEL, mv.version) == mv  # the output spec round-trips through the hash
    # The golden outputs are those the golden check can compare (it subtracts: not the bool one).
    assert set(registry.golden(mv)) == {"input:x", "input:n", "output:score", "output:flat", "output:count"}
    with pytest.raises(ContractError, match=r"^outputs: \['score'\] given, the graph's outputs are "
                                            r"\['score', "):
        register_onnx(registry, MODEL, tmp_path / "reg.onnx", output_names=["score"])


def test_the_golden_outputs_are_stored_and_checked_by_a_worker(r, settings, registry, tmp_path, model_path):
    mv = register_onnx(registry, MODEL, model_path, labels=models.LABELS)
    golden = registry.golden(mv)
    assert golden["input:features"].shape == (2, 60, 110)
    expected = models.reference_outputs(model_path, golden["input:features"])
    np.testing.assert_allclose(golden["output:probs"], expected, atol=1e-6)
    registry.promote(MODEL, mv.version)
    worker = Worker(settings, MODEL, burst=True)
    worker.slot.reconcile()
    assert worker.slot.loaded is not None and worker.slot.loaded.version.version == mv.version
    worker.redis.close()
    # Another model under the same golden outputs: the worker's check refuses to serve it.
    other = registry.register(MODEL, models.linear_softmax(tmp_path / "other.onnx", seed=7),
                              input_spec=models.SPEC, output_names=["probs"], golden=golden)
    registry.promote(MODEL, other.version)
    worker = Worker(settings, MODEL, burst=True)
    worker.slot.reconcile()
    assert worker.slot.loaded is None and "golden output 'probs' differs" in worker.slot.load_error
    worker.redis.close()


def test_a_malformed_output_spec_in_redis_is_a_registry_error_naming_the_field(r, registry, model_path):
    mv = register_onnx(registry, MODEL, model_path, labels=models.LABELS)
    r.hset(keys.version_hash(MODEL, mv.version), "output_spec", json.dumps({"probs": {"dtype": "<f4"}}))
    with pytest.raises(RegistryError, match="output_spec"):
        registry.get(MODEL, mv.version)
    r.hset(keys.version_hash(MODEL, mv.version), "output_spec",
           json.dumps({"probs": {"dtype": "object", "shape": [3], "kind": "value"}}))
    with pytest.raises(RegistryError, match="output_spec.*not a wire dtype"):
        registry.get(MODEL, mv.version)


def test_a_torch_primary_still_needs_its_spec(r, settings, capsys, tmp_path):
    pt2 = tmp_path / "m.pt2"
    pt2.write_bytes(b"not inspected")
    assert main([*base(settings), "registry", "register", MODEL, str(pt2), "--format", "torch_export"]) == 2
    assert "a torch_export artifact needs --input-spec" in capsys.readouterr().err
    assert nothing_registered(r, settings)


def test_optimize_on_an_onnx_only_version_is_one_line_with_exit_status_2(settings, registry, model_path,
                                                                         capsys):
    register_onnx(registry, MODEL, model_path, labels=models.LABELS, label="1.0.0")
    assert main([*base(settings), "optimize", MODEL, "1.0.0"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith(f"streamserve optimize: NotOptimizable: {MODEL} v1 (1.0.0) has no "
                                   "torch_export artifact to optimize from: optimize needs a PyTorch export "
                                   "program (.pt2)")
    assert "a data file (--data FILE.npz" in captured.err


def test_a_model_with_external_weights_is_stored_as_one_file_a_worker_elsewhere_loads(
        r, settings, registry, tmp_path, model_path):
    """torch's exporter writes large weights to model.onnx.data beside the graph; the store keeps one
    file per artifact, so before, a worker whose working directory did not hold the data failed."""
    folder = tmp_path / "export"
    folder.mkdir()
    split = folder / "model.onnx"
    onnx.save(onnx.load(str(model_path)), str(split), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    assert (folder / "model.onnx.data").exists()
    mv = register_onnx(registry, MODEL, split, labels=models.LABELS)
    (folder / "model.onnx.data").unlink()  # the export folder is gone: only the registry's copy remains
    registry.promote(MODEL, mv.version)
    worker = Worker(settings, MODEL, burst=True)
    worker.run()
    assert worker.slot.loaded is not None and worker.slot.loaded.version.version == mv.version


def test_a_sample_larger_than_a_request_is_refused_before_it_is_allocated(r, settings, registry, tmp_path):
    """A graph (or spec) naming a per-sample shape of gigabytes: one line, not a MemoryError."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 100_000, 100_000])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 100_000, 100_000])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "huge", [x], [y])
    path = tmp_path / "huge.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(ContractError, match=r"input 'x': per-sample shape \[100000, 100000\] makes a 2-row "
                                            r"sample of 80,000,000,000 bytes"):
        register_onnx(registry, MODEL, path)
    assert nothing_registered(r, settings)


def test_external_weights_that_are_missing_are_one_line_with_exit_status_2(r, settings, tmp_path, model_path,
                                                                           capsys):
    folder = tmp_path / "copied"
    folder.mkdir()
    onnx.save(onnx.load(str(model_path)), str(folder / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    (folder / "model.onnx.data").unlink()  # only the graph was copied: the usual mistake
    code = main([*base(settings), "registry", "register", MODEL, str(folder / "model.onnx"),
                 "--labels", ",".join(models.LABELS)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot be inlined" in err, err
    assert nothing_registered(r, settings)
