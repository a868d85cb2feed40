"""The two arms of a running experiment, as one worker serves them.

The control is the worker's served version (Production); the treatment is
loaded beside it. An experiment is *active* in a worker only while it is
running, the treatment is loaded, and the control is the version the
experiment names; otherwise every request is served by the control, untagged.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from experiments.store import Experiment, ExperimentStore
from protocol.errors import StreamserveError
from protocol.settings import Settings
from registry import Registry
from worker.loader import LoadedModel, Reloader, load_version

log = logging.getLogger(__name__)
LATENCY_SAMPLES = 20_000  # per arm, most recent first: enough for a p99
JOURNAL_MAXLEN = 1_000_000  # ~100 bytes an entry: joins outcomes to arms
REPLAY_MAXLEN = 2_000  # inputs too (26 KB for the reference model): ~53 MB of Redis at most


@dataclass
class ExperimentLog:
    """Per-arm accounting of one batch, written with its replies."""

    experiment_id: str = ""
    counts: Counter = field(default_factory=Counter)
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    journal: list[dict[str, str]] = field(default_factory=list)
    replay: list[dict[str, str | bytes]] = field(default_factory=list)

    def served(self, arm: str, request_id: str, version: int, labels: list[str], latency_ms: float,
               raw_inputs: bytes) -> None:
        """One request answered by ``arm``."""
        self.counts[f"{arm}:requests"] += 1
        self.latencies_ms.setdefault(arm, []).append(latency_ms)
        entry = {"id": request_id, "arm": arm, "version": str(version), "label": ",".join(labels)}
        self.journal.append(entry)
        self.replay.append({**entry, "inputs": raw_inputs})

    def failed(self, arm: str, code: str, n: int) -> None:
        """``n`` requests of ``arm`` failed in the model with ``code``."""
        self.counts[f"{arm}:requests"] += n
        self.counts[f"{arm}:errors:{code}"] += n


class ExperimentArms:
    """Tracks the model's experiment and keeps its treatment version loaded."""

    def __init__(self, client, registry: Registry, settings: Settings) -> None:
        self.store = ExperimentStore(client, registry)
        self.registry = registry
        self.settings = settings
        self.experiment: Experiment | None = None
        self.treatment: LoadedModel | None = None
        self.loader = Reloader(lambda mv: load_version(registry, mv, settings))

    def reconcile(self, model: str, *, in_line: bool) -> None:
        """Re-read the experiment; load the treatment (in line at start-up or in burst mode)."""
        experiment = self.store.get(model)
        if experiment is None or experiment.status != "running":
            self.experiment, self.treatment = None, None
            return
        self.experiment = experiment
        if self.treatment is not None and self.treatment.version.version == experiment.treatment_version:
            return
        target = self.registry.get(model, experiment.treatment_version)
        if not in_line:
            self.loader.request(target)
            return
        try:
            self.treatment = load_version(self.registry, target, self.settings)
        except StreamserveError as e:
            log.error("experiment %s: cannot load treatment v%s: %s", experiment.id, target.version, e)

    def swap_if_ready(self) -> None:
        """Take a treatment loaded in the background, if it is still the one wanted."""
        ready = self.loader.take_ready()
        if ready is not None and self.experiment is not None \
                and ready.version.version == self.experiment.treatment_version:
            self.treatment = ready

    def active(self, control: LoadedModel | None) -> Experiment | None:
        """The experiment, if this worker can serve both of its arms right now."""
        e = self.experiment
        if e is None or self.treatment is None or control is None:
            return None
        return e if control.version.version == e.control_version else None
