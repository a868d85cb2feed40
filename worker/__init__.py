"""The serving side: micro-batching worker, supervisor, backends, reference model, CLI.

Public names: :class:`Worker`, :class:`Batcher`, :class:`EmbeddedRedis`.
"""

from worker.batcher import Batcher
from worker.embedded_redis import EmbeddedRedis
from worker.worker import Worker

__all__ = ["Batcher", "EmbeddedRedis", "Worker"]
