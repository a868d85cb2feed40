"""Replies of any shape: classification, regression of any per-sample shape, several named outputs.

A call that sent one bare sample gets each output in its per-sample shape (the batch axis the client
added is removed); a call that sent N rows keeps the axis of N.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import models
import numpy as np
import onnx
import pytest
from conftest import MODEL, ThreadedWorker
from onnx import TensorProto, helper, numpy_helper

from producer import AsyncClient, Client, _core
from protocol import codec, keys, messages
from protocol.errors import InvalidInput, ReplyError
from streamserve.cli import main
from worker.worker import Worker

X = np.random.default_rng(1).standard_normal((60, 110)).astype(np.float32)
VEC = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)  # five samples of x: [4]
COUNTS = np.array([[1, 2], [0, 3], [4, 4], [2, 0], [1, 1]], np.int64)  # five samples of n: [2]
X_SPEC = {"x": {"dtype": "<f4", "shape": [4]}}
TWO_INPUTS = {**X_SPEC, "n": {"dtype": "<i8", "shape": [2]}}


# ---- small ONNX models built in code ---------------------------------------------------------


def _save(path: Path, nodes, inputs, outputs, inits) -> Path:
    graph = helper.make_graph(nodes, "outputs_test", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def regression(path: Path, outputs: dict[str, list[int]], *, counts: bool = False,
               softmax_first: bool = False) -> dict[str, np.ndarray]:
    """x (B, 4) float32 [, n (B, 2) int64] → each output ``x @ W`` of shape (B, *per-sample shape);
    with ``counts`` the sum of n is added to every scalar output; ``softmax_first`` makes the first a
    probability row. Returns the weights (see :func:`expected`)."""
    rng = np.random.default_rng(3)
    nodes, inits, weights = [], [], {}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])]
    if counts:
        inputs.append(helper.make_tensor_value_info("n", TensorProto.INT64, ["batch", 2]))
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
        nodes += [helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
                  helper.make_node("ReduceSum", ["nf", "axes"], ["nsum"], keepdims=0)]
    for i, (name, shape) in enumerate(outputs.items()):
        weights[name] = w = rng.standard_normal((4, *shape)).astype(np.float32)  # (4,) for shape []
        inits.append(numpy_helper.from_array(w, f"w_{name}"))
        last = f"{name}_lin"
        nodes.append(helper.make_node("MatMul", ["x", f"w_{name}"], [last]))
        if counts and not shape:
            nodes.append(helper.make_node("Add", [last, "nsum"], [f"{name}_sum"]))
            last = f"{name}_sum"
        op = "Softmax" if softmax_first and i == 0 else "Identity"
        nodes.append(helper.make_node(op, [last], [name], **({"axis": -1} if op == "Softmax" else {})))
    declared = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *shape])
                for name, shape in outputs.items()]
    _save(path, nodes, inputs, declared, inits)
    return weights


def expected(weights: dict[str, np.ndarray], x: np.ndarray, n: np.ndarray | None = None,
             *, softmax_first: bool = False) -> dict[str, np.ndarray]:
    """What :func:`regression`'s model answers, in numpy."""
    out = {}
    for i, (name, w) in enumerate(weights.items()):
        value = x @ w
        if n is not None and w.ndim == 1:
            value = value + n.sum(axis=1)
        if softmax_first and i == 0:
            e = np.exp(value - value.max(axis=-1, keepdims=True))
            value = e / e.sum(axis=-1, keepdims=True)
        out[name] = value
    return out


def serve(registry, path: Path, *, spec=X_SPEC, outputs: list[str], labels: list[str] | None = None):
    mv = registry.register(MODEL, path, input_spec=spec, output_names=outputs, labels=labels)
    return registry.promote(MODEL, mv.version)


@pytest.fixture
def client(redis_server):
    with Client.from_url(redis_server.url, timeout_s=5.0) as c:
        yield c


# ---- classification: as before, without the stray batch axis ---------------------------------


