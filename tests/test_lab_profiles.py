"""The benchmark page's profiles that are not ``make bench`` scenarios: each runs, end to end."""

from __future__ import annotations

import os
import time

import pytest
from conftest import wait_until

from lab import children, client_cpu, overlap
from protocol import keys


@pytest.mark.timeout(120)
@pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="pins a worker to core 0, Redis to core 1")
def test_the_overlap_drain_times_each_mode_from_first_answer_to_last_on_a_pinned_worker():
    own = os.sched_getaffinity(0)
    doc = overlap.run(("trivial",), pairs=1, entries={"trivial": 2000})
    assert os.sched_getaffinity(0) == own, "this process's cores given back"
    drains = doc["models"]["trivial"]["drains"]
    assert set(drains) == {"on", "off"} and all(len(d) == 1 for d in drains.values())
    for d in (*drains["on"], *drains["off"]):
        assert 0 < d["entries"] < 2000, "timed from the first entry answered, not from the worker's start"
        assert d["rps"] > 0 and 0 <= d["busy"] <= 1.5
    assert doc["models"]["trivial"]["on_off"] > 0


@pytest.mark.timeout(120)
def test_the_client_profile_measures_every_row_in_every_round():
    doc = client_cpu.run(calls=48, rounds=2)
    assert len(doc["rounds"]) == 2 and len(doc["asyncio_over_sync"]) == 2
    for measured in doc["rounds"]:
        assert set(measured) == set(client_cpu.ROWS)
        assert all(m["cpu_us"] > 0 and m["calls_per_s"] > 0 for m in measured.values())


@pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="pins this process to core 1")
def test_a_fork_server_child_runs_on_the_cores_its_parent_has_when_it_creates_it():
    ctx = children.context("lab.children")
    first = ctx.Process(target=time.sleep, args=(0.0,))
    first.start()  # the fork server now runs, on every core this process had
    first.join()
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {1})
    try:
        child = ctx.Process(target=time.sleep, args=(5.0,))
        child.start()
    finally:
        os.sched_setaffinity(0, own)
    try:
        wait_until(lambda: os.sched_getaffinity(child.pid) == {1}, 5,
                   message="the child kept the fork server's cores")
    finally:
        child.kill()
        child.join()


def test_the_overlap_drain_deletes_its_replies_by_their_keys(r):
    names = [keys.reply_key("overlap_trivial", f"o{i}") for i in range(1500)]
    for name in names[::100]:
        r.rpush(name, b"a reply")
    overlap._delete_replies(r, "overlap_trivial", 1500)
    assert not any(r.exists(name) for name in names[::100])
