"""Is a live worker serving this model? Read from the workers' heartbeats."""

from __future__ import annotations

import time
from dataclasses import dataclass

from protocol import keys

STALE_AFTER_MS = 5_000


@dataclass(frozen=True)
class WorkerInfo:
    """One live worker's heartbeat."""

    worker_id: str
    version: int | None
    backend: str
    state: str
    error: str
    age_ms: int
    host: str = ""
    pid: int = 0
    target_version: int | None = None
    failed_version: int | None = None
    fallback: str = ""  # why the selected artifact is not the one serving
    variant: str = ""  # which of the version's artifacts serves ("primary", "onnx_int8_dynamic", …)


@dataclass(frozen=True)
class Health:
    """Live workers of a model; ``ok`` when at least one serves a version."""

    model: str
    workers: list[WorkerInfo]

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


def _info(data: dict, now_ms: int) -> WorkerInfo:
    d = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
         for k, v in data.items()}
    return WorkerInfo(d["worker_id"], _int_or_none(d.get("version")),
                      d.get("backend", ""), d.get("state", ""), d.get("error", ""),
                      now_ms - int(d.get("heartbeat_ms", now_ms)), d.get("host", ""),
                      int(d.get("pid", 0)), _int_or_none(d.get("target_version")),
                      _int_or_none(d.get("failed_version")), d.get("fallback", ""), d.get("variant", ""))


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value else None


def members_query(model: str) -> tuple[str, int, str]:
    """ZRANGEBYSCORE arguments selecting workers heard from recently."""
    return keys.workers_zset(model), int(time.time() * 1000) - STALE_AFTER_MS, "+inf"


def build(model: str, hashes: list[dict]) -> Health:
    """Health from the worker hashes (expired ones come back empty and are skipped)."""
    now_ms = int(time.time() * 1000)
    return Health(model, [_info(h, now_ms) for h in hashes if h])


def read_health(client, model: str) -> Health:
    """Two round trips: live member ids, then their hashes."""
    members = client.zrangebyscore(*members_query(model))
    pipe = client.pipeline(transaction=False)
    for m in members:
        pipe.hgetall(keys.worker_hash(model, m.decode() if isinstance(m, bytes) else m))
    return build(model, pipe.execute() if members else [])
