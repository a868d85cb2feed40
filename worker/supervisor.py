"""Run N worker processes (one per core) and keep them running.

SIGTERM/SIGINT to the supervisor → SIGTERM to every child (each finishes its
batch and exits); a second signal → SIGKILL. A supervised child drains on
SIGTERM however many times it comes: a group signal (systemd's default
``KillMode=control-group``, ``kill -- -PGID``) reaches it both directly and
through the supervisor, and only the supervisor decides to force (the grace
period still bounds each child's drain). Children ignore SIGINT so a
terminal's Ctrl-C reaches them once, through the supervisor. A child that
dies on its own is restarted, unless the fleet is stopping. A child also stops (SIGTERM: drain, ack, exit)
when the supervisor dies, even by SIGKILL (Linux's parent-death signal), so a
restarted supervisor never doubles the fleet.

With ``metrics_port`` the pod has one metrics endpoint, the supervisor's: the
children write their metrics to a shared directory (prometheus-client's
multiprocess mode, ``worker.metrics``) and bind no port; /healthz is 200 while
every child runs and ticks, /readyz once one child reports ready.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from protocol.settings import Settings
from worker.logs import configure_logging
from worker.selection import ModelSelector
from worker.worker import Worker

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess

    from worker.metrics import FleetMetrics

log = logging.getLogger(__name__)
RESTART_DELAY_S = 1.0


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_DIED = signal.SIGUSR1  # a supervised worker drains and exits on it


def _child(settings_json: str, secret: str | None, models: str, pins: str, max_queue_ms: float,
           verbose: bool, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # first: a Ctrl-C while it starts is the supervisor's
    configure_logging(verbose)
    settings = Settings.model_validate_json(settings_json).with_overrides(control_secret=secret)
    worker = Worker(settings, ModelSelector.parse(models), max_queue_ms=max_queue_ms,
                    pins=[p for p in pins.split(",") if p])
    drain = drain_once(worker)
    for signum in (signal.SIGTERM, PARENT_DIED):
        signal.signal(signum, drain)
    die_with_parent(parent_pid)
    worker.run()


def drain_once(worker: Worker) -> Callable[[int, object], None]:
    """A signal handler for a supervised worker: the first call drains, later ones change nothing.

    Unlike an unsupervised worker's second signal, a repeat is not an order to force: a group
    SIGTERM arrives twice (directly and forwarded). Forcing is the supervisor's SIGKILL, or the
    grace period, counted from the first signal.
    """
    def handle(signum: int, _frame: object) -> None:
        if worker.stopping.is_set():
            log.info("signal %s: already finishing the current batch", signum)
            return
        log.info("signal %s: finishing the current batch, then exiting", signum)
        worker.stop()
        timer = threading.Timer(worker.settings.grace_period_s, os._exit, (1,))
        timer.daemon = True
        timer.start()

    return handle


def die_with_parent(parent_pid: int) -> None:
    """Get ``PARENT_DIED`` when the parent dies; if it already has, now (Linux; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, PARENT_DIED, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), PARENT_DIED)


class Supervisor:
    """Start ``processes`` workers for ``model`` (a name, or ``--models``' names and patterns,
    comma-separated; each child serves them all); ``run`` returns when all have exited.

    ``metrics_port`` (default: the setting; 0: off) serves every child's metrics on one port.
    """

    def __init__(self, settings: Settings, model: str, processes: int, *, max_queue_ms: float = 0.0,
                 metrics_port: int | None = None, pins: str = "") -> None:
        self.settings, self.model, self.processes, self.pins = settings, model, processes, pins
        self.max_queue_ms = max_queue_ms
        # The children get the same settings, port included: in multiprocess mode they never bind it.
        self.metrics_port = settings.metrics_port if metrics_port is None else metrics_port
        self.children: list[SpawnProcess] = []
        self.stopping = threading.Event()
        # Set by the supervising loop only: the endpoint's thread must not poll (and so reap) children.
        self.all_alive = False
        self._fleet: FleetMetrics | None = None
        self._ctx = mp.get_context("spawn")

    def _spawn(self) -> SpawnProcess:
        # Plain strings only cross to the child; the JSON masks the control secret, so it goes apart.
        secret = self.settings.control_secret
        args = (self.settings.model_dump_json(exclude={"control_secret"}),
                secret.get_secret_value() if secret else None, self.model, self.pins, self.max_queue_ms,
                logging.getLogger("worker").isEnabledFor(logging.DEBUG), os.getpid())
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
        with self._metrics_endpoint():
            self.children = [self._spawn() for _ in range(self.processes)]
            while not self.stopping.is_set():
                self._restart_dead()
                self.stopping.wait(0.2)
            for child in self.children:
                child.join()
        return 0 if all(c.exitcode == 0 for c in self.children) else 1

    def _restart_dead(self) -> None:
        dead = [i for i, child in enumerate(self.children) if not child.is_alive()]
        self.all_alive = not dead
        for i in dead:
            if self.stopping.is_set():
                return
            child = self.children[i]
            log.warning("worker pid %s exited with %s; restarting", child.pid, child.exitcode)
            if self._fleet is not None and child.pid is not None:
                self._fleet.child_exited(child.pid)
            # A wait the stop signal ends: a child that drained on a group signal before the
            # supervisor handled its own must not be replaced by one nobody stops.
            if self.stopping.wait(RESTART_DELAY_S):
                return
            self.children[i] = self._spawn()

    def _healthy(self) -> bool:
        return self.all_alive and not self.stopping.is_set()

    @contextlib.contextmanager
    def _metrics_endpoint(self) -> Iterator[None]:
        """With ``metrics_port``: the children's metric directory, and the one endpoint serving it."""
        if not self.metrics_port:
            yield
            return
        # Here, not at the top: prometheus-client comes with the worker extra, and `streamserve` must start
        # without it.
        from worker.metrics import FleetMetrics, multiprocess_dir, serve_http

        with multiprocess_dir() as path:
            self._fleet = FleetMetrics(path, self._healthy)
            server = serve_http(self.metrics_port, self._fleet)  # before spawning: a taken port fails alone
            log.info("supervisor: metrics on port %d (children's files in %s)", server.port, path)
            try:
                yield
            finally:
                server.close()
                self._fleet = None
