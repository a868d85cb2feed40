"""The bot's clients against a real Redis and a worker thread."""

import asyncio

import models
import numpy as np
import pytest
import redis
from conftest import MODEL, ThreadedWorker

from producer import AsyncClient, Client, DeadlineExceeded, InvalidInput, ModelNotFound
from worker.worker import Worker

X = np.random.default_rng(1).standard_normal((60, 110)).astype(np.float32)


@pytest.fixture
def client(redis_server):
    with Client.from_url(redis_server.url, timeout_s=5.0) as c:
        yield c


def test_predict_single_sample(client, settings, production, model_path):
    with ThreadedWorker(Worker(settings, MODEL)):
        p = client.predict(MODEL, X, route="BTCUSDT")
    expected = models.reference_outputs(model_path, X[np.newaxis])
    assert p.model == MODEL and p.model_version == production.version
    np.testing.assert_allclose(p.outputs["probs"], expected[0], rtol=1e-5)  # one sample: no batch axis
    assert p.label == models.LABELS[int(expected.argmax())]
    assert p.confidence == pytest.approx(float(expected.max()), rel=1e-5)
    assert p.infer_ms > 0 and p.queue_ms >= 0


def test_predict_many_pipelines_and_keeps_order(client, settings, production, model_path):
    windows = [X * (i + 1) for i in range(20)]
    with ThreadedWorker(Worker(settings, MODEL)):
        results = client.predict_many(MODEL, windows)
    assert len(results) == 20
    for w, p in zip(windows, results, strict=True):
        np.testing.assert_allclose(p.outputs["probs"], models.reference_outputs(model_path, w[None])[0],
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.timeout(60)  # worker start 10 s and two calls of up to 10 s
def test_predict_many_returns_errors_in_place(client, settings, production):
    windows = [X, X[:, :10], X]
    with ThreadedWorker(Worker(settings, MODEL)):
        results = client.predict_many(MODEL, windows, return_exceptions=True)
        with pytest.raises(InvalidInput):
            client.predict_many(MODEL, windows)
    assert isinstance(results[1], InvalidInput) and results[1].code == "INVALID_INPUT"
    assert results[0].labels and results[2].labels


def test_batch_axis_request_with_sample_ndim(client, settings, production):
    with ThreadedWorker(Worker(settings, MODEL)):
        p = client.predict(MODEL, np.stack([X, X]), sample_ndim=2)
    assert p.outputs["probs"].shape == (2, 3) and len(p.labels) == 2
    with pytest.raises(ValueError, match="exactly one sample"):
        _ = p.label


def test_typed_error_from_reply(client, settings, registry, model_path):
    registry.register(MODEL, model_path, input_spec=models.SPEC, output_names=["probs"])
    with ThreadedWorker(Worker(settings, MODEL)), pytest.raises(ModelNotFound):
        client.predict(MODEL, X)


def test_client_side_timeout_when_no_worker_answers(redis_server, r):
    with Client.from_url(redis_server.url, fail_fast=False) as client:  # queued: nobody serves it
        with pytest.raises(DeadlineExceeded, match="no reply within"):
            client.predict(MODEL, X, timeout_s=0.05)
        results = client.predict_many(MODEL, [X, X], timeout_s=0.05, return_exceptions=True)
    assert all(isinstance(e, DeadlineExceeded) for e in results)


def test_health_reports_live_workers_and_versions(client, settings, production):
    assert not client.health(MODEL).ok
    with ThreadedWorker(Worker(settings, MODEL)) as worker:
        client.predict(MODEL, X)  # the worker has started and heartbeated
        health = client.health(MODEL)
        assert health.ok and health.versions == {production.version}
        assert [w.worker_id for w in health.workers] == [worker.worker_id]
    assert not client.health(MODEL).ok


def test_async_client(redis_server, settings, production):
    async def scenario():
        async with AsyncClient.from_url(redis_server.url, timeout_s=5.0) as client:
            one = await client.predict(MODEL, X)
            many = await client.predict_many(MODEL, [X, X * 2, X[:, :5]], return_exceptions=True)
            health = await client.health(MODEL)
            await client.record_outcome(MODEL, one.request_id, correct=False, pnl=-3.0)
            with pytest.raises(ModelNotFound, match="'nobody' is not in the registry"):
                await client.predict("nobody", X, timeout_s=0.05)
        return one, many, health

    with ThreadedWorker(Worker(settings, MODEL)):
        one, many, health = asyncio.run(scenario())
    assert one.model_version == production.version and len(one.labels) == 1
    assert many[0].labels and many[1].labels and isinstance(many[2], InvalidInput)
    assert health.ok
    from protocol import keys

    fields = redis.Redis.from_url(redis_server.url).xrange(keys.outcomes_stream(MODEL))[0][1]
    assert fields[b"id"] == one.request_id.encode() and fields[b"correct"] == b"0"


def test_invalid_timeout_and_request_id_are_rejected_locally(client):
    with pytest.raises(InvalidInput):
        client.predict(MODEL, X, timeout_s=-1)
    with pytest.raises(InvalidInput, match="invalid request id"):
        client.predict(MODEL, X, request_id="has space")
