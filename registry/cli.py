"""``streamserve registry …`` subcommands."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from protocol.settings import Settings
from registry.store import STAGES, Registry


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``registry`` command group."""
    parser = subparsers.add_parser("registry", help="list, show, register and promote model versions")
    sub = parser.add_subparsers(dest="registry_command", required=True)

    p = sub.add_parser("list", help="models, or the versions of one model")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_list)

    p = sub.add_parser("show", help="one version as JSON")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.set_defaults(func=_show)

    p = sub.add_parser("register", help="copy an artifact into the store as a new version")
    p.add_argument("name")
    p.add_argument("artifact", type=Path)
    p.add_argument("--input-spec", required=True, type=json.loads,
                   help='JSON, e.g. {"features": {"dtype": "<f4", "shape": [60, 110]}}')
    p.add_argument("--outputs", default="probs", help="comma-separated output names")
    p.add_argument("--labels", default="", help="comma-separated class labels of the first output")
    p.add_argument("--metric", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--description", default="")
    p.set_defaults(func=_register)

    p = sub.add_parser("promote", help="move a version to a stage (Production archives the previous)")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument("--stage", default="Production", choices=STAGES[1:])
    p.set_defaults(func=_promote)


@contextmanager
def _registry(settings: Settings) -> Iterator[Registry]:
    with redis.Redis.from_url(settings.redis_url) as client:
        yield Registry(client, settings.artifact_dir)


def _list(args: argparse.Namespace, settings: Settings) -> int:
    with _registry(settings) as reg:
        names = reg.models() if args.name is None else []
        versions = reg.versions(args.name) if args.name else []
    for name in names:
        print(name)
    for mv in versions:
        metrics = " ".join(f"{k}={v:.4g}" for k, v in mv.metrics.items())
        print(f"v{mv.version:<4} {mv.stage:<10} {mv.format:<5} {mv.sha256[:12]} {metrics}")
    return 0


def _show(args: argparse.Namespace, settings: Settings) -> int:
    with _registry(settings) as reg:
        mv = reg.get(args.name, args.version)
    print(json.dumps(mv.__dict__, indent=2, default=str))
    return 0


def _register(args: argparse.Namespace, settings: Settings) -> int:
    metrics = {k: float(v) for k, v in (m.split("=", 1) for m in args.metric)}
    with _registry(settings) as reg:
        mv = reg.register(
            args.name, args.artifact, input_spec=args.input_spec,
            output_names=[o for o in args.outputs.split(",") if o],
            labels=[label for label in args.labels.split(",") if label],
            metrics=metrics, description=args.description)
    print(f"registered {mv!r}")
    return 0


def _promote(args: argparse.Namespace, settings: Settings) -> int:
    with _registry(settings) as reg:
        mv = reg.promote(args.name, args.version, args.stage)
    print(f"promoted {mv!r}")
    return 0
