import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import codec, messages
from protocol.errors import InvalidInput

LIMIT = 1 << 20


@pytest.mark.parametrize("dtype", sorted(codec.DTYPES))
def test_round_trip_every_supported_dtype(dtype):
    array = (np.arange(24) % 3).astype(np.dtype(dtype)).reshape(2, 3, 4)
    wire = codec.unpack(codec.pack(codec.encode_tensor(array)), max_bytes=LIMIT)
    decoded = codec.decode_tensor(wire, max_bytes=LIMIT)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


def test_big_endian_input_is_sent_little_endian():
    array = np.arange(4, dtype=">f4")
    wire = codec.encode_tensor(array)
    assert wire["dtype"] == "<f4"
    np.testing.assert_array_equal(codec.decode_tensor(wire, max_bytes=LIMIT), array)


@pytest.mark.parametrize("array", [np.array(["a"], dtype=object), np.array(["ab"]),
                                   np.zeros(2, dtype=np.complex64)])
def test_object_string_and_complex_dtypes_are_rejected(array):
    with pytest.raises(InvalidInput, match="unsupported dtype"):
        codec.encode_tensor(array)


@pytest.mark.parametrize("tensor, message", [
    ({"dtype": "|O", "shape": [1], "data": b"\0" * 8}, "unsupported tensor dtype"),
    ({"dtype": "<f4", "shape": [2], "data": b"\0" * 4}, "needs 8"),
    ({"dtype": "<f4", "shape": [-1], "data": b""}, "non-negative"),
    ({"dtype": "<f4", "shape": [1 << 40], "data": b""}, "exceeds"),
    ({"dtype": "<f4", "shape": [1] * 9, "data": b"\0" * 4}, "at most 8"),
    ({"dtype": "<f4", "shape": [1], "data": "text"}, "bin"),
    ({"dtype": "<f4", "shape": [1]}, "exactly"),
])
def test_malformed_tensors_are_rejected(tensor, message):
    with pytest.raises(InvalidInput, match=message):
        codec.decode_tensor(tensor, max_bytes=LIMIT)


def test_oversized_message_is_rejected_before_decoding():
    with pytest.raises(InvalidInput, match="exceeds"):
        codec.unpack(b"\x00" * 2048, max_bytes=1024)


def test_msgpack_extension_types_are_rejected():
    with pytest.raises(InvalidInput, match="extension"):
        codec.unpack(msgpack.packb(msgpack.ExtType(5, b"x")), max_bytes=LIMIT)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_unpack_and_decode_only_raise_our_error(payload):
    try:
        obj = codec.unpack(payload, max_bytes=LIMIT)
        codec.decode_tensor(obj, max_bytes=LIMIT)
    except InvalidInput:
        pass


tensor_like = st.fixed_dictionaries({
    "dtype": st.sampled_from(["<f4", "<i8", "|O", "", "<f4\x00"]) | st.text(max_size=5),
    "shape": st.lists(st.integers(-2, 10) | st.booleans() | st.text(max_size=2), max_size=10),
    "data": st.binary(max_size=64) | st.text(max_size=4),
})


@settings(max_examples=300, deadline=None)
@given(inputs=st.dictionaries(st.text(max_size=8), tensor_like, max_size=3) | st.binary(max_size=64),
       version=st.sampled_from([b"1", b"2", b"", b"\xff"]), deadline=st.binary(max_size=8))
def test_fuzz_decode_request_only_raises_invalid_input(inputs, version, deadline):
    body = inputs if isinstance(inputs, bytes) else msgpack.packb(inputs, use_bin_type=True)
    fields = {b"v": version, b"id": b"req1", b"deadline_ms": deadline, b"inputs": body}
    try:
        messages.decode_request("1-1", fields, max_bytes=LIMIT)
    except InvalidInput as e:
        assert e.request_id == "req1"


def test_request_round_trip_and_reply_codes():
    x = np.ones((2, 60, 110), np.float32)
    fields = messages.encode_request("abc", {"features": x}, deadline_ms=123, route="BTCUSDT")
    raw = {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}
    request = messages.decode_request("5-0", raw, max_bytes=LIMIT)
    got = (request.request_id, request.deadline_ms, request.route, request.n_rows)
    assert got == ("abc", 123, "BTCUSDT", 2)
    np.testing.assert_array_equal(request.inputs["features"], x)


def test_unknown_protocol_version_is_a_clear_invalid_input():
    fields = {b"v": b"2", b"id": b"abc", b"inputs": b""}
    with pytest.raises(InvalidInput, match="unsupported protocol version '2'; this worker speaks 1"):
        messages.decode_request("1-1", fields, max_bytes=LIMIT)


def _wire(fields):
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}


