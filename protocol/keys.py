"""Every Redis key and channel streamserve uses is spelled here, and only here.

Per-model keys carry the hash tag ``{<model>}`` so that every multi-key command
(the reply+ack transaction, the wait on a reply list, registry updates)
touches a single Redis Cluster slot. A model served from S stream shards has one
tag per shard: ``{<model>}`` for shard 0 (the unsharded keys) and
``{<model>:<k>}`` for shard k ≥ 1. A shard's request streams (one per priority
lane), reply lists, dead letters and experiment journal share its tag, so its
reply+ack transaction stays in one slot while the shards spread over the nodes.
"""

from __future__ import annotations

import functools
import re

from protocol.errors import InvalidInput

PREFIX = "ss"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
# fullmatch, never match with "$": "$" also matches before a trailing newline.
_REQUEST_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")


def check_model_name(model: str) -> str:
    """Return ``model`` if it is a valid model name (no braces, ≤ 64 chars), else raise."""
    if not isinstance(model, str) or not _NAME.fullmatch(model):
        raise InvalidInput(f"invalid model name {model!r}: use [A-Za-z0-9_.-], at most 64 chars")
    return model


def check_request_id(request_id: str) -> str:
    """Return ``request_id`` if it is a valid request id, else raise ``InvalidInput``."""
    if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
        raise InvalidInput(f"invalid request id {request_id!r}: use [A-Za-z0-9_-], 1-64 chars")
    return request_id


MAX_SHARDS = 256
# Priority lanes, highest first: workers drain ``live`` before ``backfill``, and shed ``backfill`` first.
LANES = ("live", "backfill")
_LANE_SUFFIX = {"live": "requests", "backfill": "backfill"}


def check_shard(shard: int) -> int:
    """Return ``shard`` if it is a valid shard number (0 ≤ shard < ``MAX_SHARDS``), else raise."""
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < MAX_SHARDS:
        raise InvalidInput(f"invalid shard {shard!r}: an integer from 0 to {MAX_SHARDS - 1}")
    return shard


def check_lane(lane: str) -> str:
    """Return ``lane`` if it is a priority lane (``live``, ``backfill``), else raise."""
    if lane not in _LANE_SUFFIX:
        raise InvalidInput(f"invalid lane {lane!r}: one of {', '.join(LANES)}")
    return lane


def _tag(model: str, shard: int = 0) -> str:
    if type(model) is str and type(shard) is int:  # noqa: E721 (exact types: hashable, and no bool)
        return _checked_tag(model, shard)
    return _checked_tag.__wrapped__(model, shard)  # refused with the checks' own error


# Cached: every key of every request starts with it, and its checks are regular expressions.
@functools.lru_cache(maxsize=4096)
def _checked_tag(model: str, shard: int) -> str:
    name = check_model_name(model)
    return f"{PREFIX}:{{{name}}}" if check_shard(shard) == 0 else f"{PREFIX}:{{{name}:{shard}}}"


def request_stream(model: str, shard: int = 0, lane: str = "live") -> str:
    """The stream bots XADD requests to: one per shard and priority lane (``live`` = unsharded name)."""
    return f"{_tag(model, shard)}:{_LANE_SUFFIX[check_lane(lane)]}"


def shards_hash(model: str) -> str:
    """The model's shard layout (``protocol.sharding``): shards clients route to, workers serve, ever used."""
    return f"{_tag(model)}:shards"


def load_hash(model: str, shard: int = 0) -> str:
    """A shard's load as workers last measured it: backlog per lane and drain rate (backpressure)."""
    return f"{_tag(model, shard)}:load"


def discarded_counter(model: str, shard: int = 0) -> str:
    """Integer: entries of a shard answered without a model call (expired, shed, invalid, dead-lettered).

    Subtracted from the entries the group has answered, it leaves those computed: the
    drain rate a shard is shed on is the fleet's compute rate, not how fast it discards.
    """
    return f"{_tag(model, shard)}:stats:discarded"


def consumer_group(model: str) -> str:
    """The consumer group all workers of ``model`` share (not a key, but named here)."""
    return "workers"


def reply_key(model: str, request_id: str, shard: int = 0) -> str:
    """The list a worker LPUSHes the reply to and the bot reads (docs/protocol.md §4), in the shard's slot."""
    return f"{_tag(model, shard)}:reply:{check_request_id(request_id)}"


def done_key(model: str, request_id: str, shard: int = 0) -> str:
    """A computed request's marker, next to its reply list in the shard's slot: the reply's payload,
    kept ``idempotency_window_s`` so that a re-sent request (``resend``) gets it again uncomputed."""
    return f"{_tag(model, shard)}:done:{check_request_id(request_id)}"


