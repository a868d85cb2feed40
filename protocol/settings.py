"""One validated settings object, built once at start-up and passed down.

Every field can be set from the environment with the ``STREAMSERVE_`` prefix
(``STREAMSERVE_MAX_BATCH=32``); CLI flags override it. No other module reads
the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Connection, batching, reliability and limits; see docs/protocol.md for the wire side."""

    model_config = SettingsConfigDict(env_prefix="STREAMSERVE_", frozen=True, extra="forbid")

    redis_url: str = "redis://localhost:6379/0"
    artifact_dir: Path = Path("var/artifacts")
    cache_dir: Path | None = Field(
        None, description="where the experiment statistics keep their calibrations (a calibration/ folder "
        "inside; default: ~/.cache/streamserve)")
    model: str = Field("hybrid_cnn_lstm", description="the model commands act on when none is named")

    max_batch: int = Field(32, ge=1, le=4096, description="entries per batch (one read's COUNT)")
    max_batch_rows: int = Field(
        0, ge=0, le=1_000_000, description="rows per model call: a batch's entries are computed in "
        "calls of at most this many rows, and an entry with more rows is computed alone (0: "
        "batch_memory_mb over one sample's input bytes, from the served version's input spec)")
    batch_memory_mb: float = Field(
        16.0, gt=0, le=65_536, description="input bytes one model call may stack (MiB), what "
        "max_batch_rows is derived from when it is 0; the model's own memory grows with the rows")
    max_wait_ms: float = Field(0.0, ge=0, le=10_000, description="wait after a batch's first item")
    backfill_max_batch: int = Field(
        8, ge=1, le=4096, description="lower-lane entries per batch while live requests are arriving: "
        "bounds how long a live request waits behind backfill (full batches when the live lane is quiet)")
    spin_ms: float = Field(
        0.0, ge=0, le=100, description="low-latency mode: after each batch the worker polls its socket "
        "for the next entries this long before it sleeps in the kernel (a core busy meanwhile; 0: off)")
    overlap_io: bool = Field(
        True, description="under load, send the next batch's read before the model call and read the "
        "reply transaction's answer after the next one, so Redis round trips overlap the model call "
        "(single-node Redis; a cluster client writes and waits)")
    block_ms: int = Field(200, ge=1, le=60_000, description="idle XREADGROUP block; bounds shutdown")
    reply_ttl_s: float = Field(60.0, gt=0, description="reply list expiry")
    idempotency_window_s: float = Field(
        60.0, gt=0, le=86_400, description="how long a computed reply is kept as the request id's "
        "marker (keys.done_key): a re-sent request (field resend=1) within it gets that reply again "
        "instead of a second model call")
    intra_op_threads: int = Field(1, ge=0, description="ONNX Runtime threads (0 = ORT default)")
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="cuda: fail unless a CUDA backend is available; auto: CUDA when present")

    model_memory_mb: float = Field(
        0.0, ge=0, le=1_048_576, description="a multi-model worker's cache budget (MiB): the least "
        "recently used unpinned model is evicted when the measured sizes of the loaded ones exceed it "
        "(0: no limit)")
    max_loaded_models: int = Field(
        0, ge=0, le=10_000, description="a multi-model worker keeps at most this many models loaded, "
        "evicting the least recently used unpinned one (0: no limit)")

    reclaim_min_idle_ms: int = Field(30_000, ge=0, description="pending idle time before reclaim")
    reclaim_interval_s: float = Field(5.0, gt=0)
    max_deliveries: int = Field(3, ge=1, description="deliveries before dead-lettering")
    dead_letter_maxlen: int = Field(100_000, ge=1)

    heartbeat_interval_s: float = Field(1.0, gt=0)
    heartbeat_ttl_s: float = Field(5.0, gt=0)
    reconcile_interval_s: float = Field(10.0, gt=0, description="re-read the registry")
    grace_period_s: float = Field(10.0, gt=0, description="SIGTERM: time to finish the batch")

    load_interval_s: float = Field(0.25, gt=0, description="how often workers publish their shards' load")
    shards: str = Field("", pattern=r"^(\d{1,3}(,\d{1,3})*)?$",
                        description="comma-separated shards a worker reads (empty: what the layout serves)")
    metrics_port: int = Field(0, ge=0, le=65535, description="HTTP /metrics, /healthz, /readyz (0: off)")

    max_message_bytes: int = Field(16 << 20, ge=1024, description="bound on one decoded entry")
    max_request_rows: int = Field(1024, ge=1, description="samples one request may carry")

    # min_length also refuses "**********", what a JSON dump of a SecretStr holds in place of the secret.
    control_secret: SecretStr | None = Field(
        None, min_length=16, description="HMAC-SHA256 key for control messages: when set, workers obey "
        "only messages signed with it and publishers sign theirs (docs/security.md)")

    @model_validator(mode="after")
    def _heartbeat_outlives_interval(self) -> Settings:
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_ttl_s must exceed heartbeat_interval_s")
        return self

    @property
    def shard_list(self) -> list[int] | None:
        """``shards`` as numbers; None when empty (read what the layout serves)."""
        return [int(k) for k in self.shards.split(",")] if self.shards else None

    def with_overrides(self, **changes: object) -> Settings:
        """A validated copy with ``changes`` applied (``None`` values ignored)."""
        data = self.model_dump()
        data.update({k: v for k, v in changes.items() if v is not None})
        return Settings.model_validate(data)
