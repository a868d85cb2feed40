"""``streamserve reload`` and ``streamserve status``: the fleet as ops see it."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypedDict, cast

import redis

from experiments.store import ExperimentStore
from producer.health import read_health
from protocol import connection, keys, messages, presence, sharding
from protocol.errors import InvalidInput, RegistryError
from protocol.settings import Settings
from protocol.values import text
from registry import PRIMARY, ModelVersion, Registry, version_title
from registry.rollout import publish_reload, wait_for_fleet
from worker.loader import load_version, version_parity

if TYPE_CHECKING:
    from protocol.presence import Heartbeat
    from protocol.values import StreamRows

STATUS_SCHEMA_VERSION = 1
STATUS_HELP = """\
With --json, one JSON document on stdout (keys are stable; new ones may be added):

  {"schema_version": 1,
   "ok": true,                      every model below is ok
   "models": {
     "<model>": {
       "ok": true,                  a live worker can serve it: not stopping, and the model
                                    loaded, loading, or loaded by its first request (cache
                                    "cold" or "evicted"); a failed load with no version cannot
       "serving_workers": 1,        live workers that can serve it (what "ok" counts)
       "loaded_workers": 1,         of those, the ones with a version in memory
       "production_version": 3,     null: nothing in Production
       "dead_letters": 0,           length of the dead-letter stream
       "streams": [                 one per request stream: stream shard and priority lane
         {"shard": 0, "lane": "live", "key": "ss:{<model>}:requests",
          "length": 0, "lag": 0,    lag: entries the group has not read (null: the server
          "pending": 0}],           cannot tell); pending: read, not yet acknowledged
       "workers": [                 live workers (heartbeat younger than heartbeat_ttl_s)
         {"worker_id": "...", "version": 3, "target_version": 3, "failed_version": null,
          "variant": "primary", "backend": "onnxruntime", "fallback": "", "state": "serving",
          "pid": 123, "host": "...", "heartbeat_age_ms": 250, "error": "",
          "batches": 10, "requests": 42,
          "cache": "loaded",        the model in that process: cold (never loaded there),
                                    loading, loaded, evicted, failed; "" from a worker that
                                    serves one model and does not say
          "loaded_at_ms": 1764150000000, "load_ms": 850.0,   wall clock and duration of its
                                    last successful load (0: never)
          "size_mb": 43.2,          measured size of the loaded model (0: not loaded, unknown)
          "load_error": "",         the last load failure of this model there
          "models": 3,              how many models that process serves
          "pinned": false}],        loaded at start and never evicted there
       "experiment": {              null: none running or paused (also when its hash cannot be
         "id": "3f2a9c1b0d4e",      read: workers then serve Production only, and say why)
         "status": "running",       running or paused
         "mode": "split",           split: each unit sees one arm; shadow: both score every request
         "unit": "route",           and the control answers (each arm's share is then 1.0)
         "control": {"version": 3, "share": 0.9},
         "treatment": {"version": 4, "share": 0.1}}}},
   "labels": {                      per model, the label of every version named above ("": none)
     "<model>": {"3": "1.1.0", "4": ""}}}

Exit status (with or without --json): 0 when every model shown is ok (or none is registered),
1 otherwise.
"""


class StreamStatus(TypedDict):
    """One request stream (shard, lane) and its consumer group."""

    shard: int
    lane: str
    key: str
    length: int
    lag: int | None
    pending: int


class WorkerStatus(TypedDict):
    """One live worker, from its heartbeat."""

    worker_id: str
    version: int | None
    target_version: int | None
    failed_version: int | None
    variant: str
    backend: str
    fallback: str
    state: str
    pid: int
    host: str
    heartbeat_age_ms: int
    error: str
    batches: int
    requests: int
    cache: str
    loaded_at_ms: int
    load_ms: float
    size_mb: float
    load_error: str
    models: int
    pinned: bool


class ArmStatus(TypedDict):
    """One arm of an experiment: its version and the share of requests it scores."""

    version: int
    share: float


class ExperimentStatus(TypedDict):
    """A model's running or paused experiment."""

    id: str
    status: str
    mode: str
    unit: str
    control: ArmStatus
    treatment: ArmStatus


class ModelStatus(TypedDict):
    """A model as ``status`` reports it."""

    ok: bool
    serving_workers: int
    loaded_workers: int
    production_version: int | None
    dead_letters: int
    streams: list[StreamStatus]
    workers: list[WorkerStatus]
    experiment: ExperimentStatus | None


class FleetStatus(TypedDict):
    """The document ``status --json`` prints (``STATUS_HELP``)."""

    schema_version: int
    ok: bool
    models: dict[str, ModelStatus]
    labels: dict[str, dict[str, str]]  # model → version (a JSON key: text) → its label


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``reload`` and ``status``."""
    p = subparsers.add_parser("reload", help="tell every worker of a model to converge on the registry")
    p.add_argument("model")
    p.add_argument("--wait", action="store_true", help="wait until every live worker serves Production")
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--allow-fallback", action="store_true",
                   help="with --wait: a worker serving Production through a fallback variant counts as "
                   "switched")
    p.set_defaults(func=_reload)
    p = subparsers.add_parser("replay", help="run a version on the inputs the current experiment journaled")
    p.add_argument("model")
    p.add_argument("version", help="number, alias or label")
    p.set_defaults(func=_replay)
    p = subparsers.add_parser("status", epilog=STATUS_HELP,
                              help="workers, versions, stream length, pending, lag, dead letters, experiment",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="*", help="default: every registered model")
    p.add_argument("--json", action="store_true", help="one JSON document for scripts (below)")
    p.set_defaults(func=_status)


def parity_checker(registry: Registry, mv: ModelVersion) -> dict[str, float]:
    """What ``registry register --alternate`` calls: outputs of every format compared."""
    return version_parity(registry, mv)


def _reload(args: argparse.Namespace, settings: Settings) -> int:
    with connection.connect(settings.redis_url) as client:
        production = Registry(client, settings.artifact_dir).production(args.model)
        target = production.version
        receivers = publish_reload(client, args.model, target, secret=settings.control_secret)
        print(f"reload {args.model} {production.title}: {receivers} subscriber(s)")
        if not args.wait:
            return 0
        report = wait_for_fleet(client, args.model, target, timeout_s=args.timeout_s,
                                ttl_s=settings.heartbeat_ttl_s, variant=production.serving_variant or PRIMARY,
                                allow_fallback=args.allow_fallback, label=production.label)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def replay(client: redis.Redis, registry: Registry, model: str, version: int,
           settings: Settings) -> dict[str, dict[str, float]]:
    """Label agreement of ``version`` with what each arm answered on the journaled inputs."""
    experiment = ExperimentStore(client, registry).get(model)
    if experiment is None:
        raise RegistryError(f"{model} has no experiment to replay")
    loaded = load_version(registry, registry.get(model, version), settings)
    agree: dict[str, list[bool]] = {}
    rows = [row for k in _shards(client, model)
            for row in cast("StreamRows", client.xrange(keys.experiment_replay(model, experiment.id, k)))]
    for _, fields in rows:
        inputs = messages.decode_inputs(fields[b"inputs"], settings.max_message_bytes)
        probs = next(iter(loaded.backend.run(inputs).values()))
        labels = ",".join(loaded.version.labels[i] for i in probs.argmax(axis=-1).tolist())
        agree.setdefault(text(fields[b"arm"]), []).append(labels == text(fields[b"label"]))
    return {arm: {"requests": len(v), "label_agreement": sum(v) / len(v)} for arm, v in agree.items()}


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    with connection.connect(settings.redis_url) as client:
        registry = Registry(client, settings.artifact_dir)
        mv = registry.resolve(args.model, args.version)
        result = replay(client, registry, args.model, mv.version, settings)
    for arm, numbers in result.items():
        print(f"{mv.title} vs what {arm} answered: {numbers['label_agreement']:.2%} "
              f"of {numbers['requests']} journaled requests")
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    with connection.connect(settings.redis_url) as client:
        registry = Registry(client, settings.artifact_dir)
        status = fleet_status(client, registry, args.model or registry.models(), settings.heartbeat_ttl_s)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        for model, model_status_ in status["models"].items():
            _print_model(model, model_status_, status["labels"][model])
    return 0 if status["ok"] else 1


def _shards(client: redis.Redis, model: str) -> range:
    """Every shard the model has used (its layout's ``highest``; one shard if the layout is malformed)."""
    try:
        return range(sharding.read_layout(client, model).highest)
    except InvalidInput:
        return range(1)


def _streams(client: redis.Redis, model: str) -> list[tuple[int, str, str]]:
    """(shard, lane, key) of every request stream of ``model``: each shard it has used, each lane."""
    return [(k, lane, keys.request_stream(model, k, lane))
            for k in _shards(client, model) for lane in keys.LANES]


def fleet_status(client: redis.Redis, registry: Registry, models: list[str], ttl_s: float) -> FleetStatus:
    """What ``status`` shows, as the document ``status --json`` prints."""
    per_model = {model: model_status(client, registry, model, ttl_s) for model in models}
    return {"schema_version": STATUS_SCHEMA_VERSION, "ok": all(m["ok"] for m in per_model.values()),
            "models": per_model,
            "labels": {model: version_labels(registry, model, m) for model, m in per_model.items()}}


def version_labels(registry: Registry, model: str, status: ModelStatus) -> dict[str, str]:
    """The label of every version ``status`` names ("" for none, or a version gone or unreadable)."""
    named = {status["production_version"]}
    for w in status["workers"]:
        named |= {w["version"], w["target_version"], w["failed_version"]}
    if status["experiment"] is not None:
        named |= {status["experiment"]["control"]["version"], status["experiment"]["treatment"]["version"]}
    labels = {}
    for version in sorted(v for v in named if v is not None):
        try:
            labels[str(version)] = registry.get(model, version).label
        except RegistryError:
            labels[str(version)] = ""
    return labels


def model_status(client: redis.Redis, registry: Registry, model: str, ttl_s: float) -> ModelStatus:
    """One model: Production, its streams, dead letters, live workers and running experiment."""
    try:
        production: int | None = registry.production(model).version
    except RegistryError:
        production = None
    health, now_ms = read_health(client, model, ttl_s), presence.now_in_ms()
    dead = sum(client.xlen(keys.dead_letter_stream(model, k)) for k in _shards(client, model))
    return {"ok": health.ok, "serving_workers": len(health.serving_workers),
            "loaded_workers": len(health.loaded_workers), "production_version": production,
            "dead_letters": dead,
            "streams": [_stream_status(client, model, *stream) for stream in _streams(client, model)],
            "workers": [_worker_status(w, now_ms) for w in health.workers],
            "experiment": _experiment_status(client, registry, model)}


def _experiment_status(client: redis.Redis, registry: Registry, model: str) -> ExperimentStatus | None:
    """The model's experiment while it runs or is paused; None once stopped, or if none."""
    try:
        e = ExperimentStore(client, registry).get(model)
    except RegistryError:  # a malformed hash: the workers serve Production and their heartbeats say why
        return None
    if e is None or e.status == "stopped":
        return None
    both = e.mode == "shadow"  # both arms score every request; the control's answer is the reply
    return {"id": e.id, "status": e.status, "mode": e.mode, "unit": e.unit,
            "control": {"version": e.control_version, "share": 1.0 if both else 1 - e.treatment_share},
            "treatment": {"version": e.treatment_version, "share": 1.0 if both else e.treatment_share}}


def experiment_line(e: ExperimentStatus, labels: dict[str, str] | None = None) -> str:
    """The experiment as ``status`` prints it under its model (each version with its label)."""
    control, treatment = e["control"], e["treatment"]
    c, t = (_title(arm["version"], labels or {}) for arm in (control, treatment))
    if e["mode"] == "shadow":
        arms = f"control {c} answers every request, treatment {t} scores each beside it"
    else:
        arms = f"control {c} {control['share']:.0%}, treatment {t} {treatment['share']:.0%}"
    return f"  experiment {e['id']} [{e['status']}] {e['mode']} by {e['unit']}: {arms}"


def _stream_status(client: redis.Redis, model: str, shard: int, lane: str, key: str) -> StreamStatus:
    groups = client.xinfo_groups(key) if client.exists(key) else []
    group = next((g for g in groups if text(g["name"]) == keys.consumer_group(model)), None)
    length = client.xlen(key)
    if group is None:  # no worker has read it yet: every entry is unread
        return {"shard": shard, "lane": lane, "key": key, "length": length, "lag": length, "pending": 0}
    return {"shard": shard, "lane": lane, "key": key, "length": length, "lag": group.get("lag"),
            "pending": group["pending"]}


def _worker_status(w: Heartbeat, now_ms: int) -> WorkerStatus:
    return {"worker_id": w.worker_id, "version": w.version, "target_version": w.target_version,
            "failed_version": w.failed_version, "variant": w.variant, "backend": w.backend,
            "fallback": w.fallback, "state": w.state, "pid": w.pid, "host": w.host,
            "heartbeat_age_ms": w.age_ms(now_ms), "error": w.error, "batches": w.batches,
            "requests": w.requests, "cache": w.cache, "loaded_at_ms": w.loaded_at_ms, "load_ms": w.load_ms,
            "size_mb": w.size_mb, "load_error": w.load_error, "models": w.models, "pinned": w.pinned}


def cache_line(w: WorkerStatus) -> str:
    """What ``status`` prints under a worker about the model in its process ("" from an older worker)."""
    if not w["cache"]:
        return ""
    parts = [f"cache {w['cache']}" + (", pinned" if w["pinned"] else "")]
    if w["loaded_at_ms"]:
        parts.append(f"loaded at {_wall_clock(w['loaded_at_ms'])} in {w['load_ms']:.0f} ms")
    if w["size_mb"]:
        parts.append(f"{w['size_mb']:.1f} MB")
    parts.append(f"process serves {w['models']} model{'s' if w['models'] != 1 else ''}")
    if w["load_error"]:
        parts.append(f"load error: {' '.join(w['load_error'].split())}")  # one line, whatever it held
    return "    " + "; ".join(parts)


def _wall_clock(at_ms: int) -> str:
    """``2025-11-26 09:40:00 UTC``; the raw number where it is no date (the heartbeat is untrusted)."""
    try:
        return datetime.fromtimestamp(at_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (ValueError, OverflowError, OSError):
        return f"{at_ms} ms"


def _title(version: int | None, labels: dict[str, str]) -> str:
    """``v3 (1.1.0)`` from a ``version_labels`` map; ``none`` for no version."""
    return version_title(version, labels.get(str(version), ""))


def _print_model(model: str, status: ModelStatus, labels: dict[str, str]) -> None:
    production = _title(status["production_version"], labels)
    streams = status["streams"]
    # One shard with an empty backfill lane (the usual case): the one-line summary of the live stream.
    if len(streams) == len(keys.LANES) and not any(s["length"] for s in streams if s["lane"] != "live"):
        s = streams[0]
        print(f"{model}: Production {production}; stream length {s['length']}, pending {s['pending']}, "
              f"lag {s['lag']}, dead letters {status['dead_letters']}")
    else:
        print(f"{model}: Production {production}; dead letters {status['dead_letters']}")
        for s in streams:
            print(f"  shard {s['shard']} {s['lane']:<8} length {s['length']}, pending {s['pending']}, "
                  f"lag {s['lag']}")
    if status["experiment"] is not None:
        print(experiment_line(status["experiment"], labels))
    for w in status["workers"]:
        error = f" error: {w['error']}" if w["error"] else ""
        error += f" fallback because {w['fallback']}" if w["fallback"] else ""
        print(f"  {w['worker_id']:<40} {_title(w['version'], labels)} {w['variant']:<18} {w['backend']:<12} "
              f"{w['state']:<9} pid {w['pid']} on {w['host']}, "
              f"heartbeat {w['heartbeat_age_ms']} ms ago{error}")
        if line := cache_line(w):
            print(line)
