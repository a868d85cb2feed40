"""Protocol v1 message schema: request stream entries and replies (see docs/protocol.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from protocol import codec
from protocol.errors import InvalidInput, ReplyError, from_reply
from protocol.keys import check_request_id

if TYPE_CHECKING:
    from protocol.values import Fields

PROTOCOL_VERSION = 1
MAX_INPUTS = 16
# Entry field ``experiment``: its one value, "serve outside any experiment" (absent: take part).
EXPERIMENT_OFF = "off"
# Reply ``variant`` of a request served outside any experiment: no arm, by the request's own ask.
OUTSIDE = "none"

_T = TypeVar("_T")


# Not frozen: a frozen dataclass sets each field through object.__setattr__, and a worker makes one
# per entry it reads. Nothing changes a Request once decoded.
@dataclass(slots=True)
class Request:
    """One decoded stream entry: ``inputs`` each have a leading batch axis of ``n_rows``."""

    entry_id: str
    request_id: str
    reply_to: str
    deadline_ms: int
    route: str
    inputs: dict[str, np.ndarray]
    raw_inputs: bytes = b""  # the msgpack as received, kept for the experiment journal
    resend: bool = False  # the bot re-sent this id after an Interrupted error (field "resend" = "1")
    # False (field "experiment" = "off"): the control answers it, it is assigned to no arm, journaled
    # nowhere, shadowed by nothing; debugging traffic never becomes an exposure without an outcome.
    experiment: bool = True

    @property
    def n_rows(self) -> int:
        """Samples this request carries (the shared leading dimension)."""
        rows: int = next(iter(self.inputs.values())).shape[0]
        return rows


def encode_request(
    request_id: str, inputs: dict[str, np.ndarray], *, deadline_ms: int, route: str = "",
    reply_to: str | None = None, resend: bool = False, experiment: bool = True,
) -> Fields:
    """Stream entry fields for XADD. Every input must already have its batch axis.

    ``reply_to`` names the reply list (default: the request id); several requests
    may share one, and their replies are told apart by their ``id``. ``resend`` marks
    a request re-sent with the id of one that may have been queued before (field
    ``resend`` = ``1``), so the worker answers it from its per-id marker if it ran.
    ``experiment=False`` sends field ``experiment`` = ``off``: the request is served by
    the control (Production) version outside any experiment, never assigned to an arm
    nor journaled as an exposure; its reply's ``variant`` is ``none``.
    """
    body = {name: codec.encode_tensor(array) for name, array in inputs.items()}
    fields: Fields = {
        "v": PROTOCOL_VERSION,
        "id": check_request_id(request_id),
        "deadline_ms": int(deadline_ms),
        "route": route,
        "inputs": codec.pack(body),
    }
    if reply_to is not None and reply_to != request_id:
        fields["reply_to"] = check_request_id(reply_to)
    if resend:
        fields["resend"] = "1"
    if not experiment:
        fields["experiment"] = EXPERIMENT_OFF
    return fields


def _token(fields: dict[bytes, bytes], name: bytes) -> str | None:
    raw = fields.get(name)
    try:
        return check_request_id(raw.decode()) if raw is not None else None
    except (UnicodeDecodeError, InvalidInput):
        return None


def reply_address(fields: dict[bytes, bytes]) -> tuple[str, str] | None:
    """(request id, reply token) if the entry can be answered at all, else None."""
    request_id = _token(fields, b"id")
    if request_id is None:
        return None
    if b"reply_to" not in fields:
        return request_id, request_id
    reply_to = _token(fields, b"reply_to")
    return None if reply_to is None else (request_id, reply_to)


def decode_request(entry_id: str, fields: dict[bytes, bytes], *, max_bytes: int) -> Request:
    """Validate and decode a raw stream entry; raises ``InvalidInput`` with a clear message.

    Once the request id is known, every error carries it, so the worker can reply.
    """
    address = reply_address(fields)
    if address is None:
        raise InvalidInput("entry has no valid 'id' (or 'reply_to') field")
    request_id, reply_to = address
    try:
        version = _text(fields, b"v")
        if version != str(PROTOCOL_VERSION):
            raise InvalidInput(
                f"unsupported protocol version {version!r}; this worker speaks {PROTOCOL_VERSION}")
        deadline_ms = _deadline_ms(_text(fields, b"deadline_ms"))
        inputs = decode_inputs(fields.get(b"inputs", b""), max_bytes)
        route = _text(fields, b"route") or ""
        experiment = _experiment(_text(fields, b"experiment"))
    except (InvalidInput, ValueError) as e:
        raise InvalidInput(str(e), request_id=request_id) from e
    return Request(entry_id, request_id, reply_to, deadline_ms, route, inputs, fields.get(b"inputs", b""),
                   resend=fields.get(b"resend") == b"1", experiment=experiment)


def _experiment(text: str | None) -> bool:
    """Absent: the request takes part in the model's experiment; ``off``: it stays outside."""
    if text is None:
        return True
    if text != EXPERIMENT_OFF:
        raise InvalidInput(f"'experiment' must be {EXPERIMENT_OFF!r} or absent, got {text[:32]!r}")
    return False


