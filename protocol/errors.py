"""The one error tree of streamserve.

::

    StreamserveError
    ├── ReplyError                 an error a worker can put in a reply (has a ``code``)
    │   ├── InvalidInput           INVALID_INPUT      bad message, tensor, shape, dtype, version
    │   ├── ModelNotFound          MODEL_NOT_FOUND    no loadable version of the model
    │   ├── DeadlineExceeded       DEADLINE_EXCEEDED  deadline passed (worker- or client-side)
    │   ├── Overloaded             OVERLOADED         shed without being computed
    │   └── InternalError          INTERNAL           model failure, dead-lettered entry
    ├── ConfigError                settings or arguments that cannot work
    ├── Unavailable                Redis cannot be reached (client side)
    │   └── Interrupted            lost in a failover: safe to re-send with the same ids
    ├── RegistryError              unknown model/version, bad stage transition
    └── ArtifactIntegrityError     artifact outside the store, missing, or not matching its sha256

A worker writes ``{"code": err.code, "message": str(err)}``; a client turns it
back into the same class with :func:`from_reply`.
"""

from __future__ import annotations

from collections.abc import Sequence


class StreamserveError(Exception):
    """Root of every error raised by streamserve."""


class ReplyError(StreamserveError):
    """An error that travels in a reply; ``code`` is its stable wire name."""

    code = "INTERNAL"

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class InvalidInput(ReplyError):
    """The request cannot be decoded or does not match the served input spec."""

    code = "INVALID_INPUT"


class ModelNotFound(ReplyError):
    """No version of the model can be served (none in Production, or it failed to load)."""

    code = "MODEL_NOT_FOUND"


class DeadlineExceeded(ReplyError):
    """The request's deadline passed before it was computed or answered."""

    code = "DEADLINE_EXCEEDED"


class Overloaded(ReplyError):
    """The worker shed the request instead of computing it, or (client side) Redis refused the
    request because it is out of memory."""

    code = "OVERLOADED"


class InternalError(ReplyError):
    """The model failed, or the entry was dead-lettered after too many deliveries."""

    code = "INTERNAL"


class ConfigError(StreamserveError):
    """Settings or arguments that cannot work."""


class Unavailable(StreamserveError):
    """Redis cannot be reached: the connection is refused, or lost for longer than the caller's timeout.

    Raised by the clients, never written into a reply. Raised at once when nothing was
    sent; once a request may have been queued, only after the caller's deadline.
    """


class Interrupted(Unavailable):
    """A cluster failover lost the request: the connection to its node was lost after it may have
    been queued, and the slot's new master holds neither its entry nor its reply.

    ``request_ids`` are the calls' ids not answered; each may be re-sent with the same id and
    ``resend=True`` (``predict(..., request_id=e.request_ids[0], resend=True)``): a worker
    answers a re-sent id it already computed from its reply marker instead of computing it again
    (docs/protocol.md §6 names the cases a marker cannot cover).
    """

    def __init__(self, message: str, *, request_ids: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.request_ids = list(request_ids)


class RegistryError(StreamserveError):
    """Unknown model or version, or a stage change that is not allowed."""


class ArtifactIntegrityError(StreamserveError):
    """An artifact's recorded location leaves the artifact directory, or its bytes are missing
    or do not match the sha256 recorded in the registry."""


REPLY_ERRORS: dict[str, type[ReplyError]] = {
    cls.code: cls for cls in (InvalidInput, ModelNotFound, DeadlineExceeded, Overloaded, InternalError)
}


def from_reply(code: str, message: str, request_id: str | None = None) -> ReplyError:
    """The exception for a reply's error; unknown codes become :class:`InternalError`."""
    cls = REPLY_ERRORS.get(code, InternalError)
    return cls(message if cls.code == code else f"{code}: {message}", request_id=request_id)
