"""The two arms of a running experiment, as one worker serves them.

The control is the worker's served version (Production); the treatment is
loaded beside it. An experiment is *active* in a worker only while it is
running, the treatment is loaded, and the control is the version the
experiment names; otherwise every request is served by the control, untagged.

A request sent outside any experiment (entry field ``experiment`` = ``off``) is
always served by the control and is no exposure: no arm, no journal, replay or
count entry, no shadow score; its reply's variant is ``none``.
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
JOURNAL_MAXLEN = 1_000_000  # ~130 bytes an entry: one row per exposure for the analysis
REPLAY_MAXLEN = 2_000  # inputs too (26 KB for the reference model): ~53 MB of Redis at most


@dataclass
class ExperimentLog:
    """Per-arm accounting of one batch, written with its replies.

    The journal has one entry per request an arm answered or failed: ``id``, ``arm``,
    ``version``, ``route``, ``latency_ms`` (queue + inference, as the worker saw it)
    and ``label``, or ``error`` (its code) instead of the label. Its entry id (the
    Redis clock) is the exposure's time. In shadow mode the control's entry also
    carries ``shadow_version`` and ``shadow_label``, or ``shadow_error``.
    """

    experiment_id: str = ""
    counts: Counter = field(default_factory=Counter)
    journal: list[dict[str, str]] = field(default_factory=list)
    replay: list[dict[str, str | bytes]] = field(default_factory=list)

    def served(self, arm: str, request: Request, version: int, labels: list[str], latency_ms: float) -> None:
        """One request answered by ``arm`` (nothing for one sent outside the experiment)."""
        if not request.experiment:
            return
        self.counts[f"{arm}:requests"] += 1
        entry = self._entry(arm, request, version, latency_ms)
        entry["label"] = ",".join(labels)
        self.journal.append(entry)
        self.replay.append({"id": request.request_id, "arm": arm, "version": str(version),
                            "label": entry["label"], "inputs": request.raw_inputs})

    def failed(self, arm: str, requests: list[Request], version: int, code: str,
               latencies_ms: list[float]) -> None:
        """``requests`` of ``arm`` failed in the model with ``code`` (each after its latency); those
        sent outside the experiment are left out."""
        exposed = [(r, ms) for r, ms in zip(requests, latencies_ms, strict=True) if r.experiment]
        self.counts[f"{arm}:requests"] += len(exposed)
        self.counts[f"{arm}:errors:{code}"] += len(exposed)
        for r, latency_ms in exposed:
            entry = self._entry(arm, r, version, latency_ms)
            entry["error"] = code
            self.journal.append(entry)

    @staticmethod
    def _entry(arm: str, r: Request, version: int, latency_ms: float) -> dict[str, str]:
        return {"id": r.request_id, "arm": arm, "version": str(version), "route": r.route,
                "latency_ms": f"{latency_ms:.3f}"}

    def shadowed(self, batch: list[Request], version: int, labels: list[list[str]]) -> None:
        """The treatment scored ``batch`` beside the control: each request's labels."""
        self.counts[f"{TREATMENT}:requests"] += len(batch)
        for entry, request_labels in zip(self._control_entries(batch), labels, strict=True):
            if entry is not None:
                entry.update(shadow_version=str(version), shadow_label=",".join(request_labels))

    def shadow_failed(self, batch: list[Request], version: int, code: str) -> None:
        """The treatment failed on ``batch`` with ``code`` (the control's answers stand)."""
        self.counts[f"{TREATMENT}:requests"] += len(batch)
        self.counts[f"{TREATMENT}:errors:{code}"] += len(batch)
        for entry in self._control_entries(batch):
            if entry is not None:
                entry.update(shadow_version=str(version), shadow_error=code)

    def _control_entries(self, batch: list[Request]) -> list[dict[str, str] | None]:
        """The control's journal entries of ``batch``, in batch order (the control journaled it last)."""
        recent = {e["id"]: e for e in self.journal[-len(batch):]}
        return [recent.get(r.request_id) for r in batch]

    def queue(self, pipe, model: str, shard: int = 0) -> None:
        """Add the batch's accounting to the reply transaction, in the shard's keys (nothing outside
        an experiment)."""
        exp_id = self.experiment_id
        if not exp_id:
            return
        for name, n in self.counts.items():
            pipe.hincrby(keys.experiment_counts(model, exp_id, shard), name, n)
        journal = keys.experiment_journal(model, exp_id, shard)
        replay = keys.experiment_replay(model, exp_id, shard)
        for entry in self.journal:
            pipe.xadd(journal, entry, maxlen=JOURNAL_MAXLEN, approximate=True)
        for record in self.replay:
            pipe.xadd(replay, record, maxlen=REPLAY_MAXLEN, approximate=True)


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
        """Route ``batch``: all to the control, split between the arms, or shadowed by the treatment.

        Requests sent outside the experiment ride with the control's call (one model call, not two);
        ``run`` tags their replies ``none`` and ``log_`` leaves them out.
        """
        experiment = self.active(control)
        if experiment is None or self.treatment is None:
            run(control, batch, None)
            return
        log_.experiment_id = experiment.id
        if experiment.mode == "shadow":  # both score every exposure; the control answers
            run(control, batch, CONTROL)
            exposed = [r for r in batch if r.experiment]
            if exposed:
                self._shadow(log_, self.treatment, exposed, call)
            return
        groups: dict[str, list[Request]] = {CONTROL: [], TREATMENT: []}
        for r in batch:
            groups[experiment.arm(r.route, r.request_id) if r.experiment else CONTROL].append(r)
        for arm, loaded in ((CONTROL, control), (TREATMENT, self.treatment)):
            if groups[arm]:
                run(loaded, groups[arm], arm)

    @staticmethod
    def _shadow(log_: ExperimentLog, treatment: LoadedModel, batch: list[Request], call: CallModel) -> None:
        """Score the batch on the treatment too; its labels go to the journal, never to the bot."""
        version = treatment.version
        try:
            outputs = call(treatment, batch)
        except Exception as e:  # the shadow must never hurt the answered requests
            log.warning("shadow treatment failed on %d requests: %s", len(batch), e)
            log_.shadow_failed(batch, version.version, InternalError.code)
            return
        labels = [labels_of(version.labels, part) for part in split_rows(outputs, batch)]
        log_.shadowed(batch, version.version, labels)


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