@pytest.mark.parametrize("resend, raw, expected", [
    (False, None, False), (True, None, True), (False, b"1", True), (False, b"0", False),
    (False, b"true", False), (False, b"", False),
])
def test_resend_field_is_written_only_when_true_and_read_as_exactly_1(resend, raw, expected):
    x = np.ones((1, 3), np.float32)
    fields = _wire(messages.encode_request("abc", {"features": x}, deadline_ms=123, resend=resend))
    assert (b"resend" in fields) == resend
    if raw is not None:
        fields[b"resend"] = raw
    assert messages.decode_request("5-0", fields, max_bytes=LIMIT).resend is expected


def _walked(fn, payload, **kwargs):
    """``fn`` with the small-payload path off: the schema walk alone."""
    saved, codec.FAST_MAX_BYTES = codec.FAST_MAX_BYTES, 0
    try:
        return fn(payload, **kwargs)
    except InvalidInput as e:
        return type(e), str(e)
    finally:
        codec.FAST_MAX_BYTES = saved


def _fast(fn, payload, **kwargs):
    try:
        return fn(payload, **kwargs)
    except InvalidInput as e:
        return type(e), str(e)


def _bytes_data(value):
    """Tensor data as bytes (the walk leaves a view into the payload, the C unpacker a copy)."""
    if isinstance(value, dict):
        return {k: _bytes_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bytes_data(v) for v in value]
    if isinstance(value, codec.Unread):
        return "<unread>"
    return bytes(value) if isinstance(value, memoryview) else value


REPLY = {"v": 1, "id": "r1", "ok": True, "model": "m", "version": 3, "worker": "w", "variant": None,
         "outputs": {"probs": codec.encode_tensor(np.array([[0.1, 0.9]], dtype=np.float32))},
         "timings": {"queue_ms": 0.5}, "label": ["up"], "confidence": [0.9], "future_key": [1, 2]}


@pytest.mark.parametrize("reply", [
    REPLY,
    {**REPLY, "label": "not a list"},  # a wrong kind: the walk keeps the atom
    {**REPLY, "outputs": [1, 2]},  # a wrong container: the walk marks it unread
    {**REPLY, "version": b"bin"},
    {**REPLY, "timings": {"queue_ms": [1]}},
    {**REPLY, "outputs": {"probs": {"dtype": "<f4", "shape": [True], "data": b""}}},
    {"ok": False, "error": {"code": "INTERNAL", "message": "x" * 70_000}},  # over the string bound
    {1: 2},
])
def test_a_small_reply_decodes_exactly_as_the_schema_walk_decodes_it(reply):
    payload = msgpack.packb(reply, use_bin_type=True)
    kwargs = {"max_bytes": 1 << 20, "max_tensors": 16}
    assert _bytes_data(_fast(codec.unpack_reply, payload, **kwargs)) == \
        _bytes_data(_walked(codec.unpack_reply, payload, **kwargs))


@pytest.mark.parametrize("payload", [
    msgpack.packb({"x": codec.encode_tensor(np.ones((2, 3), dtype=np.float32))}, use_bin_type=True),
    msgpack.packb({"x": {"dtype": "<f4", "shape": [1], "data": b"abcd", "extra": 1}}, use_bin_type=True),
    msgpack.packb({"x": {"dtype": 5}}, use_bin_type=True),
    b"\x82\xa1x\x80\xa1x\x80",  # a map repeating its key "x": the walk refuses it
    msgpack.packb([[[]] * 8] * 8, use_bin_type=True),
])
def test_small_request_inputs_decode_exactly_as_the_schema_walk_decodes_them(payload):
    kwargs = {"max_bytes": 1 << 20, "max_tensors": 16}
    assert _bytes_data(_fast(codec.unpack_tensors, payload, **kwargs)) == \
        _bytes_data(_walked(codec.unpack_tensors, payload, **kwargs))


def test_small_payloads_take_the_c_unpacker_and_large_ones_the_walk():
    small = msgpack.packb(REPLY, use_bin_type=True)
    big = msgpack.packb({**REPLY, "outputs": {"x": codec.encode_tensor(np.zeros(20_000, np.float32))}},
                        use_bin_type=True)
    kwargs = {"max_bytes": 1 << 20, "max_tensors": 16}
    assert isinstance(codec.unpack_reply(small, **kwargs)["outputs"]["probs"]["data"], bytes)  # C unpacker
    assert isinstance(codec.unpack_reply(big, **kwargs)["outputs"]["x"]["data"], memoryview)  # walked


