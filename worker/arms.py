"""The two arms of a running experiment, as one worker serves them.

The control is the worker's served version (Production); the treatment is
loaded beside it. An experiment is *active* in a worker only while it is
running, the treatment is loaded, and the control is the version the
experiment names; otherwise every request is served by the control, untagged.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from experiments.assignment import CONTROL, TREATMENT
from experiments.store import Experiment, ExperimentStore
from protocol import keys
from protocol.errors import InternalError, StreamserveError
from protocol.messages import Request
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

    def queue(self, pipe, model: str) -> None:
        """Add the batch's accounting to the reply transaction (nothing outside an experiment)."""
        exp_id = self.experiment_id
        if not exp_id:
            return
        for name, n in self.counts.items():
            pipe.hincrby(keys.experiment_counts(model, exp_id), name, n)
        for arm, values in self.latencies_ms.items():
            key = keys.experiment_latency(model, exp_id, arm)
            pipe.lpush(key, *(f"{v:.3f}" for v in values))
            pipe.ltrim(key, 0, LATENCY_SAMPLES - 1)
        for entry in self.journal:
            pipe.xadd(keys.experiment_journal(model, exp_id), entry, maxlen=JOURNAL_MAXLEN, approximate=True)
        for record in self.replay:
            pipe.xadd(keys.experiment_replay(model, exp_id), record, maxlen=REPLAY_MAXLEN, approximate=True)


# Computes a batch on a version and queues its replies, tagged with the arm (None: no experiment).
RunBatch = Callable[[LoadedModel, list[Request], str | None], None]
# One model call for a batch: outputs with the batch axis.
CallModel = Callable[[LoadedModel, list[Request]], dict[str, np.ndarray]]


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
        """Re-read the experiment; load the treatment (in line at start-up or in burst mode).

        If the experiment or its treatment's record cannot be read, the experiment is
        off in this worker (everything goes to Production) and the error is raised.
        """
        try:
            experiment = self.store.get(model)
            target = None if experiment is None else self.registry.get(model, experiment.treatment_version)
        except StreamserveError:
            self.experiment, self.treatment = None, None
            raise
        if experiment is None or target is None or experiment.status != "running":
            self.experiment, self.treatment = None, None
            return
        self.experiment = experiment
        if self.treatment is not None and self.treatment.version.version == experiment.treatment_version:
            return
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

    def serve(self, log_: ExperimentLog, control: LoadedModel, batch: list[Request], run: RunBatch,
              call: CallModel) -> None:
        """Route ``batch``: all to the control, split between the arms, or shadowed by the treatment."""
        experiment = self.active(control)
        if experiment is None or self.treatment is None:
            run(control, batch, None)
            return
        log_.experiment_id = experiment.id
        if experiment.mode == "shadow":  # both score everything; the control answers
            run(control, batch, CONTROL)
            self._shadow(log_, self.treatment, batch, call)
            return
        groups: dict[str, list[Request]] = {CONTROL: [], TREATMENT: []}
        for r in batch:
            groups[experiment.arm(r.route, r.request_id)].append(r)
        for arm, loaded in ((CONTROL, control), (TREATMENT, self.treatment)):
            if groups[arm]:
                run(loaded, groups[arm], arm)

    @staticmethod
    def _shadow(log_: ExperimentLog, treatment: LoadedModel, batch: list[Request], call: CallModel) -> None:
        """Score the batch on the treatment too; its labels go to the journal, never to the bot."""
        try:
            outputs = call(treatment, batch)
        except Exception as e:  # the shadow must never hurt the answered requests
            log.warning("shadow treatment failed on %d requests: %s", len(batch), e)
            log_.failed(TREATMENT, InternalError.code, len(batch))
            return
        log_.counts[f"{TREATMENT}:requests"] += len(batch)
        labels = treatment.version.labels
        journal = log_.journal[-len(batch):]
        for r, part, entry in zip(batch, split_rows(outputs, batch), journal, strict=False):
            if entry["id"] == r.request_id:
                entry["shadow_label"] = ",".join(labels_of(labels, part))
                entry["shadow_version"] = str(treatment.version.version)


def split_rows(outputs: dict[str, np.ndarray], batch: list[Request]) -> list[dict[str, np.ndarray]]:
    """Each request's rows of the batch's outputs, in batch order."""
    parts, offset = [], 0
    for r in batch:
        parts.append({name: value[offset:offset + r.n_rows] for name, value in outputs.items()})
        offset += r.n_rows
    return parts


def labels_of(labels: list[str], outputs: dict[str, np.ndarray]) -> list[str]:
    """Label per row of the first output (empty when the version has no labels)."""
    if not labels:
        return []
    return [labels[i] for i in next(iter(outputs.values())).argmax(axis=-1).tolist()]
