"""I/O-free parts of the clients: building entries and reading replies."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import numpy as np

from protocol import keys, messages
from protocol.errors import DeadlineExceeded, InvalidInput, ReplyError

Features = np.ndarray | dict[str, np.ndarray]
DEFAULT_INPUT = "features"
MAX_REPLY_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class Pending:
    """A request on its way: where its reply will land and when to give up."""

    request_id: str
    reply_key: str
    fields: dict
    deadline_s: float
    single: bool


def prepare(model: str, features: Features, *, route: str, timeout_s: float,
            sample_ndim: int | None, request_id: str | None = None) -> Pending:
    """Entry fields for one request; a bare array without a batch axis gets one (N = 1).

    ``sample_ndim`` is the rank of one sample; ``None`` means "treat the array as a
    single sample" (the usual bot call with a (60, 110) window).
    """
    if timeout_s <= 0:
        raise InvalidInput(f"timeout_s must be > 0, got {timeout_s}")
    inputs = features if isinstance(features, dict) else {DEFAULT_INPUT: features}
    arrays = {name: np.asarray(a) for name, a in inputs.items()}
    first = next(iter(arrays.values()))
    single = sample_ndim is None or first.ndim == sample_ndim
    if single:
        arrays = {name: a[np.newaxis] for name, a in arrays.items()}
    request_id = request_id or uuid.uuid4().hex
    deadline_s = time.time() + timeout_s
    fields = messages.encode_request(request_id, arrays, deadline_ms=int(deadline_s * 1000), route=route)
    return Pending(request_id, keys.reply_key(model, request_id), fields, deadline_s, single)


def parse(payload: bytes) -> messages.Prediction | ReplyError:
    """A reply payload as a Prediction, or the error it carries (returned, not raised)."""
    try:
        return messages.decode_reply(payload, max_bytes=MAX_REPLY_BYTES)
    except ReplyError as e:
        return e


def unwrap(result: messages.Prediction | ReplyError) -> messages.Prediction:
    """Return a prediction, raise an error."""
    if isinstance(result, ReplyError):
        raise result
    return result


def timed_out(pending: Pending, timeout_s: float) -> DeadlineExceeded:
    """The client-side error for a reply that did not come in time."""
    return DeadlineExceeded(f"no reply within {timeout_s:.3f} s", request_id=pending.request_id)


def block_s(deadline_s: float) -> float:
    """BLPOP timeout until ``deadline_s``; never 0, which would block forever."""
    return max(0.001, round(deadline_s - time.time(), 3))


class Gatherer:
    """Collects replies for many pending requests; the clients only do the I/O.

    Loop: BLPOP on every key still waiting (one reply), then LPOP the rest in one
    pipeline (whatever is already there), until all are in or the deadline passes.
    """

    def __init__(self, pendings: list[Pending], timeout_s: float) -> None:
        self.pendings = pendings
        self.timeout_s = timeout_s
        self.waiting = {p.reply_key: p for p in pendings}
        self.results: dict[str, messages.Prediction | ReplyError] = {}
        self.deadline_s = max((p.deadline_s for p in pendings), default=0.0)

    def keys(self) -> list[str]:
        """Reply keys still waiting."""
        return list(self.waiting)

    def take(self, key: bytes | str, payload: bytes | None) -> None:
        """Record one popped reply (``None`` = nothing there yet)."""
        if payload is not None:
            key = key.decode() if isinstance(key, bytes) else key
            self.results[key] = parse(payload)
            del self.waiting[key]

    def done(self) -> bool:
        """All replies in, or out of time."""
        return not self.waiting or time.time() >= self.deadline_s

    def outcome(self) -> list[messages.Prediction | ReplyError]:
        """Results in request order; missing replies become client-side DeadlineExceeded."""
        return [self.results.get(p.reply_key) or timed_out(p, self.timeout_s) for p in self.pendings]
