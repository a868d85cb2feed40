"""``streamserve registry import|export|sync mlflow …``: the MLflow bridge.

This module imports without MLflow; its commands need the ``mlflow`` extra
(``pip install 'streamserve[mlflow]'``) and say so in one line when it is missing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from protocol import connection
from protocol.errors import RegistryError, StreamserveError
from protocol.settings import Settings
from registry.store import Registry

IMPORT_STAGES = ("Staging", "Production")
MAX_DETAIL_CHARS = 300
# What the commands import lazily, by top-level module: all of them come with the mlflow extra.
EXTRA_MODULES = {"mlflow", "onnx", "yaml", "onnxruntime", "requests"}


def register(registry_subparsers: argparse._SubParsersAction) -> None:
    """Add ``import``, ``export`` and ``sync``, each with the source ``mlflow``, to ``registry``."""
    _add_import(_source(registry_subparsers, "import", "import a model version from another registry"))
    _add_export(_source(registry_subparsers, "export", "log one of our versions into another registry"))
    _add_sync(_source(registry_subparsers, "sync", "mirror our stages as another registry's aliases, and "
                      "apply the aliases people move there"))


def _source(sub: argparse._SubParsersAction, verb: str, text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(verb, help=text)
    inner = parser.add_subparsers(dest="registry_source", required=True, metavar="SOURCE")
    p = inner.add_parser("mlflow", help=f"{text}: an MLflow tracking server (needs streamserve[mlflow])")
    p.add_argument("--uri", required=True, help="the MLflow tracking server, e.g. http://mlflow:5000")
    return p


def _add_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_uri", metavar="MODEL_URI", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--as", dest="as_name", metavar="NAME", help="the model name here (default: MLflow's)")
    p.add_argument("--labels", help="comma-separated class labels of the first output (default: the MLflow "
                   "version's tag streamserve.labels, else none)")
    p.add_argument("--label", help="the version label here (default: mlflow-VERSION)")
    p.add_argument("--stage", choices=IMPORT_STAGES, help="then promote it (Production: waits for the fleet, "
                   "rolls back if a worker cannot serve it)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="with --stage Production: the fleet's wait")
    p.set_defaults(func=_import)


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("version", help="number, alias or label")
    p.add_argument("--mlflow-name", help="the registered model in MLflow (default: NAME)")
    p.set_defaults(func=_export)


def _add_sync(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("--mlflow-name", help="the registered model in MLflow (default: NAME)")
    p.add_argument("--interval-s", type=float, default=5.0, help="between passes")
    p.add_argument("--once", action="store_true", help="one pass, then exit (1 if a request was refused)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="the fleet's wait for a promotion")
    p.set_defaults(func=_sync)


def _one_line(error: BaseException) -> str:
    detail = " ".join(str(error).split()) or type(error).__name__
    return detail if len(detail) <= MAX_DETAIL_CHARS else detail[:MAX_DETAIL_CHARS] + "…"


def _mlflow_errors() -> tuple[type[Exception], ...]:
    """MLflow's and its HTTP client's errors: an unknown model, version or alias, an unreachable server."""
    import requests
    from mlflow.exceptions import MlflowException

    return MlflowException, requests.RequestException


@contextmanager
def session(settings: Settings, uri: str) -> Iterator[tuple[Registry, Any]]:
    """(registry, MlflowClient); MLflow's errors become one-line ``MlflowRegistryError``s."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # output stays one line a step
    try:
        from mlflow import MlflowClient

        from integrations.mlflow_registry import MlflowRegistryError
        errors = _mlflow_errors()
    except ModuleNotFoundError as e:
        raise _missing(e) from None
    try:
        with connection.connect(settings.redis_url) as client:
            yield (Registry(client, settings.artifact_dir, control_secret=settings.control_secret),
                   MlflowClient(tracking_uri=uri, registry_uri=uri))
    except errors as e:
        raise MlflowRegistryError(f"MLflow at {uri}: {_one_line(e)}") from e
    except ModuleNotFoundError as e:
        raise _missing(e) from None


def _missing(error: ModuleNotFoundError) -> Exception:
    if (error.name or "").split(".")[0] not in EXTRA_MODULES:
        return error
    return RegistryError(f"needs {error.name}: pip install 'streamserve[mlflow]'")


def _import(args: argparse.Namespace, settings: Settings) -> int:
    labels = None if args.labels is None else [x for x in args.labels.split(",") if x]
    with session(settings, args.uri) as (reg, client):
        from integrations.mlflow_registry import import_version
        from integrations.mlflow_sync import promote_checked

        result = import_version(reg, client, args.model_uri, tracking_uri=args.uri, as_name=args.as_name,
                                labels=labels, label=args.label)
        print("\n".join(import_lines(result)))
        if args.stage:
            done, fleet = promote_checked(reg, result.version, args.stage, reason=f"imported from "
                                          f"{result.source.uri}", fleet_timeout_s=args.timeout_s,
                                          ttl_s=settings.heartbeat_ttl_s)
            print(done + (f"; fleet: {fleet}" if fleet else ""))
    return 0


def import_lines(result: Any) -> list[str]:
    """What ``registry import mlflow`` prints about an :class:`~integrations.mlflow_registry.Imported`."""
    mv, source = result.version, result.source
    sha256 = mv.tags.get("mlflow.sha256", "")
    if not result.created:
        return [f"{source.uri} was imported before as {mv.name} {mv.title}; its files are unchanged "
                f"(sha256 {sha256[:16]})"]
    lines = [f"imported {source.uri} as {mv.name} {mv.title} ({mv.stage}), sha256 {sha256[:16]}",
             f"  downloaded: {', '.join(result.downloaded)}",
             f"  input spec: {json.dumps(mv.input_spec)}", f"  output spec: {json.dumps(mv.output_spec)}"]
    return lines + [f"  {k} = {v:.6g}" for k, v in sorted(mv.metrics.items())]


def _export(args: argparse.Namespace, settings: Settings) -> int:
    with session(settings, args.uri) as (reg, client):
        from integrations.mlflow_registry import export_version

        mv, version, created = export_version(reg, client, args.name, args.version, tracking_uri=args.uri,
                                              mlflow_name=args.mlflow_name)
    where = f"models:/{args.mlflow_name or args.name}/{version}"
    print(f"exported {mv.name} {mv.title} as {where}" if created
          else f"{mv.name} {mv.title} is already {where}")
    return 0


def _sync(args: argparse.Namespace, settings: Settings) -> int:
    with session(settings, args.uri) as (reg, client):
        from integrations.mlflow_sync import sync_once

        passing: tuple[type[Exception], ...] = (*_mlflow_errors(), StreamserveError, redis.RedisError)
        while True:
            try:
                report = sync_once(reg, client, args.name, tracking_uri=args.uri,
                                   mlflow_name=args.mlflow_name, fleet_timeout_s=args.timeout_s,
                                   ttl_s=settings.heartbeat_ttl_s)
            # A long-running pass outlives any one failure: MLflow or Redis away, a version that
            # cannot be mirrored; each pass starts from the state on both sides, so the next may work.
            except passing as e:
                if args.once:
                    raise
                print(f"{_now()} pass failed, next in {args.interval_s:g} s: {_one_line(e)}", flush=True)
            else:
                for line in report.lines or ["in step"]:
                    print(f"{_now()} {line}", flush=True)
                if args.once:
                    return 1 if report.refused else 0
            time.sleep(args.interval_s)


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")