def _deadline_ms(text: str | None) -> int:
    """Absent or ``0``: no deadline; otherwise whole Unix milliseconds, as decimal digits."""
    if text is None:
        return 0
    if not (text.isascii() and text.isdigit() and len(text) <= 16):
        raise InvalidInput(f"'deadline_ms' must be whole Unix milliseconds (decimal digits), "
                           f"got {text[:32]!r}")
    return int(text)


def _text(fields: dict[bytes, bytes], name: bytes) -> str | None:
    raw = fields.get(name)
    if raw is None:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise InvalidInput(f"field {name.decode()!r} is not UTF-8") from e


def decode_inputs(payload: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    """The ``inputs`` field: named tensors sharing a leading batch axis."""
    body = codec.unpack_tensors(payload, max_bytes=max_bytes, max_tensors=MAX_INPUTS)
    if not body:
        raise InvalidInput(f"'inputs' must be a map of 1-{MAX_INPUTS} named tensors")
    inputs = {str(k): codec.decode_tensor(v, max_bytes=max_bytes) for k, v in body.items()}
    rows = {a.shape[0] if a.ndim else None for a in inputs.values()}
    if len(rows) != 1 or None in rows or 0 in rows:
        raise InvalidInput("every input needs the same leading batch dimension (>= 1)")
    return inputs


def encode_ok(
    request: Request, *, model: str, version: int, outputs: dict[str, np.ndarray],
    labels: list[str] | None, timings: dict[str, float], worker: str, variant: str | None = None,
) -> bytes:
    """A success reply for ``request``; ``label``/``confidence`` when the version has labels,
    ``variant`` (control / treatment) while an experiment is running, ``none`` (:data:`OUTSIDE`)
    for a request sent outside any experiment."""
    reply: dict[str, Any] = {
        "v": PROTOCOL_VERSION, "id": request.request_id, "ok": True, "model": model,
        "version": version, "worker": worker, "timings": timings,
        "outputs": {name: codec.encode_tensor(a) for name, a in outputs.items()},
    }
    if variant:
        reply["variant"] = variant
    if labels:
        probs = next(iter(outputs.values()))
        reply["label"] = [labels[i] for i in probs.argmax(axis=-1).tolist()]
        reply["confidence"] = probs.max(axis=-1).astype(float).tolist()
    return codec.pack(reply)


def encode_ok_many(
    requests: list[Request], *, model: str, version: int, outputs: dict[str, np.ndarray],
    labels: list[str] | None, timings: list[dict[str, float]], worker: str, variants: list[str | None],
) -> list[bytes]:
    """:func:`encode_ok` for each request of a batch from the batch's ``outputs`` (every request's
    rows, in order): the same bytes, with the wire dtypes, labels and confidences worked out once
    for the batch instead of once per request."""
    if any(a.ndim < 1 for a in outputs.values()) or (labels and next(iter(outputs.values())).ndim != 2):
        return [encode_ok(r, model=model, version=version, labels=labels, timings=t, worker=worker,
                          variant=v, outputs={k: a[o:o + r.n_rows] for k, a in outputs.items()})
                for r, t, v, o in zip(requests, timings, variants, _offsets(requests), strict=True)]
    wire = {name: codec.encode_tensor(a) for name, a in outputs.items()}  # one conversion per output
    width = {name: a[0].nbytes if len(a) else 0 for name, a in outputs.items()}
    if labels:
        label_rows, confidence_rows = _top_classes(next(iter(outputs.values())), labels)
    payloads = []
    for r, t, v, o in zip(requests, timings, variants, _offsets(requests), strict=True):
        n = r.n_rows
        reply: dict[str, Any] = {
            "v": PROTOCOL_VERSION, "id": r.request_id, "ok": True, "model": model, "version": version,
            "worker": worker, "timings": t,
            "outputs": {name: {"dtype": w["dtype"], "shape": [n, *w["shape"][1:]],
                               "data": w["data"][o * width[name]:(o + n) * width[name]]}
                        for name, w in wire.items()},
        }
        if v:
            reply["variant"] = v
        if labels:
            reply["label"], reply["confidence"] = label_rows[o:o + n], confidence_rows[o:o + n]
        payloads.append(codec.pack(reply))
    return payloads


SMALL_TOP_ELEMENTS = 32  # up to here Python's max is quicker than two numpy reductions


def _top_classes(probs: np.ndarray, labels: list[str]) -> tuple[list[str], list[float]]:
    """Per row of a 2-d ``probs``: the label of its largest value and that value, as numpy's
    ``argmax`` and ``max`` give them (the first maximum; a row with NaN goes to numpy, which picks
    the NaN)."""
    if probs.size <= SMALL_TOP_ELEMENTS:
        rows = probs.tolist()
        if all(sum(row) == sum(row) for row in rows):  # no NaN (nor +Inf with -Inf): max is numpy's
            tops = [max(row) for row in rows]
            return [labels[row.index(top)] for row, top in zip(rows, tops, strict=True)], \
                [float(top) for top in tops]
    return [labels[i] for i in probs.argmax(axis=-1).tolist()], probs.max(axis=-1).astype(float).tolist()


def _offsets(requests: list[Request]) -> list[int]:
    """Each request's first row in the batch."""
    offsets, row = [], 0
    for r in requests:
        offsets.append(row)
        row += r.n_rows
    return offsets


def encode_error(
    request_id: str, error: ReplyError, *, model: str, version: int | None,
    timings: dict[str, float] | None = None, worker: str = "",
) -> bytes:
    """An error reply carrying the error's stable code and message."""
    return codec.pack({
        "v": PROTOCOL_VERSION, "id": request_id, "ok": False, "model": model,
        "version": version, "worker": worker, "timings": timings or {},
        "error": {"code": error.code, "message": str(error)},
    })


@dataclass(frozen=True)
class Prediction:
    """A successful reply, as the bot sees it.

    ``outputs`` maps each output's name to its array, in the version's output order. For a call
    that sent one sample as a bare array (the client added its batch axis; ``single``), each
    output has its **per-sample** shape, the batch axis removed: a classifier's ``probs`` is
    ``(3,)``, a scalar regression output ``()``. For a call that sent N rows (``sample_ndim``),
    every output keeps its leading axis of N. ``labels`` / ``confidences`` (one per row, from the
    first output) are there only when the version has labels. :attr:`value` / :meth:`value_of`
    read one sample's output; :attr:`values` / :meth:`values_of` every row's.
    """

    request_id: str
    model: str
    model_version: int
    outputs: dict[str, np.ndarray]
    labels: list[str] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    queue_ms: float = 0.0
    infer_ms: float = 0.0
    worker: str = ""
    # "control" / "treatment": the arm that answered; "none": served outside any experiment, as the
    # request asked; "": untagged (no experiment active, or a worker that predates the field).
    variant: str = ""
    # True: the call sent one bare sample and ``outputs`` have their per-sample shapes; False: the
    # call sent rows with a batch axis (``sample_ndim``), which ``outputs`` keep.
    single: bool = False

    @property
    def in_experiment(self) -> bool:
        """True when an experiment's arm answered (and journaled) this request."""
        return self.variant in ("control", "treatment")

    @property
    def label(self) -> str:
        """The label of a single-sample request."""
        return self._single(self.labels, "label")

    @property
    def confidence(self) -> float:
        """The confidence (max probability) of a single-sample request."""
        return self._single(self.confidences, "confidence")

    @property
    def output_names(self) -> list[str]:
        """The outputs' names, in the version's order; the first is the one labels come from."""
        return list(self.outputs)

    @property
    def n_rows(self) -> int:
        """Samples the reply answers: 1 for a single-sample call, else the outputs' leading axis."""
        if self.single:
            return 1
        first = next(iter(self.outputs.values()), None)
        return len(self.labels) if first is None or first.ndim == 0 else int(first.shape[0])

    @property
    def value(self) -> float | np.ndarray:
        """One sample's value of the first output (see :meth:`value_of`)."""
        return self.value_of(self._first_output())

    @property
    def values(self) -> np.ndarray:
        """Every row's values of the first output (see :meth:`values_of`)."""
        return self.values_of(self._first_output())

    def value_of(self, name: str) -> float | np.ndarray:
        """Output ``name`` of a one-row reply: a Python float when its per-sample shape is ``()`` or
        ``[1]``, else an array of the per-sample shape (1-D for a vector). ``ValueError`` for N != 1."""
        rows = self.values_of(name)
        if len(rows) != 1:
            raise ValueError(f"value needs exactly one sample; have {len(rows)} (use values)")
        one = rows[0]
        return float(one) if one.ndim == 0 else one

    def values_of(self, name: str) -> np.ndarray:
        """Output ``name`` row by row, with the batch axis (N = 1 for a single-sample call): shape
        ``(N,)`` when the per-sample shape is ``()`` or ``[1]``, else ``(N, *per-sample shape)``."""
        if name not in self.outputs:
            raise KeyError(f"no output {name!r}; the reply has {self.output_names}")
        rows = self.outputs[name][np.newaxis] if self.single else self.outputs[name]
        return rows.reshape(len(rows)) if rows.shape[1:] in ((), (1,)) else rows

    def _first_output(self) -> str:
        if not self.outputs:
            raise ValueError("the reply has no outputs")
        return next(iter(self.outputs))

    def _single(self, values: list[_T], name: str) -> _T:
        if len(values) != 1:
            raise ValueError(f"{name} needs exactly one sample with labels; have {len(values)}")
        return values[0]

    def __repr__(self) -> str:
        if self.labels:
            shown = self.labels[0] if len(self.labels) == 1 else f"{len(self.labels)} labels"
        else:
            shown = ", ".join(f"{n}{list(a.shape)}" for n, a in self.outputs.items())
        return (f"Prediction({self.model}@v{self.model_version} {shown}"
                f" queue={self.queue_ms:.2f}ms infer={self.infer_ms:.2f}ms)")


def shaped(prediction: Prediction, rows: int, *, single: bool) -> Prediction:
    """``prediction`` as the call that sent ``rows`` rows sees it: every output (and the labels, if
    any) must have those rows, or the reply is malformed (``InvalidInput``: a reply comes from Redis
    and is untrusted); ``single`` (the client added the batch axis) removes that axis."""
    for name, array in prediction.outputs.items():
        if array.shape[:1] != (rows,):
            raise InvalidInput(f"malformed reply: output {name!r} has shape {list(array.shape)}, not the "
                               f"{rows} row(s) the request sent", request_id=prediction.request_id)
    if any(len(v) not in (0, rows) for v in (prediction.labels, prediction.confidences)):
        raise InvalidInput(f"malformed reply: {len(prediction.labels)} labels and "
                           f"{len(prediction.confidences)} confidences for {rows} row(s)",
                           request_id=prediction.request_id)
    if not single:
        return prediction
    # a[0, ...]: a 0-d array for a scalar output, never a numpy scalar (outputs hold arrays).
    # Built field by field: dataclasses.replace looks the fields up again on every call.
    p = prediction
    return Prediction(p.request_id, p.model, p.model_version, {n: a[0, ...] for n, a in p.outputs.items()},
                      p.labels, p.confidences, p.queue_ms, p.infer_ms, p.worker, p.variant, single=True)


def decode_reply(payload: bytes, *, max_bytes: int) -> Prediction:
    """A reply as a :class:`Prediction`, or the matching :class:`ReplyError` raised.

    Replies come from Redis, so they are untrusted: a malformed one (missing keys,
    wrong types) raises ``InvalidInput``, never ``KeyError`` or ``TypeError``. Unknown
    keys are ignored (replies may gain keys within version 1).
    """
    quick = _quick_prediction(payload, max_bytes)
    return quick if quick is not None else _decode_reply(payload, max_bytes)


def _decode_reply(payload: bytes, max_bytes: int) -> Prediction:
    """:func:`decode_reply` for every reply: the schema walk's checks, each with its message."""
    try:
        # Walked under the schema before anything is built (a crafted reply costs no memory).
        reply = codec.unpack_reply(payload, max_bytes=max_bytes, max_tensors=MAX_INPUTS)
    except InvalidInput as e:
        raise InvalidInput(f"malformed reply: {e}") from e
    request_id = _reply_id(reply)
    if not _field(reply, "ok", (bool,), request_id):
        raise _reply_error(reply, request_id)
    return _prediction(reply, request_id, max_bytes)


_REQUIRED: Any = object()
# The keys of a success reply as workers write it; a reply with any other key takes the general path.
_QUICK_KEYS = frozenset({"v", "id", "ok", "model", "version", "worker", "timings", "outputs", "variant",
                         "label", "confidence"})
_NUMBERS = (int, float)


def _quick_prediction(payload: bytes, max_bytes: int) -> Prediction | None:
    """A small success reply of the usual shape, checked and built in one pass: what the general
    path (:func:`decode_reply`) would build from it; None for anything else, which that path then
    decodes or refuses with its own message. One reply is read per call: this is its latency."""
    reply = codec.unpack_small(payload, codec.MAX_MESSAGE_CHARS) if len(payload) <= max_bytes else None
    if type(reply) is not dict or reply.get("ok") is not True or not reply.keys() <= _QUICK_KEYS:
        return None
    get = reply.get
    rid, model, version, worker, variant = get("id"), get("model"), get("version"), get("worker", ""), \
        get("variant", "")
    timings, outputs, labels, confidences = get("timings", {}), get("outputs"), get("label", []), \
        get("confidence", [])
    if not (type(rid) is str and type(model) is str and type(version) is int and type(worker) is str
            and type(variant) is str and type(timings) is dict and type(outputs) is dict
            and type(labels) is list and type(confidences) is list and codec.is_atom(get("v"))
            and len(timings) <= codec.MAX_REPLY_TIMINGS and len(outputs) <= MAX_INPUTS
            and len(labels) <= codec.MAX_REPLY_ROWS and len(confidences) <= codec.MAX_REPLY_ROWS
            and all(type(k) is str and type(v) in _NUMBERS for k, v in timings.items())
            and all(type(v) is str for v in labels) and all(type(v) in _NUMBERS for v in confidences)
            and all(type(k) is str for k in outputs)):
        return None
    try:
        check_request_id(rid)
        arrays = {k: codec.decode_tensor(v, max_bytes=max_bytes) for k, v in outputs.items()}
    except InvalidInput:
        return None
    return Prediction(rid, model, version, arrays, labels, [float(c) for c in confidences],
                      float(timings.get("queue_ms", 0.0)), float(timings.get("infer_ms", 0.0)), worker,
                      variant)


def _reply_id(reply: dict[str, Any]) -> str:
    request_id = reply.get("id")
    if not isinstance(request_id, str):
        raise InvalidInput("malformed reply: no string 'id'")
    try:
        return check_request_id(request_id)
    except InvalidInput as e:
        raise InvalidInput(f"malformed reply: {e}") from e


def _field(reply: dict[str, Any], name: str, kinds: tuple[type, ...], request_id: str,
           default: Any = _REQUIRED) -> Any:
    """``reply[name]`` if its type is exactly one of ``kinds`` (so a bool is no int); absent or
    nil gives ``default``."""
    value = reply.get(name)
    if value is None and default is not _REQUIRED:
        return default
    if type(value) not in kinds:
        wanted = " or ".join(k.__name__ for k in kinds)
        raise InvalidInput(f"malformed reply: {name!r} must be {wanted}, got {type(value).__name__}",
                           request_id=request_id)
    return value


def _reply_error(reply: dict[str, Any], request_id: str) -> ReplyError:
    error = _field(reply, "error", (dict,), request_id)
    code, message = error.get("code"), error.get("message", "")
    if type(code) is not str or type(message) is not str:
        return InvalidInput("malformed reply: 'error' needs a string code and message", request_id=request_id)
    return from_reply(code, message, request_id)


def _list_of(reply: dict[str, Any], name: str, kinds: tuple[type, ...], request_id: str) -> list[Any]:
    values: list[Any] = _field(reply, name, (list,), request_id, [])
    if not all(type(v) in kinds for v in values):
        raise InvalidInput(f"malformed reply: {name!r} holds a value of the wrong type",
                           request_id=request_id)
    return values


def _prediction(reply: dict[str, Any], request_id: str, max_bytes: int) -> Prediction:
    timings = _field(reply, "timings", (dict,), request_id, {})
    if not all(type(v) in (int, float) for v in timings.values()):
        raise InvalidInput("malformed reply: 'timings' values must be numbers", request_id=request_id)
    return Prediction(
        request_id=request_id, model=_field(reply, "model", (str,), request_id),
        model_version=_field(reply, "version", (int,), request_id),
        outputs=_outputs(_field(reply, "outputs", (dict,), request_id), request_id, max_bytes),
        labels=_list_of(reply, "label", (str,), request_id),
        confidences=[float(c) for c in _list_of(reply, "confidence", (int, float), request_id)],
        queue_ms=float(timings.get("queue_ms", 0.0)), infer_ms=float(timings.get("infer_ms", 0.0)),
        worker=_field(reply, "worker", (str,), request_id, ""),
        variant=_field(reply, "variant", (str,), request_id, ""),
    )


def _outputs(outputs: dict[str, Any], request_id: str, max_bytes: int) -> dict[str, np.ndarray]:
    try:
        return {str(k): codec.decode_tensor(v, max_bytes=max_bytes) for k, v in outputs.items()}
    except InvalidInput as e:
        raise InvalidInput(f"malformed reply: {e}", request_id=request_id) from e


def encode_outcome(request_id: str, *, correct: bool | None = None, label: str | None = None,
                   pnl: float | None = None, at_ms: int) -> Fields:
    """Fields of an outcome entry; at least one of ``correct``, ``label``, ``pnl``."""
    if correct is None and label is None and pnl is None:
        raise InvalidInput("an outcome needs correct, label or pnl")
    fields: Fields = {"id": check_request_id(request_id), "at_ms": str(int(at_ms))}
    if correct is not None:
        fields["correct"] = "1" if correct else "0"
    if label is not None:
        fields["label"] = str(label)
    if pnl is not None:
        if not np.isfinite(pnl):
            raise InvalidInput(f"pnl must be finite, got {pnl}")
        fields["pnl"] = repr(float(pnl))
    return fields
