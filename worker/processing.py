"""Turn a batch of stream entries into an :class:`~worker.consumer.Outbox`: one answer per entry.

Each entry is admitted on its own (decode, deadline, queue age, input spec):
a bad one gets its error reply alone. The valid ones go through the
experiment arms to one model call per arm, in calls of at most ``max_batch_rows``
rows (an entry with more rows is computed alone); a model failure fails that
call's requests with ``INTERNAL`` and never the worker.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import redis

from protocol import codec, messages
from protocol.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    ReplyError,
)
from protocol.settings import Settings
from worker.arms import ExperimentArms, labels_of, split_rows
from worker.consumer import Entry, Outbox, id_ms
from worker.loader import LoadedModel
from worker.slot import ModelSlot

log = logging.getLogger(__name__)
# The stored replies of request ids (``keys.done_key``), None where there is none.
Markers = Callable[[list[str]], list[object]]


class BatchProcessor:
    """Answers entries for ``model`` with what ``slot`` and ``arms`` serve; signs replies ``worker_id``."""

    def __init__(self, model: str, worker_id: str, slot: ModelSlot, arms: ExperimentArms,
                 settings: Settings, *, max_queue_ms: float = 0.0) -> None:
        self.model, self.worker_id, self.slot, self.arms = model, worker_id, slot, arms
        self.settings, self.max_queue_ms = settings, max_queue_ms
        # The quickest recent model call (ms): a request whose deadline falls sooner than this
        # cannot be answered in time, so it is shed before the call instead of failing after it.
        self.fastest_call_ms = RecentMinimum()
        # Set while the model loads on a first request: a request that cannot wait for it is
        # answered OVERLOADED at once, with the load's expected remaining time (ms).
        self.loading_eta_ms: float | None = None

    def process(self, entries: list[Entry], dead_letter: Sequence[Entry] = (),
                markers: Markers | None = None) -> Outbox:
        """Answer every entry (computed, from its marker if re-sent, or with its own error);
        dead-letter ``dead_letter``. ``markers`` reads the stored replies of re-sent requests."""
        started_ms = time.time() * 1000
        out = Outbox()
        for entry in dead_letter:
            self._dead_letter(out, entry, f"delivered more than {self.settings.max_deliveries} times")
        valid = [r for r in (self._admit(out, e, started_ms) for e in entries) if r is not None]
        if markers is not None and any(r.resend for r in valid):
            valid = self._replay(out, valid, markers)
        loaded = self.slot.loaded
        if not valid or loaded is None:
            return out
        for i, chunk in enumerate(row_chunks(valid, self.max_rows(loaded))):
            # Later calls start later: a request whose deadline passed meanwhile is not computed.
            chunk = self._in_time(out, chunk, started_ms) if i else chunk
            if chunk:
                self.arms.serve(out.experiment, loaded, chunk, call=self._call,
                                run=lambda model, batch, arm: self._run(out, model, batch, started_ms, arm))
        return out

    def _replay(self, out: Outbox, valid: list[messages.Request], markers: Markers) -> list[messages.Request]:
        """Answer re-sent requests that were computed before from their markers; the rest, to compute.

        Only re-sent requests are looked up (one MGET), so the normal path reads nothing. A
        marker that cannot be read, or is not a plausible payload, is ignored: computing again
        costs a model call, never a wrong answer.
        """
        resent = [r for r in valid if r.resend]
        try:
            stored = markers([r.request_id for r in resent])
        except redis.RedisError as e:
            log.warning("markers of %d re-sent requests unreadable (%s); computing them", len(resent), e)
            return valid
        replayed = set()
        for r, payload in zip(resent, stored, strict=True):
            if isinstance(payload, bytes) and 0 < len(payload) <= self.settings.max_message_bytes:
                out.reply(r.reply_to, payload)
                replayed.add(r.entry_id)
        out.replayed += len(replayed)
        return [r for r in valid if r.entry_id not in replayed]

    def max_rows(self, loaded: LoadedModel) -> int:
        """Rows per model call: ``max_batch_rows``, or what ``batch_memory_mb`` holds of this version's
        inputs."""
        return self.settings.max_batch_rows or loaded.spec.max_rows(self.settings.batch_memory_mb)

    def _in_time(self, out: Outbox, chunk: list[messages.Request],
                 started_ms: float) -> list[messages.Request]:
        """The requests of ``chunk`` still within their deadline; the others get DEADLINE_EXCEEDED."""
        now_ms = time.time() * 1000
        late = [r for r in chunk if r.deadline_ms and r.deadline_ms < now_ms]
        for r in late:
            error = DeadlineExceeded(f"deadline passed {now_ms - r.deadline_ms:.1f} ms before compute "
                                     f"(waited {now_ms - started_ms:.1f} ms behind this batch's earlier "
                                     "model calls)", request_id=r.request_id)
            out.reply(r.reply_to, self._error(r.request_id, error, {"queue_ms": now_ms - id_ms(r.entry_id)}))
            out.codes.append(("", "", error.code))
        return [r for r in chunk if not (r.deadline_ms and r.deadline_ms < now_ms)]

    def _admit(self, out: Outbox, entry: Entry, now_ms: float) -> messages.Request | None:
        out.ack(entry)
        queue_ms = now_ms - id_ms(entry.id)
        out.waits.append((entry.lane, max(0.0, queue_ms) / 1000))
        try:
            return self._check(messages.decode_request(entry.id, entry.fields,
                                                       max_bytes=self.settings.max_message_bytes),
                               now_ms, queue_ms)
        except ReplyError as e:
            address = messages.reply_address(entry.fields)
            if address is None:
                self._dead_letter(out, entry, f"unanswerable: {e}")
            else:
                timings = {"queue_ms": queue_ms, "infer_ms": 0.0}
                out.reply(address[1], self._error(address[0], e, timings))
                out.codes.append(("", "", e.code))
            return None

    def _check(self, request: messages.Request, now_ms: float, queue_ms: float) -> messages.Request:
        if request.deadline_ms and request.deadline_ms < now_ms:
            raise DeadlineExceeded(f"deadline passed {now_ms - request.deadline_ms:.1f} ms "
                                   f"before compute (queued {queue_ms:.1f} ms)")
        fastest_ms = self.fastest_call_ms.value
        if request.deadline_ms and request.deadline_ms < now_ms + fastest_ms:
            raise Overloaded(f"{request.deadline_ms - now_ms:.1f} ms left after queueing {queue_ms:.1f} ms, "
                             f"less than the quickest recent model call ({fastest_ms:.1f} ms)")
        if self.max_queue_ms and queue_ms > self.max_queue_ms:
            raise Overloaded(f"queued {queue_ms:.1f} ms > {self.max_queue_ms} ms; shed")
        if self.slot.loaded is None and self.loading_eta_ms is not None:
            raise Overloaded(f"model {self.model!r} loading (~{self.loading_eta_ms:.0f} ms); retry")
        if self.slot.loaded is None:
            raise ModelNotFound(f"model {self.model!r} has no servable version ({self.slot.load_error})")
        self.slot.loaded.spec.check(request.inputs, self.settings.max_request_rows)
        return request

    @staticmethod
    def _call(loaded: LoadedModel, batch: list[messages.Request]) -> dict[str, np.ndarray]:
        """One model call for the batch; outputs must keep the batch axis."""
        rows = sum(r.n_rows for r in batch)
        stacked = {}
        for name, (dtype, shape) in loaded.spec.fields.items():  # the spec check made every part fit
            parts = [r.inputs[name] for r in batch]
            into = loaded.backend.stage(name, (rows, *shape), dtype)  # pinned host memory on CUDA
            stacked[name] = np.concatenate(parts) if into is None else np.concatenate(parts, out=into)
        outputs = loaded.backend.run(stacked)
        _check_outputs(outputs, rows)
        _check_labels(loaded.version.labels, outputs)
        return outputs

    def _run(self, out: Outbox, loaded: LoadedModel, batch: list[messages.Request], started_ms: float,
             arm: str | None) -> None:
        """Compute ``batch`` on ``loaded`` and queue one reply per request (tagged with ``arm``)."""
        t0 = time.perf_counter()
        out.computed += len(batch)
        try:
            outputs = self._call(loaded, batch)
        except Exception as e:  # a model failure fails this batch only, never the worker
            self._fail(out, loaded, batch, started_ms, (time.perf_counter() - t0) * 1000, arm, e)
            return
        infer_ms = (time.perf_counter() - t0) * 1000
        self.fastest_call_ms.add(infer_ms)
        out.calls.append((str(loaded.version.version), sum(r.n_rows for r in batch), infer_ms / 1000))
        mv = loaded.version
        timings = [{"queue_ms": started_ms - id_ms(r.entry_id), "infer_ms": infer_ms} for r in batch]
        variants = [reply_variant(r, arm) for r in batch]
        payloads = messages.encode_ok_many(batch, model=self.model, version=mv.version, outputs=outputs,
                                           labels=mv.labels, timings=timings, worker=self.worker_id,
                                           variants=variants)
        version = str(mv.version)
        for r, payload, variant in zip(batch, payloads, variants, strict=True):
            out.codes.append((version, variant or "", "OK"))
            out.reply(r.reply_to, payload)
            out.markers.append((r.request_id, payload))
        if arm:
            for r, part, t in zip(batch, split_rows(outputs, batch), timings, strict=True):
                out.experiment.served(arm, r, mv.version, labels_of(mv.labels, part),
                                      t["queue_ms"] + infer_ms)

    def _fail(self, out: Outbox, loaded: LoadedModel, batch: list[messages.Request], started_ms: float,
              infer_ms: float, arm: str | None, e: Exception) -> None:
        """Answer every request of a failed model call with ``INTERNAL`` and journal it for its arm."""
        log.exception("batch of %d failed", len(batch))
        err = e if isinstance(e, InternalError) else InternalError(f"model failed: {e}")
        for r in batch:
            out.reply(r.reply_to, self._error(r.request_id, err, {}))
            out.codes.append((str(loaded.version.version), reply_variant(r, arm) or "", err.code))
        if arm:
            latencies_ms = [started_ms - id_ms(r.entry_id) + infer_ms for r in batch]
            out.experiment.failed(arm, batch, loaded.version.version, err.code, latencies_ms)

    def _error(self, request_id: str, error: ReplyError, timings: dict[str, float]) -> bytes:
        loaded = self.slot.loaded
        return messages.encode_error(request_id, error, model=self.model,
                                     version=loaded.version.version if loaded else None,
                                     timings=timings, worker=self.worker_id)

    def _dead_letter(self, out: Outbox, entry: Entry, reason: str) -> None:
        out.ack(entry)
        out.dead.append((entry, reason))
        address = messages.reply_address(entry.fields)
        if address is not None:
            err = InternalError(f"dead-lettered: {reason}", request_id=address[0])
            out.reply(address[1], self._error(address[0], err, {}))
            out.codes.append(("", "", err.code))


def reply_variant(request: messages.Request, arm: str | None) -> str | None:
    """What a reply's ``variant`` says: the arm that ran the request (None: no experiment active),
    or ``none`` for a request sent outside any experiment, whatever ran it."""
    return arm if request.experiment else messages.OUTSIDE


def row_chunks(requests: list[messages.Request], max_rows: int) -> Iterator[list[messages.Request]]:
    """Consecutive groups of ``requests`` of at most ``max_rows`` rows; one over the cap is a group alone."""
    chunk: list[messages.Request] = []
    rows = 0
    for r in requests:
        if chunk and rows + r.n_rows > max_rows:
            yield chunk
            chunk, rows = [], 0
        chunk.append(r)
        rows += r.n_rows
    if chunk:
        yield chunk


class RecentMinimum:
    """The smallest of the last ``size`` values (0 before any): a floor that follows slow drifts."""

    def __init__(self, size: int = 64) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        """Record one value."""
        self._values.append(value)

    @property
    def value(self) -> float:
        """The minimum of the recent values."""
        return min(self._values, default=0.0)


def _check_outputs(outputs: dict[str, np.ndarray], rows: int) -> None:
    """Every output must have the batch axis (split per request) and a wire dtype (§3): a model that
    breaks either fails its batch with ``INTERNAL`` rather than the reply encoding, and so the loop."""
    if not outputs:
        raise InternalError("model returned no outputs")
    for name, value in outputs.items():
        if not isinstance(value, np.ndarray):  # ONNX sequences and maps (e.g. a ZipMap) come as lists
            raise InternalError(f"model output {name!r} is a {type(value).__name__}, not a tensor")
        if value.shape[:1] != (rows,):
            raise InternalError(f"model output {name!r} has shape {list(value.shape)}, without the batch "
                                f"axis of {rows} rows")
        try:
            codec.dtype_name(value.dtype)
        except InvalidInput as e:
            raise InternalError(f"model output {name!r}: {e}") from e


def _check_labels(labels: list[str] | None, outputs: dict[str, np.ndarray]) -> None:
    """A label is picked by argmax over the first output's row: a version with labels needs a first
    output of per-sample shape ``[len(labels)]``, or its batches fail with ``INTERNAL`` (the registry
    entry is wrong, not the request), instead of failing every reply built from them and so the
    worker's loop. Versions without labels may have outputs of any per-sample shape."""
    if not labels:
        return
    first = next(iter(outputs.values()), None)
    per_sample = list(first.shape[1:]) if first is not None else []
    if per_sample == [len(labels)]:
        return
    has = (f"{per_sample[0]} columns" if len(per_sample) == 1 else "no class axis" if not per_sample
           else f"per-sample shape {per_sample}, not [{len(labels)}]")
    raise InternalError(f"the version has {len(labels)} labels but its first output has {has}")
