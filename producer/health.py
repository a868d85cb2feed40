"""Can a live worker serve this model? Read from the workers' heartbeats (``protocol.presence``).

A worker of several models writes a heartbeat for every model it serves, loaded or not
(its ``cache`` field). It can serve a model it has loaded, one it is loading, and one it
does not hold (``cold`` or ``evicted``): the first request loads it. One whose load failed
and that has no version cannot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from protocol import presence
from protocol.presence import DEFAULT_TTL_S, Heartbeat

if TYPE_CHECKING:
    import redis

WorkerInfo = Heartbeat  # the name this client has always exported


@dataclass(frozen=True)
class Health:
    """Live workers of a model; ``ok`` when at least one can serve it."""

    model: str
    workers: list[Heartbeat]

    @property
    def serving_workers(self) -> list[Heartbeat]:
        """The live workers that can serve the model now or on its first request
        (``Heartbeat.can_serve``): not stopping, and loaded, loading, or loading on demand."""
        return [w for w in self.workers if w.can_serve]

    @property
    def loaded_workers(self) -> list[Heartbeat]:
        """Of ``serving_workers``, those with a version in memory (``version`` is not None)."""
        return [w for w in self.serving_workers if w.version is not None]

    @property
    def ok(self) -> bool:
        """True if some live worker can serve the model (``serving_workers`` is not empty)."""
        return bool(self.serving_workers)

    @property
    def versions(self) -> set[int]:
        """The versions live workers have loaded (a worker without the model loaded adds none)."""
        return {w.version for w in self.workers if w.version is not None}

    def __repr__(self) -> str:
        versions = sorted(self.versions)
        return (f"Health({self.model} ok={self.ok} workers={len(self.workers)} "
                f"loaded={len(self.loaded_workers)} versions={versions})")


def read_health(client: redis.Redis, model: str, ttl_s: float = DEFAULT_TTL_S) -> Health:
    """Two round trips: live member ids, then their hashes."""
    return Health(model, presence.read_live(client, model, ttl_s))
