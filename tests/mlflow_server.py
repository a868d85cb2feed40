"""A real MLflow tracking server for a test module: SQLite backend, local artifact root, a free port.

The server proxies artifacts (``--artifacts-destination``), as a desk's server does: clients
read and write them over HTTP, and a test can still rewrite a file under :attr:`artifact_root`.
Its start (about 30 s on a busy machine) is not charged to the test that sets it up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import not_charged_to_the_test, started

from lab.embedded_redis import free_port

START_BOUND_S = 120.0  # /health within this, or the start failed (under conftest's SERVER_START_BOUND_S)
STOP_GRACE_S = 2.0  # then SIGKILL: its state is a temporary folder, and its graceful stop takes 5 s


class MlflowServer:
    """``mlflow server`` in its own process group; :meth:`stop` ends the group."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        """The tracking URI (``http://127.0.0.1:PORT``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifact_root(self) -> Path:
        """Where the server keeps the artifacts it proxies: ``mlflow-artifacts:/X`` is ``artifact_root/X``."""
        return self.root / "artifacts"

    def start(self) -> MlflowServer:
        """Start it and wait (up to :data:`START_BOUND_S`) until ``/health`` answers."""
        self.port = free_port()
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
               f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination", str(self.artifact_root),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        with open(self.root / "server.log", "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_BOUND_S
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not answer /health: {self.log_tail()}")
            time.sleep(0.5)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's log, for a failed start."""
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM to the process group (the server and its workers), SIGKILL after 2 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def require_mlflow() -> None:
    """Skip without the ``mlflow`` extra; under CI (``CI=true``) fail instead."""
    try:
        import mlflow  # noqa: F401
    except ImportError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"mlflow cannot be imported ({e}): pip install -e '.[mlflow]'")
        pytest.skip(f"mlflow cannot be imported ({e}): the mlflow extra")


@pytest.fixture(scope="session", name="mlflow_server")
def mlflow_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One MLflow tracking server for the session (its tests and the quickstart's), stopped by its process
    group at the end; tests use model names of their own."""
    require_mlflow()
    server = started(MlflowServer(tmp_path_factory.mktemp("mlflow")), "MLflow tracking server")
    yield server
    with not_charged_to_the_test(2 * STOP_GRACE_S + 5):  # the last test's timeout does not pay for it either
        server.stop()
