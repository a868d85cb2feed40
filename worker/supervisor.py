"""Run N worker processes (one per core) and keep them running.

SIGTERM/SIGINT to the supervisor → SIGTERM to every child (each finishes its
batch and exits); a second signal → SIGKILL. Children ignore SIGINT so a
terminal's Ctrl-C reaches them once, through the supervisor. A child that
dies on its own is restarted.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import time
from typing import TYPE_CHECKING

from protocol.settings import Settings
from worker.logs import configure_logging
from worker.worker import Worker

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess

log = logging.getLogger(__name__)
RESTART_DELAY_S = 1.0


def _child(settings_json: str, model: str, max_queue_ms: float, verbose: bool) -> None:
    configure_logging(verbose)
    worker = Worker(Settings.model_validate_json(settings_json), model, max_queue_ms=max_queue_ms)
    worker.install_signal_handlers(sigint=False)
    worker.run()


class Supervisor:
    """Start ``processes`` workers for ``model``; ``run`` returns when all have exited."""

    def __init__(self, settings: Settings, model: str, processes: int, *, max_queue_ms: float = 0.0) -> None:
        self.settings, self.model, self.processes = settings, model, processes
        self.max_queue_ms = max_queue_ms
        self.children: list[SpawnProcess] = []
        self.stopping = threading.Event()
        self._ctx = mp.get_context("spawn")

    def _spawn(self) -> SpawnProcess:
        args = (self.settings.model_dump_json(), self.model, self.max_queue_ms,
                logging.getLogger("worker").isEnabledFor(logging.DEBUG))
        child = self._ctx.Process(target=_child, args=args, daemon=False)
        child.start()
        return child

    def _on_signal(self, signum: int, _frame: object) -> None:
        forced = self.stopping.is_set()
        self.stopping.set()
        for child in self.children:
            if child.is_alive():
                (child.kill if forced else child.terminate)()
        log.info("supervisor: %s children", "killed" if forced else "stopping")

    def run(self) -> int:
        """Supervise until stopped; exit code 0 when every child drained cleanly."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.children = [self._spawn() for _ in range(self.processes)]
        while not self.stopping.is_set():
            for i, child in enumerate(self.children):
                if not child.is_alive() and not self.stopping.is_set():
                    log.warning("worker pid %s exited with %s; restarting", child.pid, child.exitcode)
                    time.sleep(RESTART_DELAY_S)
                    self.children[i] = self._spawn()
            self.stopping.wait(0.2)
        for child in self.children:
            child.join()
        return 0 if all(c.exitcode == 0 for c in self.children) else 1