def test_single_sample_classification_has_per_sample_outputs_and_a_scalar_label(client, settings, production,
                                                                               model_path):
    with ThreadedWorker(Worker(settings, MODEL)):
        p = client.predict(MODEL, X)
        many = client.predict_many(MODEL, [X, X * 2])
    probs = models.reference_outputs(model_path, X[None])[0]
    assert p.single and p.n_rows == 1 and p.outputs["probs"].shape == (3,)
    np.testing.assert_allclose(p.outputs["probs"], probs, rtol=1e-5)
    assert p.label == models.LABELS[int(probs.argmax())] and isinstance(p.label, str)
    assert p.confidence == pytest.approx(float(probs.max()), rel=1e-5)
    np.testing.assert_allclose(p.value, probs, rtol=1e-5)  # the first output of one sample: an array
    assert p.values.shape == (1, 3)
    for q, w in zip(many, [X, X * 2], strict=True):  # predict_many: one single-sample Prediction each
        assert q.outputs["probs"].shape == (3,) and isinstance(q.label, str)
        np.testing.assert_allclose(q.outputs["probs"], models.reference_outputs(model_path, w[None])[0],
                                   rtol=1e-4, atol=1e-6)


def test_n_rows_keep_the_batch_axis(client, settings, production, model_path):
    rows = np.stack([X, X * 2, X * 3])
    with ThreadedWorker(Worker(settings, MODEL)):
        p = client.predict(MODEL, rows, sample_ndim=2)
        one_row = client.predict(MODEL, rows[:1], sample_ndim=2)
    assert not p.single and p.n_rows == 3 and p.outputs["probs"].shape == (3, 3)
    np.testing.assert_allclose(p.values, models.reference_outputs(model_path, rows), rtol=1e-4, atol=1e-6)
    assert len(p.labels) == len(p.confidences) == 3
    with pytest.raises(ValueError, match="exactly one sample"):
        _ = p.value
    # One row sent with its batch axis keeps it too: the caller said the array has one.
    assert one_row.outputs["probs"].shape == (1, 3) and one_row.value.shape == (3,)


# ---- regression -------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "scalar"), [([], True), ([1], True), ([3], False)])
def test_regression_outputs_of_any_per_sample_shape(client, settings, registry, tmp_path, shape, scalar):
    weights = regression(tmp_path / "reg.onnx", {"ret_5m": shape})
    serve(registry, tmp_path / "reg.onnx", outputs=["ret_5m"])
    with ThreadedWorker(Worker(settings, MODEL)):
        p = client.predict(MODEL, {"x": VEC[0]})
        rows = client.predict(MODEL, {"x": VEC}, sample_ndim=1)
    want = expected(weights, VEC)["ret_5m"]
    assert p.outputs["ret_5m"].shape == tuple(shape), "one sample: no batch axis"
    assert not p.labels
    with pytest.raises(ValueError, match="label"):
        _ = p.label
    if scalar:
        assert isinstance(p.value, float)
        assert p.value == pytest.approx(float(want[0].reshape(())), rel=1e-5)
        assert rows.values.shape == (5,)
    else:
        assert isinstance(p.value, np.ndarray) and p.value.shape == (3,)
        np.testing.assert_allclose(p.value, want[0], rtol=1e-5)
        assert rows.values.shape == (5, 3)
    assert rows.outputs["ret_5m"].shape == (5, *shape), "N rows: the axis of N is kept"
    np.testing.assert_allclose(rows.values, want.reshape(rows.values.shape), rtol=1e-5)


