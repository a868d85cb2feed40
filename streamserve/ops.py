"""``streamserve reload`` and ``streamserve status``: the fleet as ops see it."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, cast

import redis

from experiments.store import ExperimentStore
from producer.health import read_health
from protocol import keys, messages
from protocol.errors import RegistryError
from protocol.settings import Settings
from protocol.values import text
from registry import ModelVersion, Registry
from registry.rollout import publish_reload, wait_for_fleet
from worker.loader import load_version, version_parity

if TYPE_CHECKING:
    from protocol.values import StreamRows


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``reload`` and ``status``."""
    p = subparsers.add_parser("reload", help="tell every worker of a model to converge on the registry")
    p.add_argument("model")
    p.add_argument("--wait", action="store_true", help="wait until every live worker serves Production")
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.set_defaults(func=_reload)
    p = subparsers.add_parser("replay", help="run a version on the inputs the current experiment journaled")
    p.add_argument("model")
    p.add_argument("version", type=int)
    p.set_defaults(func=_replay)
    p = subparsers.add_parser("status", help="workers, versions, stream length, pending, lag, dead letters")
    p.add_argument("model", nargs="*", help="default: every registered model")
    p.set_defaults(func=_status)


def parity_checker(registry: Registry, mv: ModelVersion) -> dict[str, float]:
    """What ``registry register --alternate`` calls: outputs of every format compared."""
    return version_parity(registry, mv)


def _reload(args: argparse.Namespace, settings: Settings) -> int:
    with redis.Redis.from_url(settings.redis_url) as client:
        target = Registry(client, settings.artifact_dir).production(args.model).version
        receivers = publish_reload(client, args.model, target, secret=settings.control_secret)
        print(f"reload {args.model} v{target}: {receivers} subscriber(s)")
        if not args.wait:
            return 0
        report = wait_for_fleet(client, args.model, target, timeout_s=args.timeout_s,
                                ttl_s=settings.heartbeat_ttl_s)
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
    for _, fields in cast("StreamRows", client.xrange(keys.experiment_replay(model, experiment.id))):
        inputs = messages.decode_inputs(fields[b"inputs"], settings.max_message_bytes)
        probs = next(iter(loaded.backend.run(inputs).values()))
        labels = ",".join(loaded.version.labels[i] for i in probs.argmax(axis=-1).tolist())
        agree.setdefault(text(fields[b"arm"]), []).append(labels == text(fields[b"label"]))
    return {arm: {"requests": len(v), "label_agreement": sum(v) / len(v)} for arm, v in agree.items()}


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    with redis.Redis.from_url(settings.redis_url) as client:
        result = replay(client, Registry(client, settings.artifact_dir), args.model, args.version, settings)
    for arm, numbers in result.items():
        print(f"v{args.version} vs what {arm} answered: {numbers['label_agreement']:.2%} "
              f"of {numbers['requests']} journaled requests")
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    with redis.Redis.from_url(settings.redis_url) as client:
        registry = Registry(client, settings.artifact_dir)
        for model in args.model or registry.models():
            _print_model(client, registry, model, settings.heartbeat_ttl_s)
    return 0


def _print_model(client: redis.Redis, registry: Registry, model: str, ttl_s: float) -> None:
    try:
        production = f"v{registry.production(model).version}"
    except RegistryError:
        production = "none"
    stream = keys.request_stream(model)
    groups = client.xinfo_groups(stream) if client.exists(stream) else []
    group = next((g for g in groups if text(g["name"]) == keys.consumer_group(model)), {})
    print(f"{model}: Production {production}; stream length {client.xlen(stream)}, "
          f"pending {group.get('pending', 0)}, lag {group.get('lag', 0)}, "
          f"dead letters {client.xlen(keys.dead_letter_stream(model))}")
    for w in read_health(client, model, ttl_s).workers:
        error = f" error: {w.error}" if w.error else ""
        error += f" fallback because {w.fallback}" if w.fallback else ""
        print(f"  {w.worker_id:<40} v{w.version} {w.variant:<18} {w.backend:<12} {w.state:<9} "
              f"pid {w.pid} on {w.host}, heartbeat {w.age_ms()} ms ago{error}")
