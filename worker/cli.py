"""``streamserve worker``: serve a model, or a set of models, in this process or in N supervised ones."""

from __future__ import annotations

import argparse
import logging

import redis

from protocol import connection, keys
from protocol.errors import ConfigError
from protocol.settings import Settings
from worker.selection import ModelSelector
from worker.supervisor import Supervisor
from worker.worker import Worker

# Redis refusing this user: a start-up error; anything else Redis says at start-up is waited out.
REFUSED = (redis.AuthenticationError, redis.exceptions.AuthorizationError, redis.exceptions.NoPermissionError)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``worker``."""
    p = subparsers.add_parser("worker", help="serve a model (or a set of models) from its request stream")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="default: the `model` setting (hybrid_cnn_lstm)")
    which.add_argument("--models", help="serve several models from each process: names and patterns, "
                       "comma-separated (e.g. fx_eur,fx_gbp or 'fx_*': every matching model in Production)")
    which.add_argument("--all-models", action="store_true",
                       help="serve every model with a Production version (followed as models are promoted "
                       "and retired)")
    p.add_argument("--pin", default="", help="models loaded at start-up and never evicted (comma-separated)")
    p.add_argument("--model-memory-mb", type=float, help="cache budget: evict the least recently used "
                   "model when the loaded models' measured sizes exceed it (default 0: no limit)")
    p.add_argument("--max-loaded-models", type=int, help="keep at most this many models loaded (0: no limit)")
    p.add_argument("--processes", type=int, default=1, help="worker processes (one per core)")
    p.add_argument("--max-batch", type=int)
    p.add_argument("--max-wait-ms", type=float)
    p.add_argument("--intra-op-threads", type=int)
    p.add_argument("--spin-ms", type=float, help="low-latency mode: poll this long after each batch "
                   "before sleeping (a core busy meanwhile; default 0: off)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="default: cpu")
    p.add_argument("--overlap-io", action=argparse.BooleanOptionalAction, default=None,
                   help="under load, overlap the next read and the last reply transaction with the "
                   "model call (default: on; single-node Redis)")
    p.add_argument("--max-queue-ms", type=float, default=0.0,
                   help="shed requests queued longer than this with OVERLOADED (0 = never)")
    p.add_argument("--shards", help="comma-separated stream shards to read, e.g. 0 or 1,2 "
                   "(default: every shard the model's layout serves)")
    p.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz, /readyz on this port (0: off)")
    p.add_argument("--burst", action="store_true", help="drain the stream, then exit")
    p.set_defaults(func=_worker)


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    settings = settings.with_overrides(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                       intra_op_threads=args.intra_op_threads, device=args.device,
                                       spin_ms=args.spin_ms, shards=args.shards, overlap_io=args.overlap_io,
                                       metrics_port=args.metrics_port, model_memory_mb=args.model_memory_mb,
                                       max_loaded_models=args.max_loaded_models)
    spec = "*" if args.all_models else args.models or args.model or settings.model
    selector = ModelSelector.parse(spec)  # a ConfigError (one line) for a bad name
    if not args.models and not args.all_models and not selector.is_static:
        raise ConfigError(f"--model takes a model name, not a pattern ({spec!r}): use --models")
    pins = ModelSelector.parse(args.pin).names if args.pin else ()
    if selector.names:  # a pattern's models are not known yet: the worker reads them once Redis answers
        check_access(settings, selector.names[0])
    if args.processes > 1 and not args.burst:
        return Supervisor(settings, spec, args.processes, max_queue_ms=args.max_queue_ms,
                          pins=",".join(pins)).run()
    worker = Worker(settings, selector, burst=args.burst, max_queue_ms=args.max_queue_ms, pins=pins)
    worker.install_signal_handlers()
    worker.run()
    return 0


def check_access(settings: Settings, model: str) -> None:
    """Refuse to start when Redis refuses this user (wrong password, or a role without the worker's
    commands): an ACL does not heal by waiting, so the error goes up to the command's one line.

    An unreachable or loading Redis is not an error here: the worker waits for it, as it
    does during an outage. The probe (XINFO GROUPS on the model's request stream) is in the
    documented worker role and changes nothing.
    """
    try:
        with connection.connect(settings.redis_url) as client:
            client.execute_command("XINFO", "GROUPS", keys.request_stream(model))
    except REFUSED:
        raise
    except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.RedisClusterException) as e:
        logging.getLogger(__name__).info("Redis not reachable yet (%s); the worker waits for it", e)
    except redis.ResponseError:
        pass  # no such key: no request stream yet, which is fine
