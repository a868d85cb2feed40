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

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Request:
    """One decoded stream entry: ``inputs`` each have a leading batch axis of ``n_rows``."""

    entry_id: str
    request_id: str
    reply_to: str
    deadline_ms: int
    route: str
    inputs: dict[str, np.ndarray]
    raw_inputs: bytes = b""  # the msgpack as received, kept for the experiment journal

    @property
    def n_rows(self) -> int:
        """Samples this request carries (the shared leading dimension)."""
        rows: int = next(iter(self.inputs.values())).shape[0]
        return rows


def encode_request(
    request_id: str, inputs: dict[str, np.ndarray], *, deadline_ms: int, route: str = "",
    reply_to: str | None = None,
) -> Fields:
    """Stream entry fields for XADD. Every input must already have its batch axis.

    ``reply_to`` names the reply list (default: the request id); several requests
    may share one, and their replies are told apart by their ``id``.
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
    except (InvalidInput, ValueError) as e:
        raise InvalidInput(str(e), request_id=request_id) from e
    return Request(entry_id, request_id, reply_to, deadline_ms, route, inputs, fields.get(b"inputs", b""))


def _deadline_ms(text: str | None) -> int:
    """Absent or ``0``: no deadline; otherwise whole Unix milliseconds, as decimal digits."""
    if text is None:
        return 0
    if not (text.isascii() and text.isdigit() and len(text) <= 16):
        raise InvalidInput(f"'deadline_ms' must be whole Unix milliseconds (decimal digits), got {text[:32]!r}")
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
    body = codec.unpack(payload, max_bytes=max_bytes)
    if not isinstance(body, dict) or not body or len(body) > MAX_INPUTS:
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
    ``variant`` (control / treatment) while an experiment is running."""
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
    """A successful reply, as the bot sees it."""

    request_id: str
    model: str
    model_version: int
    outputs: dict[str, np.ndarray]
    labels: list[str] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    queue_ms: float = 0.0
    infer_ms: float = 0.0
    worker: str = ""
    variant: str = ""  # "control" / "treatment" while an experiment runs

    @property
    def label(self) -> str:
        """The label of a single-sample request."""
        return self._single(self.labels, "label")

    @property
    def confidence(self) -> float:
        """The confidence (max probability) of a single-sample request."""
        return self._single(self.confidences, "confidence")

    def _single(self, values: list[_T], name: str) -> _T:
        if len(values) != 1:
            raise ValueError(f"{name} needs exactly one sample with labels; have {len(values)}")
        return values[0]

    def __repr__(self) -> str:
        shown = self.labels[0] if len(self.labels) == 1 else f"{len(self.labels)} labels"
        return (f"Prediction({self.model}@v{self.model_version} {shown}"
                f" queue={self.queue_ms:.2f}ms infer={self.infer_ms:.2f}ms)")


def decode_reply(payload: bytes, *, max_bytes: int) -> Prediction:
    """A reply as a :class:`Prediction`, or the matching :class:`ReplyError` raised."""
    reply = codec.unpack(payload, max_bytes=max_bytes)
    if not isinstance(reply, dict) or "ok" not in reply:
        raise InvalidInput("reply is not a protocol map")
    if not reply["ok"]:
        error = reply.get("error") or {}
        raise from_reply(str(error.get("code")), str(error.get("message")), reply.get("id"))
    timings = reply.get("timings") or {}
    return Prediction(
        request_id=reply["id"], model=reply["model"], model_version=reply["version"],
        outputs={k: codec.decode_tensor(v, max_bytes=max_bytes) for k, v in reply["outputs"].items()},
        labels=list(reply.get("label") or []), confidences=list(reply.get("confidence") or []),
        queue_ms=float(timings.get("queue_ms", 0.0)), infer_ms=float(timings.get("infer_ms", 0.0)),
        worker=str(reply.get("worker", "")), variant=str(reply.get("variant", "")),
    )


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
