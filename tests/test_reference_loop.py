"""The reference loop of ``bench-peers`` (lab/reference_loop.py) answers with the model's own outputs."""

from __future__ import annotations

import numpy as np
import pytest

from lab import overhead, reference_loop
from lab.bench_peers import PeersConfig, run_peers, serving, shares, trivial_onnx
from modeltools import reference
from protocol import codec, keys, messages

SHAPE = (reference.TIMESTEPS, reference.N_FEATURES)


def _expected(path, x):
    session = reference_loop.session(str(path))
    return session.run(None, {reference.INPUT_NAME: x})[0]


def test_one_batch_stacks_the_waiting_requests_and_replies_to_each_in_its_list(r, redis_server, tmp_path):
    path = trivial_onnx(tmp_path / "trivial.onnx")
    rng = np.random.default_rng(1)
    windows = [rng.standard_normal((rows, *SHAPE)).astype(np.float32) for rows in (1, 2, 1)]
    stream = keys.request_stream("loop_t")
    for i, x in enumerate(windows):
        r.xadd(stream, messages.encode_request(f"r{i}", {reference.INPUT_NAME: x}, deadline_ms=0))
    reference_loop.serve(redis_server.url, "loop_t", str(path), batches=1)  # all three: one batch
    for i, x in enumerate(windows):
        key = keys.reply_key("loop_t", f"r{i}")
        assert 0 < r.pttl(key) <= reference_loop.REPLY_TTL_MS
        (reply,) = r.lrange(key, 0, -1)
        probs = codec.decode_tensor(codec.unpack(reply, max_bytes=1 << 20)[reference.OUTPUT_NAME],
                                    max_bytes=1 << 20)
        np.testing.assert_allclose(probs, _expected(path, x), rtol=1e-5, atol=1e-6)
    assert r.xlen(stream) == 0 and r.xpending(stream, keys.consumer_group("loop_t"))["pending"] == 0


@pytest.mark.timeout(60)
def test_the_bench_serves_the_loop_from_its_own_processes(redis_server, tmp_path):
    path = trivial_onnx(tmp_path / "trivial.onnx")
    x = np.random.default_rng(2).standard_normal((1, *SHAPE)).astype(np.float32)
    with serving("loop", path, redis_server, 2, tmp_path) as (target, pids):
        assert len(pids) == 2
        client = reference_loop.LoopClient(target.redis_url, target.model, 5.0)
        outputs = client.predict({reference.INPUT_NAME: x})
        client.close()
    np.testing.assert_allclose(outputs[reference.OUTPUT_NAME], _expected(path, x), rtol=1e-5, atol=1e-6)
    cfg = PeersConfig(processes=1, sequential_requests=5, client_processes=1, client_threads=2,
                      saturated_requests=5, rounds=2)  # 3 + 2 calls, each thread 3 + 2
    doc = run_peers(cfg, tmp_path, systems=("loop",), models=("trivial",), progress=lambda _: None)
    assert doc["results"]["loop/trivial"]["sequential"]["n"] == 5
    assert doc["results"]["loop/trivial"]["saturated"]["n"] == 10


def test_the_overhead_profile_measures_both_systems_per_call_and_under_load():
    doc = overhead.run(calls=20, rounds=1, saturated_requests=2, saturated_clients=(1, 2))
    assert set(doc["median"]) == set(doc["saturated"]["median"]) == {"loop", "streamserve"}
    for m in doc["median"].values():
        assert m["p50_ms"] > 0 and m["client_cpu_us"] > 0 and m["server_cpu_us"] >= 0
    for m in doc["saturated"]["median"].values():
        assert m["rps"] > 0 and m["client_cpu_us"] > 0 and m["server_cpu_us"] >= 0 and m["redis_cpu_us"] >= 0
    assert doc["p50_ratio"] > 0


def test_calls_are_split_over_rounds_as_evenly_as_whole_calls_allow():
    assert shares(1000, 3) == [334, 333, 333] and shares(5, 2) == [3, 2] and shares(4, 4) == [1] * 4