@pytest.mark.parametrize("outputs, labels", [
    ({"probs": np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.5, 0.5]], np.float32)}, ["down", "up"]),
    ({"probs": np.random.default_rng(1).random((4, 3)).astype(">f4"),  # big-endian: sent little-endian
      "ret": np.arange(4, dtype=np.float64), "raw": np.ones((4, 2, 2), np.int16)}, ["a", "b", "c"]),
    ({"ret": np.arange(4, dtype=np.float32)}, None),
])
def test_a_batchs_replies_are_the_bytes_each_request_would_get_alone(outputs, labels):
    x = np.zeros((1, 2), np.float32)
    requests = [messages.Request(f"{i}-0", f"r{i}", f"r{i}", 0, "", {"x": np.repeat(x, n, axis=0)})
                for i, n in enumerate((1, 2, 1))]
    timings = [{"queue_ms": float(i), "infer_ms": 0.5} for i in range(3)]
    variants = [None, "control", "treatment"]
    batch = messages.encode_ok_many(requests, model="m", version=2, outputs=outputs, labels=labels,
                                    timings=timings, worker="w", variants=variants)
    alone, row = [], 0
    for r, t, v in zip(requests, timings, variants, strict=True):
        part = {k: a[row:row + r.n_rows] for k, a in outputs.items()}
        alone.append(messages.encode_ok(r, model="m", version=2, outputs=part, labels=labels, timings=t,
                                        worker="w", variant=v))
        row += r.n_rows
    assert batch == alone


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, -0.0, 0.25, 0.5, 1.0, math.inf, -math.inf, math.nan]),
                         min_size=3, max_size=3), min_size=1, max_size=12),
       st.sampled_from(["<f4", "<f8", "<f2"]))
def test_labels_and_confidences_are_numpys_argmax_and_max_for_any_rows(rows, dtype):
    probs = np.array(rows, dtype=dtype)
    labels, confidences = messages._top_classes(probs, ["a", "b", "c"])
    assert labels == [["a", "b", "c"][i] for i in probs.argmax(axis=-1).tolist()]
    assert np.array_equal(np.array(confidences), probs.max(axis=-1).astype(float), equal_nan=True)


def test_a_single_sample_prediction_keeps_every_field_but_the_batch_axis():
    full = messages.Prediction("r1", "m", 3, {"probs": np.array([[0.2, 0.8]], np.float32)}, ["up"], [0.8],
                               1.5, 0.25, "w1", "treatment")
    single = messages.shaped(full, 1, single=True)
    assert single.outputs["probs"].shape == (2,) and single.single
    kept = {k: v for k, v in vars(full).items() if k not in ("outputs", "single")}
    assert {k: v for k, v in vars(single).items() if k not in ("outputs", "single")} == kept
    assert all(v != getattr(messages.Prediction, k, None) for k, v in kept.items())  # none at its default


def _outcome(decode, payload):
    try:
        p = decode(payload)
    except Exception as e:  # noqa: BLE001 (the error is what is compared)
        return type(e).__name__, str(e)
    return {**vars(p), "outputs": {k: (a.dtype.str, a.shape, a.tobytes()) for k, a in p.outputs.items()}}


QUICK = {k: v for k, v in REPLY.items() if k not in ("future_key", "variant")}
TAKEN = [QUICK, {**QUICK, "variant": "control"}, {**QUICK, "confidence": [1]}, {**QUICK, "timings": {}},
         {k: v for k, v in QUICK.items() if k not in ("label", "confidence", "timings", "worker", "v")}]
LEFT = [REPLY,  # an unknown key, and nil for the variant
        {**QUICK, "version": True}, {**QUICK, "version": 3.0}, {**QUICK, "label": [1]}, {**QUICK, "ok": 1},
        {**QUICK, "confidence": [True]}, {**QUICK, "timings": {"queue_ms": True}}, {**QUICK, "id": "a b"},
        {**QUICK, "timings": {str(i): 0 for i in range(33)}}, {**QUICK, "outputs": {"p": {"dtype": "<f4"}}},
        {**QUICK, "outputs": {f"o{i}": QUICK["outputs"]["probs"] for i in range(17)}},
        {**QUICK, "worker": None}, {**QUICK, "v": [1]},
        {**QUICK, "ok": False, "error": {"code": "INTERNAL", "message": "m"}}]


@pytest.mark.parametrize("reply, taken", [(r, True) for r in TAKEN] + [(r, False) for r in LEFT])
def test_a_usual_reply_decodes_in_one_pass_exactly_as_the_general_path_decodes_it(reply, taken):
    payload = msgpack.packb(reply, use_bin_type=True)
    assert (messages._quick_prediction(payload, LIMIT) is not None) == taken
    assert _outcome(lambda b: messages.decode_reply(b, max_bytes=LIMIT), payload) == \
        _outcome(lambda b: messages._decode_reply(b, LIMIT), payload)


def test_a_reply_over_the_callers_limit_is_refused_on_the_one_pass_path_too():
    payload = msgpack.packb(QUICK, use_bin_type=True)
    with pytest.raises(InvalidInput, match="exceeds"):
        messages.decode_reply(payload, max_bytes=len(payload) - 1)