def test_several_named_outputs_are_each_per_sample(client, settings, registry, tmp_path):
    weights = regression(tmp_path / "multi.onnx", {"probs": [3], "ret_5m": [], "vol": [2]},
                         softmax_first=True)
    serve(registry, tmp_path / "multi.onnx", outputs=["probs", "ret_5m", "vol"], labels=models.LABELS)
    with ThreadedWorker(Worker(settings, MODEL)):
        p = client.predict(MODEL, {"x": VEC[1]})
        rows = client.predict(MODEL, {"x": VEC[:2]}, sample_ndim=1)
    want = {k: v[0] for k, v in expected(weights, VEC[1:2], softmax_first=True).items()}
    assert p.output_names == ["probs", "ret_5m", "vol"]
    assert {k: v.shape for k, v in p.outputs.items()} == {"probs": (3,), "ret_5m": (), "vol": (2,)}
    assert p.label == models.LABELS[int(want["probs"].argmax())], "labels come from the first output"
    assert p.value_of("ret_5m") == pytest.approx(float(want["ret_5m"]), rel=1e-5)
    np.testing.assert_allclose(p.value_of("vol"), want["vol"], rtol=1e-5)
    np.testing.assert_allclose(p.value, want["probs"], rtol=1e-5)
    assert rows.values_of("ret_5m").shape == (2,) and rows.values_of("vol").shape == (2, 2)
    assert len(rows.labels) == 2
    with pytest.raises(KeyError, match="ret_5m"):
        p.value_of("missing")


def test_the_asyncio_client_shapes_replies_the_same(settings, registry, tmp_path):
    weights = regression(tmp_path / "multi.onnx", {"ret_5m": [], "vol": [2]})
    serve(registry, tmp_path / "multi.onnx", outputs=["ret_5m", "vol"])

    async def calls():
        async with AsyncClient.from_url(settings.redis_url, timeout_s=5.0) as aclient:
            one = await aclient.predict(MODEL, {"x": VEC[0]})
            rows = await aclient.predict(MODEL, {"x": VEC}, sample_ndim=1)
            many = await aclient.predict_many(MODEL, [{"x": v} for v in VEC[:2]])
            return one, rows, many

    with ThreadedWorker(Worker(settings, MODEL)):
        one, rows, many = asyncio.run(calls())
    want = expected(weights, VEC)
    assert one.outputs["ret_5m"].shape == () and one.outputs["vol"].shape == (2,)
    assert one.value == pytest.approx(float(want["ret_5m"][0]), rel=1e-5)
    assert rows.outputs["ret_5m"].shape == (5,) and rows.outputs["vol"].shape == (5, 2)
    np.testing.assert_allclose(rows.values, want["ret_5m"], rtol=1e-5)
    assert [m.value for m in many] == pytest.approx(want["ret_5m"][:2].tolist(), rel=1e-5)


# ---- the worker splits every kind per request --------------------------------------------------


def _queue(r, features, sample_ndim=None) -> _core.Pending:
    pending = _core.prepare(_core.Target(MODEL), features, route="", timeout_s=30.0, sample_ndim=sample_ndim)
    r.xadd(keys.request_stream(MODEL), pending.fields)
    return pending


def _answer(r, pending: _core.Pending) -> messages.Prediction | ReplyError:
    raw = r.lpop(pending.reply_key)
    assert raw is not None, "no reply"
    return _core.shaped(_core.parse(raw), pending)


def test_one_batch_of_single_and_multi_row_requests_is_split_back_per_request(r, settings, registry,
                                                                              tmp_path):
    weights = regression(tmp_path / "reg.onnx", {"ret_5m": [], "vol": [2]})
    serve(registry, tmp_path / "reg.onnx", outputs=["ret_5m", "vol"])
    singles = [_queue(r, {"x": v}) for v in VEC[:2]]
    block = _queue(r, {"x": VEC[2:]}, sample_ndim=1)  # three rows in one request
    Worker(settings, MODEL, burst=True).run()  # one batch: five rows in one model call
    want = expected(weights, VEC)
    for i, pending in enumerate(singles):
        p = _answer(r, pending)
        assert p.value == pytest.approx(float(want["ret_5m"][i]), rel=1e-5)
        np.testing.assert_allclose(p.outputs["vol"], want["vol"][i], rtol=1e-5)
    p = _answer(r, block)
    np.testing.assert_allclose(p.outputs["ret_5m"], want["ret_5m"][2:], rtol=1e-5)
    np.testing.assert_allclose(p.outputs["vol"], want["vol"][2:], rtol=1e-5)


