"""Replies are untrusted: a crafted one is refused at its first bytes, in bounded time and memory,
by the same walk-before-allocate reader the worker uses for requests (protocol/codec.py)."""

from __future__ import annotations

import struct
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import msgpack
import numpy as np
import pytest
from conftest import MODEL
from test_client_reliability import answer, entries, request_of

from producer import Client
from protocol import codec, keys, messages
from protocol.errors import InvalidInput

SIZE = 15 << 20
LIMIT = 64 << 20  # the client's reply limit


def _map(*pairs: bytes) -> bytes:
    return bytes([0x80 | len(pairs) // 2]) + b"".join(pairs)


def _str(text: str) -> bytes:
    return msgpack.packb(text)


# 3,800 arrays of 4,095 empty arrays: within a generic decoder's per-container limits (4,096), yet
# 15 MB that a generic decoder turns into 15 million Python lists (about a gigabyte).
NESTED = b"\xdc" + struct.pack(">H", 3800) + (b"\xdc\x0f\xff" + b"\x90" * 4095) * 3800

BOMBS = {
    "unknown key of nested arrays": _map(_str("id"), _str("abc"), _str("junk"), NESTED),
    "labels of nested arrays": _map(_str("id"), _str("abc"), _str("label"), NESTED),
    "outputs of nested arrays": _map(_str("outputs"), _map(_str("p"), NESTED)),
    # a top-level array32 claiming 2^32 elements, then 15 MB of nils
    "array header 2^32": b"\xdd\xff\xff\xff\xff" + b"\xc0" * SIZE,
    # maps nested 5 million deep
    "deep maps": _map(_str("id"), _str("abc"), _str("junk"), b"\x81\xa1k" * (SIZE // 3)),
    # a string claiming 2 GB
    "huge str": _map(_str("id"), b"\xdb\x7f\xff\xff\xff" + b"a" * SIZE),
    # timings as a map32 claiming 2^32 entries
    "huge map": _map(_str("timings"), b"\xdf\xff\xff\xff\xff" + b"\xa1k\x00" * (SIZE // 3)),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_a_crafted_reply_is_refused_in_bounded_time_and_memory(name):
    bomb = BOMBS[name]
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(InvalidInput, match="malformed reply"):
            messages.decode_reply(bomb, max_bytes=LIMIT)
        took_s = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert took_s < 1.0, f"{name}: {took_s:.2f} s"
    assert peak < 8 << 20, f"{name}: {peak >> 20} MB allocated decoding a {len(bomb) >> 20} MB reply"


def test_unknown_reply_keys_are_stepped_over_and_known_ones_still_checked():
    tensor = codec.encode_tensor(np.array([[0.2, 0.8]], np.float32))
    reply = {"v": 1, "id": "abc", "ok": True, "model": "m", "version": 2, "outputs": {"p": tensor},
             "future": {"nested": [1, 2, {"x": b"y"}]}, "label": ["up"], "confidence": [0.8]}
    p = messages.decode_reply(codec.pack(reply), max_bytes=LIMIT)
    assert (p.request_id, p.label, p.model_version) == ("abc", "up", 2)
    with pytest.raises(InvalidInput, match="malformed reply") as caught:
        messages.decode_reply(codec.pack({**reply, "outputs": [[1]]}), max_bytes=LIMIT)
    assert caught.value.request_id == "abc", "the wrong kind is reported once the id is known"


def test_a_bomb_in_the_reply_list_is_dropped_and_the_real_reply_returned(r, redis_server):
    with Client.from_url(redis_server.url, timeout_s=10.0, fail_fast=False) as client, \
            ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.predict, MODEL, np.zeros((60, 110), np.float32))
        entry = entries(r, 1)[0]
        key = keys.reply_key(MODEL, request_of(entry).reply_to)
        for bomb in BOMBS.values():
            r.lpush(key, bomb)
        started = time.monotonic()
        answer(r, entry)
        p = future.result(timeout=15)
    assert p.request_id == request_of(entry).request_id
    assert time.monotonic() - started < 3.0, "the bombs cost no noticeable time"
