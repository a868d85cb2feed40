"""Predictable failures end every ``streamserve`` subcommand with one line and a non-zero exit.

Each case runs the real command in a subprocess: Redis not listening, Redis refusing this
ACL user (NOPERM), a missing file. A traceback is for bugs only.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import models
import numpy as np
import pytest
import redis
from conftest import MODEL

from experiments.store import ExperimentStore
from lab.embedded_redis import EmbeddedRedis
from streamserve.cli import EX_NOINPUT, EX_NOPERM, EX_UNAVAILABLE

LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \d+ (DEBUG|INFO|WARNING) ")
DENIED_USER, DENIED_PASSWORD = "cli_denied", "cli-denied-secret"

# Subcommands that each read or write Redis first; "{npy}" is a one-sample .npy file.
REDIS_COMMANDS = [
    ["status"],
    ["status", MODEL, "--json"],
    ["registry", "list"],
    ["registry", "show", MODEL, "1"],
    ["registry", "promote", MODEL, "1", "--wait"],
    ["experiment", "status", MODEL],
    ["reload", MODEL, "--wait"],
    ["health", MODEL],
    ["predict", MODEL, "--npy", "{npy}"],
]


def run_cli(url: str, artifact_dir: Path, *args: str,
            timeout_s: float = 20.0) -> subprocess.CompletedProcess[str]:
    """The command in a process of its own (about a second here): TimeoutExpired past ``timeout_s``,
    which a test counts among its waits."""
    cmd = [sys.executable, "-m", "streamserve", "--redis-url", url, "--artifact-dir", str(artifact_dir),
           *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSERVE_")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)


def assert_one_line(result: subprocess.CompletedProcess[str], exit_code: int, *words: str,
                    logs_before: bool = False) -> str:
    """The failure is one line on stderr, with the expected exit status and words, no traceback
    (``logs_before``: after the log records the command wrote on its way)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    if logs_before:
        lines = [line for line in lines if not LOG_RECORD.match(line)]
    assert len(lines) == 1, result.stderr
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


@pytest.fixture
def npy(tmp_path: Path) -> str:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((60, 110), np.float32))
    return str(path)


@pytest.fixture
def closed_url() -> str:
    """A local port nothing listens on (bound once by us, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def denied_url(redis_server: EmbeddedRedis, r: redis.Redis) -> Iterator[str]:
    """A user who may connect but run none of streamserve's commands (like a wrong role)."""
    r.execute_command("ACL", "SETUSER", DENIED_USER, "reset", "on", f">{DENIED_PASSWORD}", "~*", "&*",
                      "-@all", "+hello", "+auth", "+ping", "+client", "+select", "+info")
    host, port = r.connection_pool.connection_kwargs["host"], r.connection_pool.connection_kwargs["port"]
    yield f"redis://{DENIED_USER}:{DENIED_PASSWORD}@{host}:{port}/0"
    r.execute_command("ACL", "DELUSER", DENIED_USER)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args", REDIS_COMMANDS, ids=" ".join)
def test_redis_down_is_one_line(closed_url, tmp_path, npy, args):
    result = run_cli(closed_url, tmp_path, *(a.format(npy=npy) for a in args))
    assert_one_line(result, EX_UNAVAILABLE, f"streamserve {args[0]}", "Redis")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args", REDIS_COMMANDS, ids=" ".join)
def test_a_user_without_the_rights_gets_one_line_naming_the_denial(denied_url, production, settings, npy,
                                                                   args):
    result = run_cli(denied_url, settings.artifact_dir, *(a.format(npy=npy) for a in args))
    line = assert_one_line(result, EX_NOPERM, "ACL")
    assert DENIED_PASSWORD not in line


def test_a_wrong_password_is_one_line(denied_url, settings):
    url = denied_url.replace(DENIED_PASSWORD, "not-the-password")
    assert_one_line(run_cli(url, settings.artifact_dir, "status"), EX_NOPERM, "credentials")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_worker_refused_by_redis_exits_at_start_up_in_one_line(denied_url, settings, processes):
    result = run_cli(denied_url, settings.artifact_dir, "worker", "--model", MODEL, "--processes", processes)
    assert_one_line(result, EX_NOPERM, "streamserve worker", "ACL", "xinfo")


@pytest.mark.timeout(60)  # two commands of 20 s
def test_missing_files_are_one_line(settings, tmp_path, production):
    absent = tmp_path / "absent.onnx"
    result = run_cli(settings.redis_url, settings.artifact_dir, "registry", "register", MODEL, str(absent),
                     "--input-spec", json.dumps(models.SPEC))
    assert_one_line(result, 2, "RegistryError", str(absent))
    result = run_cli(settings.redis_url, settings.artifact_dir, "predict", MODEL, "--npy", str(absent))
    assert_one_line(result, EX_NOINPUT, str(absent))


def test_a_missing_artifact_in_the_store_is_one_line(settings, registry, tmp_path, production):
    v2 = registry.register(MODEL, models.linear_softmax(tmp_path / "v2.onnx", seed=2),
                           input_spec=models.SPEC, output_names=["probs"], labels=models.LABELS)
    ExperimentStore(registry.redis, registry).create(MODEL, production.version, v2.version,
                                                     treatment_share=0.5, unit="request_id")
    (settings.artifact_dir / v2.artifact).unlink()
    result = run_cli(settings.redis_url, settings.artifact_dir, "replay", MODEL, str(v2.version))
    assert_one_line(result, 2, "ArtifactIntegrityError", f"v{v2.version}", logs_before=True)


@pytest.mark.timeout(90)  # three commands of 20 s
def test_an_unknown_model_or_version_is_one_line(settings, production):
    for args in (["registry", "show", "no_such_model", "1"], ["registry", "promote", MODEL, "9"],
                 ["reload", "no_such_model"]):
        result = run_cli(settings.redis_url, settings.artifact_dir, *args)
        assert_one_line(result, 2, "RegistryError")


def test_a_bug_keeps_its_traceback(monkeypatch, settings, capsys):
    from streamserve import cli, ops

    monkeypatch.setattr(ops, "fleet_status", lambda *_args: {}["no such key"])
    with pytest.raises(KeyError):
        cli.main(["--redis-url", settings.redis_url, "status"])
