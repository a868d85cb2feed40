"""Is a live worker serving this model? Read from the workers' heartbeats (``protocol.presence``)."""

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
    """Live workers of a model; ``ok`` when at least one serves a version."""

    model: str
    workers: list[Heartbeat]

    @property
    def ok(self) -> bool:
        """True if some live worker has a model loaded and is not shutting down."""
        return any(w.version is not None and w.state in ("serving", "loading") for w in self.workers)

    @property
    def versions(self) -> set[int]:
        """The versions live workers serve."""
        return {w.version for w in self.workers if w.version is not None}

    def __repr__(self) -> str:
        versions = sorted(self.versions)
        return f"Health({self.model} ok={self.ok} workers={len(self.workers)} versions={versions})"


def read_health(client: redis.Redis, model: str, ttl_s: float = DEFAULT_TTL_S) -> Health:
    """Two round trips: live member ids, then their hashes."""
    return Health(model, presence.read_live(client, model, ttl_s))
