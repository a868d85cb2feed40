"""Bounded model calls: rows per call are capped, and a long call keeps its worker alive."""

from __future__ import annotations

import threading
import time

import models
import numpy as np
import pytest
from conftest import MODEL, ThreadedWorker, wait_until
from test_worker import drain, reply, send

from protocol import codec, keys
from worker.processing import BatchProcessor
from worker.worker import Worker

RNG = np.random.default_rng(5)


def rows_of(n: int) -> np.ndarray:
    return RNG.standard_normal((n, 60, 110)).astype(np.float32)


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """Rows of every model call any worker of this process makes, in order."""
    made: list[int] = []
    real = BatchProcessor._call

    def counted(loaded, batch):
        made.append(sum(r.n_rows for r in batch))
        return real(loaded, batch)

    monkeypatch.setattr(BatchProcessor, "_call", staticmethod(counted))
    return made


def test_rows_per_model_call_never_exceed_the_cap_and_an_entry_over_it_runs_alone(
        r, settings, production, model_path, calls):
    sizes = [300, 300, 300, 1200, 100]
    inputs = {f"e{i}": rows_of(n) for i, n in enumerate(sizes)}
    for request_id, x in inputs.items():
        send(r, request_id, x, rows=False)
    drain(settings.with_overrides(max_batch_rows=700, max_request_rows=2000, max_message_bytes=40 << 20))
    # In order: 300+300 (a third would pass 700), 300, the 1,200-row entry alone, 100.
    assert calls == [600, 300, 1200, 100]
    for request_id, x in inputs.items():
        got = reply(r, request_id)
        probs = codec.decode_tensor(got["outputs"]["probs"], max_bytes=1 << 20)
        np.testing.assert_allclose(probs, models.reference_outputs(model_path, x), rtol=1e-4, atol=1e-6)
    assert r.hgetall(keys.batch_histogram(MODEL)) == {b"600": b"1", b"300": b"1", b"1200": b"1", b"100": b"1"}


def test_the_default_cap_comes_from_the_input_size_and_the_memory_budget(r, settings, production, calls):
    """Two 568-row entries (15 MB each) used to make one 1,136-row call; now each is a call."""
    worker = Worker(settings, MODEL, burst=True)
    worker.slot.reconcile()
    wait_until(lambda: worker.slot.swap_if_ready() or worker.slot.loaded, message="model not loaded")
    assert worker.slot.loaded is not None
    cap = worker.processor.max_rows(worker.slot.loaded)
    sample_bytes = 60 * 110 * np.dtype("<f4").itemsize  # models.SPEC
    assert cap == int(settings.batch_memory_mb * (1 << 20)) // sample_bytes
    assert 568 <= cap < 2 * 568
    for i in range(2):
        send(r, f"big{i}", rows_of(568), rows=False)
    worker.run()
    assert calls == [568, 568]
    assert all(reply(r, f"big{i}")["ok"] for i in range(2))


@pytest.mark.timeout(60)
def test_a_model_call_longer_than_the_heartbeat_ttl_is_neither_taken_over_nor_computed_twice(
        r, settings, production, monkeypatch):
    """The call outlives the TTL threefold while another worker keeps checking for dead workers and
    idle entries: the heartbeat (and the entry's idle time) are kept fresh during the call."""
    s = settings.with_overrides(reclaim_min_idle_ms=1000)
    call_s = 3 * s.heartbeat_ttl_s
    made: list[str] = []
    started, finished = threading.Event(), threading.Event()
    real = BatchProcessor._call

    def slow_first(loaded, batch):
        made.append(threading.current_thread().name)
        if len(made) == 1:
            started.set()
            time.sleep(call_s)  # the model call itself: what takes long here is the point of the test
            finished.set()
        return real(loaded, batch)

    monkeypatch.setattr(BatchProcessor, "_call", staticmethod(slow_first))
    other = Worker(s, MODEL, burst=True)
    try:
        with ThreadedWorker(Worker(s, MODEL)) as busy:
            send(r, "slow")
            wait_until(started.is_set, 5, message="the call did not start")
            # The other worker's checks, over and over until the call ends; any take-over ends the loop.
            taken = wait_until(lambda: other.take_over() + other.reclaim() or finished.is_set(),
                               call_s + 7, interval_s=0.05)
            assert taken is True, f"{taken} entries taken from a live worker in a long call"
            wait_until(lambda: r.llen(keys.reply_key(MODEL, "slow")), 5, message="no reply")
        assert len(made) == 1, "computed once"
        assert r.llen(keys.reply_key(MODEL, "slow")) == 1
        assert busy.batches == 1
    finally:
        other.redis.close()
        other.metrics.close()
