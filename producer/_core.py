"""I/O-free parts of the clients: building entries and reading replies."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from protocol import keys, messages
from protocol.errors import DeadlineExceeded, InvalidInput, ReplyError

if TYPE_CHECKING:
    from protocol.values import Fields

Features = np.ndarray | dict[str, np.ndarray]
DEFAULT_INPUT = "features"
MAX_REPLY_BYTES = 64 << 20
OUTCOMES_MAXLEN = 1_000_000  # a safety cap on the outcomes stream, far above an experiment's needs


@dataclass(frozen=True, slots=True)
class Pending:
    """A request on its way: where its reply will land and when to give up."""

    request_id: str
    reply_key: str
    fields: Fields
    deadline_s: float


def prepare(model: str, features: Features, *, route: str, timeout_s: float,
            sample_ndim: int | None, request_id: str | None = None,
            reply_to: str | None = None) -> Pending:
    """Entry fields for one request; a bare array without a batch axis gets one (N = 1).

    ``sample_ndim`` is the rank of one sample; ``None`` means "treat the array as a
    single sample" (the usual bot call with a (60, 110) window).
    """
    if timeout_s <= 0:
        raise InvalidInput(f"timeout_s must be > 0, got {timeout_s}")
    inputs = features if isinstance(features, dict) else {DEFAULT_INPUT: features}
    arrays = {name: np.asarray(a) for name, a in inputs.items()}
    first = next(iter(arrays.values()))
    if sample_ndim is None or first.ndim == sample_ndim:
        arrays = {name: a[np.newaxis] for name, a in arrays.items()}
    request_id = request_id or uuid.uuid4().hex
    deadline_s = time.time() + timeout_s
    fields = messages.encode_request(request_id, arrays, deadline_ms=int(deadline_s * 1000),
                                     route=route, reply_to=reply_to)
    return Pending(request_id, keys.reply_key(model, reply_to or request_id), fields, deadline_s)


def prepare_many(model: str, batch: Sequence[Features], *, route: str,
                 timeout_s: float) -> list[Pending]:
    """Single-sample requests that share one reply list (one BLPOP/LPOP collects them all)."""
    token = uuid.uuid4().hex
    return [prepare(model, f, route=route, timeout_s=timeout_s, sample_ndim=None, reply_to=token)
            for f in batch]


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
    """Collects the replies of requests that share one reply list; the clients do the I/O.

    Loop: LPOP up to ``remaining`` replies; when the list is empty, BLPOP for the next.
    Replies are matched to requests by their ``id``.
    """

    def __init__(self, pendings: list[Pending], timeout_s: float) -> None:
        self.pendings = pendings
        self.timeout_s = timeout_s
        self.reply_key = pendings[0].reply_key if pendings else ""
        self.wanted = {p.request_id for p in pendings}
        self.results: dict[str, messages.Prediction | ReplyError] = {}
        self.deadline_s = max((p.deadline_s for p in pendings), default=0.0)

    @property
    def remaining(self) -> int:
        """Replies still missing."""
        return len(self.wanted) - len(self.results)

    def take(self, payloads: list[bytes] | None) -> None:
        """Record popped replies; strays (e.g. late replies of an earlier call) are dropped."""
        for payload in payloads or ():
            result = parse(payload)
            request_id = result.request_id
            if request_id in self.wanted:
                self.results[request_id] = result

    def done(self) -> bool:
        """All replies in, or out of time."""
        return self.remaining == 0 or time.time() >= self.deadline_s

    def outcome(self) -> list[messages.Prediction | ReplyError]:
        """Results in request order; missing replies become client-side DeadlineExceeded."""
        return [self.results.get(p.request_id) or timed_out(p, self.timeout_s) for p in self.pendings]
