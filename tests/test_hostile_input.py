"""Hostile input is contained: bounded decoding, whole-string id checks, strict numbers."""

import time
import tracemalloc

import msgpack
import numpy as np
import pytest

from protocol import codec, keys, messages
from protocol.errors import InvalidInput

MAX_BYTES = 16 << 20
ENTRY_MB = 15


def _entry(inputs: bytes, request_id: str = "h1") -> dict[bytes, bytes]:
    return {b"v": b"1", b"id": request_id.encode(), b"deadline_ms": b"0", b"inputs": inputs}


def _peak_bytes(fn) -> int:
    """Peak traced allocation while ``fn`` runs (numpy and msgpack buffers included)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _nested_arrays(n_bytes: int) -> bytes:
    """``{"x": [tree, tree, …]}``: trees of 8-item arrays, 1 byte per list, within msgpack's limits.

    A generic ``unpackb`` turns each of those bytes into a 56-byte Python list.
    """
    tree = b"\x90"
    for _ in range(7):  # 8**7 leaves, 2.4 MB
        tree = b"\x98" + tree * 8
    copies = max(1, n_bytes // len(tree))
    return b"\x81\xa1x\xdc" + copies.to_bytes(2, "big") + tree * copies


HOSTILE = {
    "nested empty arrays": _nested_arrays(ENTRY_MB << 20),
    "a map of small ints": msgpack.packb({"x": {"dtype": "<f4", "shape": list(range(2_000_000))}}),
    "many input names": msgpack.packb({f"n{i}": 0 for i in range(1_000_000)}),
    "a long string": msgpack.packb({"x": {"dtype": "a" * (ENTRY_MB << 20)}}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_body_is_refused_within_twice_its_size(name):
    payload = HOSTILE[name]

    def decode():
        with pytest.raises(InvalidInput):
            messages.decode_request("1-0", _entry(payload), max_bytes=MAX_BYTES)

    peak = _peak_bytes(decode)
    assert peak <= 2 * len(payload) + (1 << 20), f"{name}: {peak:,} bytes for a {len(payload):,}-byte entry"


def test_generic_msgpack_would_have_blown_up_on_the_same_bytes():
    # The reason for the schema walk: the same nested-array body through a plain unpackb.
    payload = _nested_arrays(1 << 20)
    peak = _peak_bytes(lambda: msgpack.unpackb(payload, max_array_len=4096))
    assert peak > 10 * len(payload)


def test_a_legitimate_large_tensor_is_a_view_into_the_entry():
    array = np.ones((4000, 60, 16), dtype=np.float32)  # 15.4 MB
    payload = codec.pack({"features": codec.encode_tensor(array)})
    result: dict = {}

    def decode():
        result["r"] = messages.decode_request("1-0", _entry(payload), max_bytes=MAX_BYTES)

    peak = _peak_bytes(decode)
    assert peak <= len(payload) // 10 + (1 << 20), "the tensor data was copied"
    np.testing.assert_array_equal(result["r"].inputs["features"], array)


@pytest.mark.parametrize("body, message", [
    (codec.pack({"x": {"dtype": "<f4", "shape": [1], "data": b"\0" * 4}}) + b"\xc0", "trailing"),
    (b"\x81\xa1x\x84\xa5dtype\xa3<f4\xa5dtype\xa3<f4", "at most 3|repeats"),
    (codec.pack({"x": {"dtype": "<f4", "shape": [1.5], "data": b""}}), "int"),
    (codec.pack({"x": {"dtype": "<f4", "shape": [1], "data": "text"}}), "bin"),
    (codec.pack({"x": {"dtype": "<f4", "shape": [1], "blob": b""}}), "unknown key"),
    (codec.pack({"x": {"dtype": "<f4", "shape": [1], "data": b"\0" * 4}})[:-2], "past the end|ends"),
    (codec.pack({"x": {"dtype": "<f4", "shape": [3, 3], "data": b"\0" * 4}}), "needs 36"),
    (codec.pack({"x": {"dtype": "<f4", "shape": [1 << 40, 1 << 40], "data": b""}}), "exceeds"),
    (codec.pack({"x": {"dtype": "<f4", "shape": [1] * 9, "data": b""}}), "at most 8"),
    (codec.pack([1, 2, 3]), "map"),
    (b"", "ends before"),
])
def test_malformed_bodies_get_a_clear_invalid_input(body, message):
    with pytest.raises(InvalidInput, match=message) as info:
        messages.decode_request("1-0", _entry(body), max_bytes=MAX_BYTES)
    assert info.value.request_id == "h1"


@pytest.mark.parametrize("value", ["abc\n", "abc\r", " abc", "a/b", "", "x" * 65, "a{b}"])
def test_ids_and_reply_tokens_are_matched_as_whole_strings(value):
    with pytest.raises(InvalidInput):
        keys.check_request_id(value)
    entry = _entry(codec.pack({"x": codec.encode_tensor(np.zeros((1, 1), np.float32))}))
    assert messages.reply_address({**entry, b"id": value.encode()}) is None
    assert messages.reply_address({**entry, b"reply_to": value.encode()}) is None


@pytest.mark.parametrize("value", [b"12.5", b"1e12", b"-5", b"0x10", b"\xd9\xa0", b"9" * 20])
def test_deadline_must_be_whole_milliseconds(value):
    entry = _entry(codec.pack({"x": codec.encode_tensor(np.zeros((1, 1), np.float32))}))
    with pytest.raises(InvalidInput, match="deadline_ms|UTF-8"):
        messages.decode_request("1-0", {**entry, b"deadline_ms": value}, max_bytes=MAX_BYTES)


def test_a_whole_millisecond_deadline_is_kept():
    deadline_ms = int(time.time() * 1000) + 5000
    entry = _entry(codec.pack({"x": codec.encode_tensor(np.zeros((1, 1), np.float32))}))
    request = messages.decode_request("1-0", {**entry, b"deadline_ms": str(deadline_ms).encode()},
                                      max_bytes=MAX_BYTES)
    assert request.deadline_ms == deadline_ms
