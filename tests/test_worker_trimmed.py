"""Pending entries trimmed away by a bot's ``XADD … MINID ~``: acked, counted as discarded, never a crash
or a loop, whichever path finds them (take-over, idle reclaim, a worker recovering its own reads)."""

from __future__ import annotations

from conftest import MODEL
from test_takeover import GROUP, STREAM, beat, consumers, idle_for, read_as
from test_worker import drain, pending_count, reply, send

from protocol import keys


def discarded(r) -> int:
    return int(r.get(keys.discarded_counter(MODEL)) or 0)


def trim_first(r, ids: list[bytes], n: int) -> None:
    """Trim the stream to the entries from the n-th on, exactly as MINID does (pending or not)."""
    assert r.xtrim(STREAM, minid=ids[n], approximate=False) == n


def deliver(r, consumer: str, n: int) -> list[bytes]:
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    for i in range(n):
        send(r, f"q{i}")
    return read_as(r, consumer)


def test_a_dead_workers_trimmed_entries_are_discarded_and_the_rest_answered(r, settings, production):
    # More trimmed entries than one XCLAIM takes (max_batch): the take-over goes on past them.
    n, trimmed = settings.max_batch + 8, settings.max_batch + 3
    ids = deliver(r, "dead-worker", n)
    idle_for(r, "dead-worker", 60_000)
    trim_first(r, ids, trimmed)
    # Only the take-over: no idle reclaim; its guard (a heartbeat interval) well below the minute idle.
    drain(settings.with_overrides(reclaim_min_idle_ms=3_600_000, heartbeat_interval_s=0.001))
    assert [reply(r, f"q{i}")["ok"] for i in range(trimmed, n)] == [True] * (n - trimmed)
    assert r.llen(keys.reply_key(MODEL, "q0")) == 0
    assert discarded(r) == trimmed
    assert pending_count(r) == 0 and consumers(r) == {}, "the dead consumer is gone, nothing pending"


def test_trimmed_entries_idle_on_a_live_worker_are_discarded_by_the_reclaim_backstop(r, settings, production):
    ids = deliver(r, "live-worker", 6)
    beat(r, "live-worker")
    idle_for(r, "live-worker", 60_000)
    trim_first(r, ids, 4)
    drain(settings.with_overrides(reclaim_min_idle_ms=30_000))
    assert [reply(r, f"q{i}")["ok"] for i in (4, 5)] == [True, True]
    assert discarded(r) == 4 and pending_count(r) == 0


def test_a_restarted_worker_discards_its_own_trimmed_entries_and_answers_the_rest(r, settings, production):
    """The same consumer name after a restart: its lost reads come back through ``recover``."""
    ids = deliver(r, "w-restarted", 5)
    trim_first(r, ids, 3)
    worker = drain(settings.with_overrides(reclaim_min_idle_ms=3_600_000), worker_id="w-restarted")
    assert [reply(r, f"q{i}")["ok"] for i in (3, 4)] == [True, True]
    assert discarded(r) == 3 and pending_count(r) == 0
    assert worker.requests == 2