def test_a_reply_whose_rows_do_not_match_the_request_is_malformed():
    pending = _core.prepare(_core.Target(MODEL), {"x": VEC[0]}, route="", timeout_s=5.0, sample_ndim=None)
    request = messages.Request("1-0", pending.request_id, pending.request_id, 0, "", {"x": VEC[:1]})
    reply = messages.encode_ok(request, model=MODEL, version=1, outputs={"ret_5m": np.zeros(2, np.float32)},
                               labels=None, timings={}, worker="w")
    result = _core.shaped(_core.parse(reply), pending)
    assert isinstance(result, InvalidInput) and "1 row(s)" in str(result)
    assert result.request_id == pending.request_id


def _string_output_model(path: Path) -> Path:
    nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["ret_5m"], keepdims=0),
             helper.make_node("Cast", ["ret_5m"], ["tag"], to=TensorProto.STRING)]
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                 [helper.make_tensor_value_info("ret_5m", TensorProto.FLOAT, ["batch"]),
                  helper.make_tensor_value_info("tag", TensorProto.STRING, ["batch"])],
                 [numpy_helper.from_array(np.array([1], np.int64), "axes")])


@pytest.mark.timeout(30)
def test_an_output_the_wire_cannot_carry_fails_the_batch_not_the_worker(r, settings, registry, tmp_path):
    serve(registry, _string_output_model(tmp_path / "str.onnx"), outputs=["ret_5m", "tag"])
    pendings = [_queue(r, {"x": v}) for v in VEC[:2]]
    # Before, encoding the replies raised in the worker's loop: the batch was read again and again
    # until dead-lettered. The burst worker runs in a thread so that this test ends either way.
    runner = threading.Thread(target=Worker(settings, MODEL, burst=True).run, daemon=True)
    runner.start()
    runner.join(15)
    assert not runner.is_alive(), "the worker kept retrying the batch instead of answering it"
    for pending in pendings:
        error = _answer(r, pending)
        assert error.code == "INTERNAL" and "model output 'tag'" in str(error), error


def _two_by_three_model(path: Path) -> Path:
    w = np.random.default_rng(4).standard_normal((4, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["flat"]),
             helper.make_node("Reshape", ["flat", "shape"], ["probs"])]
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                 [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 2, 3])],
                 [numpy_helper.from_array(w, "w"),
                  numpy_helper.from_array(np.array([0, 2, 3], np.int64), "shape")])


@pytest.mark.timeout(30)
def test_labels_need_a_first_output_of_one_row_per_sample(r, settings, registry, tmp_path):
    # Three labels and a last axis of 3, but two rows of them per sample: no label can be picked.
    serve(registry, _two_by_three_model(tmp_path / "grid.onnx"), outputs=["probs"], labels=models.LABELS)
    pending = _queue(r, {"x": VEC[0]})
    runner = threading.Thread(target=Worker(settings, MODEL, burst=True).run, daemon=True)
    runner.start()
    runner.join(15)
    assert not runner.is_alive(), "the worker kept retrying the batch instead of answering it"
    error = _answer(r, pending)
    assert error.code == "INTERNAL" and "per-sample shape [2, 3], not [3]" in str(error), error


# ---- streamserve predict builds its sample from the registered input spec ----------------------


def _cli(settings) -> list[str]:
    return ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir)]