def done_probe_key(model: str, shard: int = 0) -> str:
    """A key among the markers that no request id names ("." is not allowed in one): what a worker
    writes at start-up to learn whether its ACL lets it keep markers."""
    return f"{_tag(model, shard)}:done:.probe"


def reply_key_pattern(model: str, shard: int = 0) -> str:
    """A SCAN/KEYS pattern matching every reply list of a shard of ``model`` (operators and tests)."""
    return f"{_tag(model, shard)}:reply:*"


def dead_letter_stream(model: str, shard: int = 0) -> str:
    """Entries of a shard delivered too many times (or unanswerable), with the reason."""
    return f"{_tag(model, shard)}:dead"


def workers_zset(model: str) -> str:
    """Live workers of a model: member = worker id, score = last heartbeat (ms)."""
    return f"{_tag(model)}:workers"


def worker_hash(model: str, worker_id: str) -> str:
    """A worker's self-description (version served, pid, host, counters), with a TTL."""
    return f"{_tag(model)}:worker:{worker_id}"


def batch_histogram(model: str, shard: int = 0) -> str:
    """Hash: batch size → number of batches run from a shard (all workers of the model)."""
    return f"{_tag(model, shard)}:stats:batch_sizes"


def history_stream(model: str) -> str:
    """Every stage and alias change of a model: who, when, from, to, reason."""
    return f"{PREFIX}:registry:{{{check_model_name(model)}}}:history"


def aliases_hash(model: str) -> str:
    """Hash: alias (e.g. ``champion``) → version."""
    return f"{PREFIX}:registry:{{{check_model_name(model)}}}:aliases"


def experiment_hash(model: str) -> str:
    """The model's current (or last) experiment: versions, split, mode, salt, margins, status."""
    return f"{_tag(model)}:experiment"


def experiment_counts(model: str, experiment_id: str, shard: int = 0) -> str:
    """Hash: ``<arm>:requests`` and ``<arm>:errors:<CODE>`` counters of one experiment, per shard."""
    return f"{_tag(model, shard)}:exp:{experiment_id}:counts"


def experiment_journal(model: str, experiment_id: str, shard: int = 0) -> str:
    """Capped stream per shard, one entry per request an arm answered or failed (the entry id is its time).

    Fields: id, arm, version, route, latency_ms, then label or error (shadow mode:
    shadow_version with shadow_label or shadow_error).
    """
    return f"{_tag(model, shard)}:exp:{experiment_id}:journal"


def experiment_replay(model: str, experiment_id: str, shard: int = 0) -> str:
    """Capped stream per shard of what production saw: request id, arm, version, inputs (msgpack), label."""
    return f"{_tag(model, shard)}:exp:{experiment_id}:replay"


def experiment_covariates(model: str, experiment_id: str) -> str:
    """Hash written once at creation: each route's pre-period hit rate and mean P&L with their counts
    (``route:<route>``, at most 10,000 routes) and ``about`` (JSON: why variance reduction is off, or
    where the pre-period came from). Bounded, never expired, like the experiment's other keys."""
    return f"{_tag(model)}:exp:{experiment_id}:covariates"


def experiment_decisions(model: str, experiment_id: str) -> str:
    """The audit trail: every analysis with its tests and decision."""
    return f"{_tag(model)}:exp:{experiment_id}:decisions"


def outcomes_stream(model: str) -> str:
    """Delayed outcomes reported by bots: request id, correct / label, pnl."""
    return f"{_tag(model)}:outcomes"


def experiments_set() -> str:
    """Models that have (had) an experiment."""
    return f"{PREFIX}:experiments"


def models_set() -> str:
    """Set of registered model names."""
    return f"{PREFIX}:registry:models"


def model_hash(model: str) -> str:
    """Registry hash of a model: version counter, production version, timestamps."""
    return f"{PREFIX}:registry:{{{check_model_name(model)}}}:model"


def version_hash(model: str, version: int) -> str:
    """Registry hash of one version: artifact, sha256, format, spec, labels, metrics, stage."""
    return f"{PREFIX}:registry:{{{check_model_name(model)}}}:version:{int(version)}"


def control_channel() -> str:
    """Pub/sub channel for fleet commands (reload); a nudge, the registry is the truth."""
    return f"{PREFIX}:control"


def labels_hash(model: str) -> str:
    """Hash: version label (e.g. ``1.1.0``, at most 64 chars) → version, one field per labelled version.

    An index for finding a version by its label and keeping labels unique; the version hash's
    ``label`` field is the truth. Bounded by the model's versions; a deleted version's label goes.
    """
    return f"{PREFIX}:registry:{{{check_model_name(model)}}}:labels"
