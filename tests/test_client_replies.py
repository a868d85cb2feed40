"""Replies without Redis: malformed replies are InvalidInput, and the client's read plan
(non-destructive wait, trim only what was read, never re-send) holds step by step."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from producer import _core
from protocol import codec, messages
from protocol.errors import InvalidInput, Overloaded, Unavailable

MAX = 1 << 20
TENSOR = codec.encode_tensor(np.array([[0.1, 0.2, 0.7]], np.float32))
GOOD = {"v": 1, "id": "abc", "ok": True, "model": "m", "version": 3, "worker": "w",
        "outputs": {"probs": TENSOR}, "label": ["up"], "confidence": [0.7],
        "timings": {"queue_ms": 0.5, "infer_ms": 1}}


def test_a_well_formed_reply_decodes():
    p = messages.decode_reply(codec.pack(GOOD), max_bytes=MAX)
    assert (p.request_id, p.model_version, p.label, p.infer_ms) == ("abc", 3, "up", 1.0)


@pytest.mark.parametrize("change", [
    {"id": None}, {"id": 7}, {"id": "abc\n"},
    {"ok": None}, {"ok": "yes"},
    {"model": None}, {"model": 5},
    {"version": None}, {"version": "3"}, {"version": True},
    {"outputs": None}, {"outputs": [TENSOR]}, {"outputs": {"probs": {"dtype": "<f4"}}},
    {"label": "up"}, {"label": [1]}, {"confidence": ["high"]},
    {"timings": [1, 2]}, {"timings": {"queue_ms": "slow"}},
    {"worker": 3},
    {"ok": False}, {"ok": False, "error": "boom"}, {"ok": False, "error": {"code": 1, "message": "x"}},
])
def test_a_malformed_reply_is_invalid_input(change):
    reply = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(InvalidInput, match="malformed reply") as caught:
        messages.decode_reply(codec.pack(reply), max_bytes=MAX)
    # Once the id is readable the error names it, so the caller it belongs to gets it at once.
    assert caught.value.request_id == (None if "id" in change else "abc")


# ---- the read plan -------------------------------------------------------------------------


def reply(request_id: str, version: int) -> bytes:
    return codec.pack({**GOOD, "id": request_id, "version": version})


def exchange(n: int = 1) -> tuple[_core.Exchange, list[_core.Pending]]:
    pendings = [_core.prepare(_core.Target("m"), np.zeros((2, 3), np.float32), route="", timeout_s=5.0,
                              sample_ndim=None, reply_to="tok") for _ in range(n)]
    return _core.Exchange(pendings, 5.0, finished=["ss:{m}:reply:old"]), pendings


def names(trip: _core.Trip) -> list[object]:
    return [command[0] for command in trip.commands]


def test_first_trip_deletes_finished_keys_sends_once_and_waits_without_removing():
    ex, _ = exchange(2)
    trip = ex.trip()
    # The UNLINK after the XADDs: its answer then comes with theirs, not alone ahead of a large XADD.
    assert names(trip) == ["XADD", "XADD", "UNLINK", "BLMOVE", "LRANGE"]
    key = "ss:{m}:reply:tok"
    assert trip.commands[-2][:5] == ("BLMOVE", key, key, "RIGHT", "LEFT")
    assert trip.deadline_s == ex.gatherer.deadline_s, "no read waits past the call's deadline"
    assert trip.read_timeout_s() <= 5.0 and trip.head == 3


def test_later_trips_trim_exactly_what_was_read_and_never_resend():
    ex, pendings = exchange(2)
    ex.trip()
    first = reply(pendings[0].request_id, 1)
    ex.receive([b"1-0", b"1-1", 1, first, [first, reply("stray", 1)]])
    trip = ex.trip()
    assert names(trip) == ["LTRIM", "BLMOVE", "LRANGE"] and trip.commands[0][2:] == (0, -3)
    assert ex.gatherer.remaining == 1


def test_after_a_lost_trip_nothing_is_trimmed_or_resent():
    ex, _ = exchange()
    ex.trip()
    assert 0 < ex.lost(redis.ConnectionError("reset")) <= _core.BACKOFF_MAX_S
    assert names(ex.trip()) == ["BLMOVE", "LRANGE"]


def test_the_oldest_reply_for_an_id_wins():
    ex, pendings = exchange()
    rid = pendings[0].request_id
    ex.trip()
    older, newer = reply(rid, 1), reply(rid, 2)
    # BLMOVE rotated the oldest from the tail to the head; a newer one was pushed after it.
    ex.receive([b"1-0", 1, older, [newer, older]])
    assert ex.done() and ex.outcome()[0].model_version == 1


def test_oom_is_overloaded_and_refusal_before_sending_is_unavailable():
    ex, _ = exchange()
    ex.trip()
    oom = redis.exceptions.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'.")
    with pytest.raises(Overloaded):
        ex.receive([oom, 1, oom, []])
    ex, _ = exchange()
    ex.trip()
    with pytest.raises(Unavailable, match="cannot be reached"):
        ex.lost(_core.NotConnected("refused"))


def test_a_loss_that_outlasts_the_deadline_is_unavailable_not_a_timeout():
    ex, _ = exchange()
    ex.trip()
    ex.lost(redis.ConnectionError("reset"))
    ex.gatherer.deadline_s = 0.0  # the deadline has passed while reconnecting
    with pytest.raises(Unavailable, match="lost the connection"):
        ex.outcome()


def test_a_one_reply_call_waits_without_listing_on_its_first_trip_and_lists_after():
    x = np.zeros((60, 110), np.float32)
    single = _core.Exchange(_core.prepare_many(_core.Target("m"), [x], route="", timeout_s=5.0), 5.0)
    first = [c[0] for c in single.trip().commands]
    assert first[-1] == "BLMOVE" and "LRANGE" not in first
    single.receive([b"1-0", None])  # the XADD's id, then a wait that timed out: nothing yet
    assert [c[0] for c in single.trip().commands][-2:] == ["BLMOVE", "LRANGE"]
    many = _core.Exchange(_core.prepare_many(_core.Target("m"), [x, x], route="", timeout_s=5.0), 5.0)
    assert [c[0] for c in many.trip().commands][-2:] == ["BLMOVE", "LRANGE"]