@pytest.mark.timeout(30)
def test_predict_command_builds_its_sample_from_the_registered_spec(settings, registry, tmp_path, capsys):
    weights = regression(tmp_path / "two.onnx", {"ret_5m": [], "vol": [2]}, counts=True)
    serve(registry, tmp_path / "two.onnx", spec=TWO_INPUTS, outputs=["ret_5m", "vol"])
    np.savez(tmp_path / "in.npz", x=VEC[0].astype(np.float64), n=COUNTS[0])  # float64: cast to float32
    np.savez(tmp_path / "rows.npz", x=VEC, n=COUNTS)
    with ThreadedWorker(Worker(settings, MODEL)):
        assert main([*_cli(settings), "predict", MODEL]) == 0, capsys.readouterr().err
        random = capsys.readouterr()
        assert main([*_cli(settings), "predict", MODEL, "--npz", str(tmp_path / "in.npz")]) == 0
        given = capsys.readouterr()
        assert main([*_cli(settings), "predict", MODEL, "--npz", str(tmp_path / "rows.npz")]) == 0
        rows = json.loads(capsys.readouterr().out)
    reply = json.loads(random.out)
    assert "label" not in reply and isinstance(reply["outputs"]["ret_5m"], float)
    assert len(reply["outputs"]["vol"]) == 2
    assert "ret_5m " in random.err and "arm: none" in random.err
    want = expected(weights, VEC, COUNTS)
    assert json.loads(given.out)["outputs"]["ret_5m"] == pytest.approx(float(want["ret_5m"][0]), rel=1e-5)
    assert rows["outputs"]["ret_5m"] == pytest.approx(want["ret_5m"].tolist(), rel=1e-5)
    assert np.array(rows["outputs"]["vol"]).shape == (5, 2)


def test_predict_command_prints_label_and_confidence_per_sample(settings, production, capsys):
    with ThreadedWorker(Worker(settings, MODEL)):
        assert main([*_cli(settings), "predict", MODEL]) == 0  # the reference spec: (60, 110) float32
    out = capsys.readouterr()
    reply = json.loads(out.out)
    assert reply["label"][0] in models.LABELS and len(reply["confidence"]) == 1
    assert len(reply["outputs"]["probs"]) == 3, "one sample: no batch axis"
    assert "(confidence " in out.err


def test_predict_command_without_production_or_spec_says_so_in_one_line(settings, registry, r, tmp_path,
                                                                        capsys):
    def one_line(*args: str) -> str:
        assert main([*_cli(settings), "predict", MODEL, *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        return err

    assert "is not in the registry" in one_line()
    regression(tmp_path / "reg.onnx", {"ret_5m": []}, counts=True)
    mv = registry.register(MODEL, tmp_path / "reg.onnx", input_spec=TWO_INPUTS, output_names=["ret_5m"])
    assert "has no version in Production" in one_line()
    registry.promote(MODEL, mv.version)
    assert "--npz" in one_line("--shape", "4"), "--shape is for a model with one input"
    np.save(tmp_path / "x.npy", VEC[0])
    assert "--npz" in one_line("--npy", str(tmp_path / "x.npy"))
    np.savez(tmp_path / "wrong.npz", x=VEC[0], n=VEC[0, :2])  # floats for the int64 input
    assert "input 'n'" in one_line("--npz", str(tmp_path / "wrong.npz"))
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object), n=COUNTS[0])  # pickled member
    assert "cannot read" in one_line("--npz", str(tmp_path / "objects.npz"))
    for bad in ("not json", json.dumps({"x": {"dtype": "object", "shape": [4]}}), json.dumps([1])):
        r.hset(keys.version_hash(MODEL, mv.version), "input_spec", bad)
        assert "input_spec is unreadable" in one_line()
    r.hdel(keys.version_hash(MODEL, mv.version), "input_spec")
    assert "no input_spec" in one_line()


def test_reply_json_round_trips_through_the_codec():
    """The CLI's JSON is built from a reply decoded as any client decodes it (no hidden batch axis)."""
    request = messages.Request("1-0", "abc", "abc", int(time.time() * 1000), "", {"x": VEC[:1]})
    payload = messages.encode_ok(request, model=MODEL, version=1,
                                 outputs={"ret_5m": np.array([0.25], np.float32)}, labels=None,
                                 timings={"queue_ms": 1.0, "infer_ms": 2.0}, worker="w")
    p = messages.shaped(messages.decode_reply(payload, max_bytes=1 << 20), 1, single=True)
    assert p.outputs["ret_5m"].shape == () and p.value == 0.25
    assert codec.unpack(payload, max_bytes=1 << 20)["outputs"]["ret_5m"]["shape"] == [1], \
        "the wire keeps the batch axis; only the client removes it"
