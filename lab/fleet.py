"""Start a supervised worker fleet as a subprocess and wait until it serves (demo, bench)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from producer import Client
from protocol.errors import ConfigError
from protocol.settings import Settings


class Fleet:
    """``streamserve worker --processes N`` in a child process; a context manager.

    With ``models``, each process serves all of them (``--models a,b,...`` instead of
    ``--model model``); ``model`` is then only what callers call the fleet.
    """

    def __init__(self, settings: Settings, model: str, processes: int, *extra_args: str,
                 models: Sequence[str] | None = None) -> None:
        self.settings, self.model, self.processes = settings, model, processes
        self.models = list(models) if models is not None else None
        serve = ["--models", ",".join(self.models)] if self.models is not None else ["--model", model]
        self.args = [sys.executable, "-m", "streamserve", "--redis-url", settings.redis_url,
                     "--artifact-dir", str(settings.artifact_dir), "worker", *serve,
                     "--processes", str(processes), *extra_args]
        self.process: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    def start(self, timeout_s: float = 60.0, log_path: str | None = None) -> Fleet:
        """Start and wait until it serves: ``processes`` live workers report a loaded version of
        ``model``; with ``models``, each listed model has ``processes`` live workers that can serve it
        (``Health.serving_workers``: loaded, loading, or loading it on its first request)."""
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        with Client.from_url(self.settings.redis_url) as client:
            while time.monotonic() < deadline:
                if self.serving(client):
                    return self
                if self.process.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise ConfigError(f"worker fleet for {self._names()} did not come up within {timeout_s} s")

    def serving(self, client: Client) -> bool:
        """Whether the fleet serves, as ``start`` waits for it (workers counted by distinct id)."""
        if self.models is None:
            return sum(w.version is not None for w in client.health(self.model).workers) >= self.processes
        return all(len({w.worker_id for w in client.health(m).serving_workers}) >= self.processes
                   for m in self.models)

    def _names(self) -> str:
        return repr(self.model) if self.models is None else ", ".join(map(repr, self.models))

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (drain and exit), SIGKILL if it takes longer than ``timeout_s``."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.exit_code = self.process.returncode
        return self.exit_code

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tree_pids(root: int) -> list[int]:
    """``root`` and every descendant process (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children.get(pid, [])
    return pids


def pin(root: int, cores: set[int]) -> None:
    """Run ``root``, its descendants and all their threads on ``cores`` only (Linux)."""
    for pid in tree_pids(root):
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError):  # a thread or process that has just exited
                os.sched_setaffinity(int(task.name), cores)
