"""``streamserve predict`` and ``streamserve health``."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from producer.client import Client
from protocol.messages import OUTSIDE, Prediction
from protocol.settings import Settings


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client-side commands."""
    p = subparsers.add_parser("predict", help="send one request (random or from a .npy file)")
    p.add_argument("model")
    p.add_argument("--npy", help="a float32 array of one sample, e.g. shape (60, 110)")
    p.add_argument("--shape", default="60,110", help="shape of the random sample if no --npy")
    p.add_argument("--route", default="")
    p.add_argument("--timeout-s", type=float, default=1.0)
    p.add_argument("--in-experiment", action="store_true",
                   help="take part in the model's running experiment (assigned to an arm and journaled as an "
                        "exposure, which then waits for an outcome); by default the request is sent outside "
                        "any experiment and the Production version answers it")
    p.set_defaults(func=_predict)

    p = subparsers.add_parser("health", help="live workers of a model and the versions they serve")
    p.add_argument("model")
    p.set_defaults(func=_health)


def _predict(args: argparse.Namespace, settings: Settings) -> int:
    if args.npy:
        features = np.load(args.npy, allow_pickle=False)
    else:
        shape = tuple(int(d) for d in args.shape.split(","))
        features = np.random.default_rng().standard_normal(shape).astype(np.float32)
    with Client.from_url(settings.redis_url) as client:
        p = client.predict(args.model, features, route=args.route, timeout_s=args.timeout_s,
                           experiment=args.in_experiment)
    print(json.dumps({
        "model": p.model, "version": p.model_version, "variant": p.variant, "label": p.labels,
        "confidence": p.confidences, "outputs": {k: v.tolist() for k, v in p.outputs.items()},
        "queue_ms": round(p.queue_ms, 3), "infer_ms": round(p.infer_ms, 3), "worker": p.worker,
    }, indent=2))
    print(f"answered by {p.model} v{p.model_version}, arm: {_arm(p, args.in_experiment)}", file=sys.stderr)
    return 0


def _arm(p: Prediction, asked_in: bool) -> str:
    """Which arm answered, in words; the JSON on stdout stays machine-readable."""
    if p.variant == OUTSIDE:
        return "none (sent outside any experiment)"
    if not p.in_experiment:
        return "none (no experiment active)"
    if asked_in:
        return f"{p.variant} (journaled as an exposure of the running experiment)"
    return (f"{p.variant}: the worker predates the 'experiment' field, so this request was journaled as an "
            "exposure of the running experiment")


def _health(args: argparse.Namespace, settings: Settings) -> int:
    with Client.from_url(settings.redis_url) as client:
        health = client.health(args.model)
    for w in health.workers:
        print(f"{w.worker_id:<40} v{w.version} {w.backend:<12} {w.state:<9} age={w.age_ms()}ms {w.error}")
    print(repr(health))
    return 0 if health.ok else 1
