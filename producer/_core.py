"""I/O-free parts of the clients: building entries, the conversation with Redis, reading replies.

The sync and asyncio clients share everything here and differ only in how they run
one round trip (:class:`Trip`) and how they wait between retries.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np
import redis
from redis.crc import key_slot

from protocol import keys, messages, presence, sharding
from protocol.errors import (
    DeadlineExceeded,
    Interrupted,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    ReplyError,
    StreamserveError,
    Unavailable,
)

if TYPE_CHECKING:
    from protocol.values import Fields

Features = np.ndarray | dict[str, np.ndarray]
Command = tuple[object, ...]  # one Redis command's arguments, e.g. ("LRANGE", key, 0, -1)
DEFAULT_INPUT = "features"
MAX_REPLY_BYTES = 64 << 20
OUTCOMES_MAXLEN = 1_000_000  # a safety cap on the outcomes stream, far above an experiment's needs
# A read never waits past the call's deadline (the server ends a blocked command only on its cron
# tick, 100 ms at hz 10); once due, answers already buffered are still taken, none is waited for.
MIN_READ_S = 0.0001
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.01, 0.25  # between retries after a lost connection
MAX_FINISHED_KEYS = 1024  # reply keys waiting for deletion; beyond this they simply expire
# Server replies that say "not now" rather than "never": the XADD is re-sent (nothing was queued),
# a later command's is retried like a lost connection.
BUSY_PREFIXES = ("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "READONLY", "CLUSTERDOWN")
# redis-py parses these replies into classes and strips the prefix from the message; it makes
# LOADING a ConnectionError (BusyLoadingError), which the clients read as an answer, not a loss.
BUSY_ERRORS = (redis.exceptions.ReadOnlyError, redis.exceptions.TryAgainError,
               redis.exceptions.ClusterDownError, redis.exceptions.BusyLoadingError)  # MASTERDOWN included
ERROR_ANSWERS = (redis.ResponseError, redis.exceptions.BusyLoadingError)
# Connection trouble: retried within the deadline, without re-sending the request.
RETRYABLE = (redis.ConnectionError, redis.TimeoutError)

LOAD_REFRESH_S = 0.2  # how stale a shard's load may get before the next trip re-reads it (§13)
LOAD_MAX_AGE_S = 3.0  # an older load says nothing about now: nothing is shed on it
CLOSE_MAX_S = 0.5  # close() deletes finished reply keys within this, or leaves them to expire
VERIFY_MAX_S = 0.5  # after a failover, the look for the request on the new master is bounded so
STATE_READ_MAX_S = 0.1  # the layout/registry/presence read never holds a call longer than this
NEGATIVE_RECHECK_S = 0.05  # an older "nobody serves it" is read again before a call is refused
# After the model's slot could not be read (its node down, failing over), its workers could not beat
# either: "no live worker" is not believed until they have had this long to beat again.
OUTAGE_GRACE_S = 2.0


class NotConnected(redis.ConnectionError):
    """No connection could be opened: nothing of the round trip reached Redis."""


class DeadlineReached(redis.TimeoutError):
    """A trip's read reached the call's deadline; its connection (a command may still be blocked
    on it) is closed, never reused."""


class NotQueued(Exception):
    """Redis answered the XADD itself "not now" (LOADING, BUSY, …): nothing was queued, so the
    request is sent again within the deadline, after a backoff."""


class Redirected(Exception):
    """A cluster node answered MOVED or ASK: the slot map is stale; refresh it and repeat the trip.

    Nothing of the trip ran (a redirected command is not executed), so repeating it is safe.
    """


@dataclass(frozen=True, slots=True)
class Target:
    """Where a call's requests go: the model's shard and priority lane."""

    model: str
    shard: int = 0
    lane: str = "live"

    @property
    def stream(self) -> str:
        """The request stream of this shard and lane."""
        return keys.request_stream(self.model, self.shard, self.lane)


@dataclass(frozen=True, slots=True)
class Pending:
    """A request on its way: where it goes, where its reply will land and when to give up."""

    request_id: str
    reply_key: str
    fields: Fields
    deadline_s: float
    stream: str = ""
    rows: int = 1  # samples the request carries: every output of its reply must have as many
    single: bool = True  # one bare sample (the client added the batch axis): its reply is unbatched


def settled(answer: Any) -> Any:
    """One answer as hiredis's reader gives it, as the clients give it on: an error answer is
    returned (the connection is fine); a connection error reported in its place is raised, as
    redis-py's parser raises it."""
    if isinstance(answer, ERROR_ANSWERS):
        return answer
    if isinstance(answer, redis.ConnectionError):
        raise answer
    if isinstance(answer, list) and answer and isinstance(answer[0], redis.ConnectionError):
        raise answer[0]
    return answer


def new_token() -> str:
    """A fresh request id or reply token: 32 random hex digits."""
    return uuid.uuid4().hex


def prepare(target: Target, features: Features, *, route: str, timeout_s: float,
            sample_ndim: int | None, request_id: str | None = None,
            reply_to: str | None = None, resend: bool = False,
            deadline_s: float | None = None, experiment: bool = True) -> Pending:
    """Entry fields for one request; a bare array without a batch axis gets one (N = 1).

    ``sample_ndim`` is the rank of one sample; ``None`` means "treat the array as a
    single sample" (the usual bot call with a (60, 110) window). Where the axis was added here,
    the reply's outputs come back without it (``Pending.single``). A caller-supplied
    ``request_id`` is checked and gets a random reply token of its own, so its reply
    key is never one an earlier call (or another bot) used. ``resend`` marks a request
    sent again under the id of one that may have been queued (see ``Interrupted``).
    ``deadline_s`` (wall clock) is when the caller's call started plus ``timeout_s``: what
    ran before (the state read, encoding) is part of the caller's time. ``experiment=False``
    keeps the request outside any experiment (field ``experiment`` = ``off``).
    """
    if timeout_s <= 0:
        raise InvalidInput(f"timeout_s must be > 0, got {timeout_s}")
    if resend and request_id is None:
        raise InvalidInput("resend=True needs the request_id of the request sent before")
    inputs = features if isinstance(features, dict) else {DEFAULT_INPUT: features}
    arrays = {name: np.asarray(a) for name, a in inputs.items()}
    first = next(iter(arrays.values()))
    single = sample_ndim is None or first.ndim == sample_ndim
    if single:
        arrays = {name: a[np.newaxis] for name, a in arrays.items()}
    if request_id is None:
        request_id = new_token()
    elif reply_to is None:
        reply_to = new_token()
    if deadline_s is None:
        deadline_s = time.time() + timeout_s
    fields = messages.encode_request(request_id, arrays, deadline_ms=int(deadline_s * 1000),
                                     route=route, reply_to=reply_to, resend=resend, experiment=experiment)
    reply_key = keys.reply_key(target.model, reply_to or request_id, target.shard)
    rows = int(first.shape[0]) if not single and first.ndim else 1
    return Pending(request_id, reply_key, fields, deadline_s, target.stream, rows, single)


def check_call(timeout_s: float, max_timeout_s: float, request_id: str | None = None,
               resend: bool = False) -> float:
    """``timeout_s`` if the call is valid, checked before anything is read or sent; streams are
    trimmed to ``max_timeout_s`` (§4), so a longer timeout is refused."""
    if not 0 < timeout_s <= max_timeout_s:
        raise InvalidInput(f"timeout_s must be > 0 and at most this client's max_timeout_s "
                           f"{max_timeout_s} (older requests are trimmed from the stream), got {timeout_s}")
    if request_id is not None:
        keys.check_request_id(request_id)
    elif resend:
        raise InvalidInput("resend=True needs the request_id of the request sent before")
    return timeout_s


def prepare_many(target: Target, batch: Sequence[Features], *, route: str, timeout_s: float,
                 request_ids: Sequence[str] | None = None, resend: bool = False,
                 deadline_s: float | None = None, experiment: bool = True) -> list[Pending]:
    """Single-sample requests that share one reply list (one wait collects them all); ``request_ids``
    (one per sample) are given to re-send those of an ``Interrupted`` call with ``resend``;
    ``experiment=False`` keeps them all outside any experiment."""
    if request_ids is not None and len(request_ids) != len(batch):
        raise InvalidInput(f"{len(request_ids)} request_ids for {len(batch)} samples")
    if resend and request_ids is None:
        raise InvalidInput("resend=True needs the request_ids of the requests sent before")
    ids: Sequence[str | None] = request_ids if request_ids is not None else [None] * len(batch)
    token = new_token()
    deadline_s = time.time() + timeout_s if deadline_s is None else deadline_s
    return [prepare(target, f, route=route, timeout_s=timeout_s, sample_ndim=None, reply_to=token,
                    request_id=rid, resend=resend, deadline_s=deadline_s, experiment=experiment)
            for f, rid in zip(batch, ids, strict=True)]


def parse(payload: bytes) -> messages.Prediction | ReplyError:
    """A reply payload as a Prediction, or the error it carries (returned, not raised)."""
    try:
        return messages.decode_reply(payload, max_bytes=MAX_REPLY_BYTES)
    except ReplyError as e:
        return e


def shaped(result: messages.Prediction | ReplyError, pending: Pending) -> messages.Prediction | ReplyError:
    """A reply as the call that sent ``pending`` sees it (:func:`protocol.messages.shaped`): a
    single-sample call's outputs without the batch axis; a reply whose rows do not match the
    request's is malformed (the ``InvalidInput`` returned)."""
    if isinstance(result, ReplyError):
        return result
    try:
        return messages.shaped(result, pending.rows, single=pending.single)
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
    """Server-side block until ``deadline_s``; never 0, which would block forever."""
    return max(0.001, round(deadline_s - time.time(), 3))


def oldest_first(moved: bytes | None, listed: list[bytes]) -> list[bytes]:
    """A reply list's payloads, oldest first.

    Workers LPUSH, so LRANGE lists newest first; but the wait (BLMOVE tail → head) has
    just moved the oldest, ``moved``, to the head, and more may have been pushed since.
    """
    rest = list(listed)
    if moved is None:
        return rest[::-1]
    if moved in rest:
        rest.remove(moved)
    return [moved, *reversed(rest)]


class Gatherer:
    """Collects the replies of requests that share one reply list, matched by their ``id``."""

    def __init__(self, pendings: list[Pending], timeout_s: float) -> None:
        self.pendings = pendings
        self.timeout_s = timeout_s
        self.reply_key = pendings[0].reply_key if pendings else ""
        self.wanted = {p.request_id: p for p in pendings}
        self.results: dict[str, messages.Prediction | ReplyError] = {}
        self.deadline_s = max((p.deadline_s for p in pendings), default=0.0)

    @property
    def remaining(self) -> int:
        """Replies still missing."""
        return len(self.wanted) - len(self.results)

    def take(self, payloads: Iterable[bytes]) -> None:
        """Record replies, oldest first; the first reply per id wins, strays are dropped.

        A stray is a reply whose ``id`` is not one of ours (a late answer to an earlier
        call, or anything else someone pushed): it is never returned.
        """
        for payload in payloads:
            if not isinstance(payload, bytes):
                continue  # not a reply at all (the list holds what anyone with access pushed)
            result = parse(payload)
            request_id = result.request_id or ""
            pending = self.wanted.get(request_id)
            if pending is not None and request_id not in self.results:
                self.results[request_id] = shaped(result, pending)

    def done(self) -> bool:
        """All replies in, or out of time."""
        return self.remaining == 0 or time.time() >= self.deadline_s

    def outcome(self) -> list[messages.Prediction | ReplyError]:
        """Results in request order; missing replies become client-side DeadlineExceeded."""
        return [self.results.get(p.request_id) or timed_out(p, self.timeout_s) for p in self.pendings]


@dataclass(frozen=True, slots=True)
class Trip:
    """One round trip: commands sent together on one connection, read until ``deadline_s``.

    The first ``head`` answers (the XADDs', which Redis sends before the wait blocks) are
    handed to ``check`` before the rest is read, so a refused XADD ends the call at once.
    """

    commands: list[Command]
    deadline_s: float  # wall clock: no answer is waited for after it (DeadlineReached)
    key: str = ""  # every command's key is in this key's slot (the node a cluster client sends to)
    head: int = 0
    check: Callable[[list[Any]], None] | None = None

    def read_timeout_s(self) -> float:
        """How long the next read may wait: until the deadline, never past it."""
        return max(MIN_READ_S, self.deadline_s - time.time())


def xadd_command(stream: str, fields: Fields, minid_ms: int | None = None) -> Command:
    """``XADD stream [MINID ~ t] * field value …`` as raw arguments."""
    trim = ("MINID", "~", minid_ms) if minid_ms is not None else ()
    return ("XADD", stream, *trim, "*", *chain.from_iterable(fields.items()))


def entry_ms(entry_id: Any) -> int | None:
    """The milliseconds part of a stream entry id (the server's clock when it was added)."""
    raw = entry_id.decode(errors="replace") if isinstance(entry_id, bytes) else str(entry_id)
    ms, _, seq = raw.partition("-")
    return int(ms) if ms.isdigit() and seq.isdigit() and len(ms) < 16 else None


class ServerClock:
    """Each stream's server clock, learned from the client's own XADD answers (an entry id is the
    server's milliseconds), so that ``MINID`` is never computed on the client's clock."""

    def __init__(self) -> None:
        self._offsets_ms: dict[str, float] = {}

    def learn(self, stream: str, entry_id: Any, local_s: float) -> None:
        """Record the offset shown by an entry id read at ``local_s`` (it was made a bit before:
        the estimate errs towards an earlier server time, so trimming errs towards less)."""
        ms = entry_ms(entry_id)
        if ms is not None:
            self._offsets_ms[stream] = ms - local_s * 1000

    def minid_ms(self, stream: str, horizon_s: float) -> int | None:
        """The server's now minus ``horizon_s``; None until the stream's clock is known."""
        offset_ms = self._offsets_ms.get(stream)
        if offset_ms is None or horizon_s <= 0:
            return None
        return max(0, int(time.time() * 1000 + offset_ms - horizon_s * 1000))


class Exchange:
    """One call's conversation with Redis, without the I/O.

    First round trip: the ``XADD``\\ s, ``UNLINK`` of finished calls' reply keys, the shard's
    load (``HGETALL``, when due), then ``BLMOVE key key RIGHT LEFT t`` and ``LRANGE key 0 -1``
    (not on a one-reply call's first trip: the wait's answer is the reply).
    Moving a list onto itself removes nothing (it rotates), so the wait is non-destructive,
    and so is LRANGE: a round trip lost with its connection is simply repeated, no reply is
    ever lost in flight, and the XADDs are never sent twice. Later round trips start with
    ``LTRIM key 0 -(n+1)``, dropping the n replies already read: workers LPUSH, so
    whatever arrived since sits at the head. After a lost round trip nothing is trimmed
    (it may have run); replies read twice are told apart by their ``id``. No read waits
    past the deadline: a wait still blocked then is abandoned with its connection.
    """

    def __init__(self, pendings: list[Pending], timeout_s: float, finished: Sequence[str] = (),
                 extra: Sequence[Command] = (), *, clock: ServerClock | None = None,
                 horizon_s: float = 0.0) -> None:
        self.stream = pendings[0].stream if pendings else ""
        self.extra = list(extra)  # read-only commands riding on the first trip (a shard's load)
        self.extra_answers: list[Any] = []
        self.gatherer = Gatherer(pendings, timeout_s)
        self.reply_key = self.gatherer.reply_key
        self.finished = list(finished)
        self.clock, self.horizon_s = clock, horizon_s  # streams trimmed to the longest deadline
        self.queued = False  # the XADDs were sent (they may have been executed)
        self.entry_ids: list[str] = []  # the XADDs' answers, once read
        self.read = 0  # replies the last LRANGE returned, to trim on the next round trip
        self._listed = True  # the last trip listed the reply list (LRANGE) after its wait
        self.failures = 0  # consecutive lost round trips
        self.error: Exception | None = None  # why the last round trip was lost, until one succeeds
        self.expired = False  # a read reached the deadline
        self._head = 0

    def trip(self) -> Trip:
        """The next round trip."""
        key = self.reply_key
        check: Callable[[list[Any]], None] | None = None
        if not self.queued:
            minid = self.clock.minid_ms(self.stream, self.horizon_s) if self.clock else None
            # The extra reads go before the wait: their answers come even if the wait is cut short.
            # The UNLINKs go after the XADDs: Redis answers a large XADD only once it has read all of
            # it, and a small command before it would be answered alone first (one more wake-up).
            head = [*(xadd_command(self.stream, p.fields, minid) for p in self.gatherer.pendings),
                    *(("UNLINK", k) for k in self.finished), *self.extra]
            check = self.sent
        else:
            head = [("LTRIM", key, 0, -self.read - 1)] if self.read else []
        self._head = len(head)
        wait = ("BLMOVE", key, key, "RIGHT", "LEFT", block_s(self.gatherer.deadline_s))
        # One reply expected, on the first trip: the wait's answer is that reply; listing the list
        # too would only cost a command. A trip after that lists it (duplicates, strays, the rest).
        self._listed = self.queued or self.gatherer.remaining != 1
        tail = [("LRANGE", key, 0, -1)] if self._listed else []
        return Trip([*head, wait, *tail], self.gatherer.deadline_s, key, len(head), check)

    def sent(self, answers: list[Any]) -> None:
        """The first trip's answers before the wait: one per XADD (entry id or error), then the UNLINKs'
        and the extra reads'.

        A refused XADD raises at once (the caller closes the connection the wait blocks on);
        a "not now" refusal of every XADD raises ``NotQueued``: nothing was queued.
        """
        xadds = answers[:len(answers) - len(self.finished) - len(self.extra)]
        self.extra_answers = answers[len(answers) - len(self.extra):]
        refused = [a for a in xadds if isinstance(a, Exception)]
        if refused and len(refused) == len(xadds) and _busy(refused[0]):
            raise NotQueued(f"Redis answered XADD with {_message(refused[0])}")
        for answer in refused:
            _raise_for(answer, "XADD", queued=False)
        self.queued = True
        self.entry_ids = [a.decode() if isinstance(a, bytes) else str(a) for a in xadds]
        if self.clock is not None and xadds:
            self.clock.learn(self.stream, xadds[-1], time.time())

    def receive(self, answers: list[Any]) -> None:
        """The answers to :meth:`trip`'s commands, in order (errors as exception values)."""
        if not self.queued:  # a transport that did not call ``check``
            self.sent(answers[:self._head])
        moved = answers[self._head]
        _raise_for(moved, "BLMOVE", queued=True)
        if not self._listed:  # the wait's answer alone; nothing is trimmed on a later trip
            self.gatherer.take([] if moved is None else [moved])
            self.read, self.failures, self.error = 0, 0, None
            return
        listed = answers[self._head + 1]
        _raise_for(listed, "LRANGE", queued=True)
        if not isinstance(listed, list):
            raise redis.ConnectionError(f"LRANGE answered {type(listed).__name__}, not a list")
        self.gatherer.take(oldest_first(moved, listed))
        self.read, self.failures, self.error = len(listed), 0, None

    def lost(self, error: Exception) -> float:
        """A round trip failed with ``error`` (one of :data:`RETRYABLE`); seconds to wait before
        the next. Raises ``Unavailable`` when nothing was sent, or when out of time."""
        if isinstance(error, NotConnected) and not self.queued:
            raise Unavailable(f"Redis cannot be reached: {error}") from error
        self.queued, self.read = True, 0
        if isinstance(error, DeadlineReached):
            self.expired, self.error = True, None  # Redis was there: a plain timeout
            return 0.0
        self.error = error
        return self._backoff(error)

    def refused_for_now(self, error: Exception) -> float:
        """Nothing was queued, for now: the XADD was answered "not now", or (on a cluster, where
        a failover may be under way) its node could not be reached. Seconds to wait before
        sending it again; ``Interrupted`` (safe to re-send) once out of time."""
        self.error = error
        return self._backoff(error)

    def redirected(self, error: Redirected) -> float:
        """A trip bounced off a node that no longer serves the slot: nothing of it ran, so the
        same trip is repeated (after the slot map is refreshed); seconds to wait before it."""
        self.error = error
        return self._backoff(error)

    def _backoff(self, error: Exception) -> float:
        self.failures += 1
        left_s = self.gatherer.deadline_s - time.time()
        if left_s <= 0:
            raise self.unavailable() from error
        return min(left_s, BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** (self.failures - 1))

    def unavailable(self) -> Unavailable:
        """The error for connection trouble that outlasted the deadline."""
        if isinstance(self.error, NotConnected) and not self.queued:
            ids = [p.request_id for p in self.gatherer.pendings]
            return Interrupted(
                f"Redis cannot be reached until the deadline ({self.gatherer.timeout_s:.3f} s; nothing "
                f"was sent, the request may be re-sent with the same id): {self.error}", request_ids=ids)
        if isinstance(self.error, NotQueued):
            return Unavailable(f"Redis refused the request until the deadline "
                               f"({self.gatherer.timeout_s:.3f} s): {self.error}")
        return Unavailable(f"lost the connection to Redis and could not read the reply within "
                           f"{self.gatherer.timeout_s:.3f} s: {self.error}")

    def verify_trip(self) -> Trip:
        """After the slot's master changed under a lost trip: are the request's entries (by the ids
        the XADDs answered) or its replies on the new master?"""
        commands: list[Command] = [("XRANGE", self.stream, i, i) for i in self.entry_ids]
        commands.append(("LRANGE", self.reply_key, 0, -1))
        return Trip(commands, min(self.gatherer.deadline_s, time.time() + VERIFY_MAX_S), self.reply_key)

    def verified(self, answers: list[Any]) -> None:
        """The answers to :meth:`verify_trip`: raise ``Interrupted`` when a request not yet answered
        has neither its entry nor its reply there (lost with the old master, or never queued);
        otherwise the wait goes on on the new master. An unreadable answer proves nothing: the
        wait goes on (and is looked at again after the next loss). An entry the server refuses to
        show (the documented bot role may not read request streams: NOPERM) counts as not seen, so
        the call ends on the reply alone instead of waiting out its timeout."""
        *ranges, listed = answers
        unreadable = [a for a in answers if isinstance(a, Exception) and not isinstance(a, ERROR_ANSWERS)]
        if unreadable or not isinstance(listed, list):
            return
        self.gatherer.take(oldest_first(None, listed))
        queued = {p.request_id for p, rows in zip(self.gatherer.pendings, ranges, strict=False)
                  if isinstance(rows, list) and rows}
        lost = [p.request_id for p in self.gatherer.pendings
                if p.request_id not in self.gatherer.results and p.request_id not in queued]
        if lost:
            raise Interrupted(
                f"{len(lost)} request(s) lost in a Redis failover (the slot's new master holds neither "
                f"the entry nor a reply); each may be re-sent with the same id: "
                f"predict(..., request_id={lost[0]!r}, resend=True)", request_ids=lost)

    def done(self) -> bool:
        """Sent, and every reply in or out of time."""
        return self.queued and (self.expired or self.gatherer.done())

    def outcome(self) -> list[messages.Prediction | ReplyError]:
        """Results in request order; raises ``Unavailable`` if the connection was lost at the end."""
        if self.error is not None and self.gatherer.remaining:
            raise self.unavailable() from self.error
        return self.gatherer.outcome()


def _message(answer: Exception) -> str:
    """An error answer as Redis wrote it (redis-py strips the code of those it maps to a class)."""
    message = str(answer)
    for cls, code in _STRIPPED_CODES:
        if isinstance(answer, cls) and not message.startswith(code):
            return f"{code} {message}"
    return message


_STRIPPED_CODES = (
    (redis.exceptions.BusyLoadingError, "LOADING"), (redis.exceptions.ReadOnlyError, "READONLY"),
    (redis.exceptions.TryAgainError, "TRYAGAIN"), (redis.exceptions.MasterDownError, "MASTERDOWN"),
    (redis.exceptions.NoPermissionError, "NOPERM"), (redis.exceptions.ClusterDownError, "CLUSTERDOWN"))


def _busy(answer: Exception) -> bool:
    """True for an answer that means "not now" (the command was not run)."""
    return isinstance(answer, BUSY_ERRORS) or str(answer).startswith(BUSY_PREFIXES)


def _raise_for(answer: Any, command: str, *, queued: bool) -> None:
    """Turn an error answer into the client's error: OOM → ``Overloaded`` at once; a busy
    server → retried (as a lost connection) once the request may be queued; else ``Unavailable``."""
    if not isinstance(answer, ERROR_ANSWERS):
        return
    message = _message(answer)
    # A cluster slot moved (resharding, failover); MovedError subclasses AskError.
    if isinstance(answer, redis.exceptions.AskError) or message.startswith(("MOVED", "ASK")):
        raise Redirected(f"{command}: {message}")
    if isinstance(answer, redis.exceptions.OutOfMemoryError) or message.startswith("OOM"):
        raise Overloaded(f"Redis is out of memory (maxmemory) and refused {command}: {message}") from answer
    if queued and _busy(answer):
        raise redis.ConnectionError(f"Redis answered {command} with {message}") from answer
    raise Unavailable(f"Redis refused {command}: {message}") from answer


class Finished:
    """Reply keys of finished calls, deleted by the next call's first round trip (no extra one).

    Every key is a random token used once, so deleting it late can never hit a newer reply.
    Keys left here when the client goes away expire with the reply TTL.
    """

    def __init__(self) -> None:
        self._keys: list[str] = []
        self._lock = threading.Lock()

    def add(self, key: str) -> None:
        """Queue ``key`` for deletion."""
        with self._lock:
            if key and len(self._keys) < MAX_FINISHED_KEYS:
                self._keys.append(key)

    def take(self, slot: int | None = None) -> list[str]:
        """The queued keys (only those of cluster hash ``slot`` when given), removed from the queue."""
        with self._lock:
            if slot is None:
                taken, self._keys = self._keys, []
            else:
                taken = [k for k in self._keys if key_slot(k.encode()) == slot]
                self._keys = [k for k in self._keys if key_slot(k.encode()) != slot]
        return taken


@dataclass(slots=True)
class ModelState:
    """What a client last read about a model: its shard layout, whether the registry knows it and
    whether a worker is live (``None``: not known). Times are ``time.monotonic()``."""

    route: int = 1
    read_at: float = float("-inf")  # last read attempt, successful or not
    answered_at: float = float("-inf")  # last read that answered
    known: bool | None = None
    live: bool | None = None
    unread_since: float | None = None  # the first failed read since the last that answered
    grace_until: float = float("-inf")  # "no live worker" is not believed before this


def _as_hash(raw: Any) -> dict[Any, Any] | None:
    """A hash as read on a raw connection: a map (RESP3) or a flat field/value list (RESP2)."""
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, list) and len(raw) % 2 == 0:
        return dict(zip(raw[::2], raw[1::2], strict=True))
    return None


def node_name(client: Any, key: str) -> str:
    """The cluster node serving ``key``'s slot now, as ``host:port`` ("" while none does)."""
    try:
        return str(client.get_node_from_key(key).name)
    except redis.RedisError:
        return ""


def unlink_trips(reply_keys: Sequence[str], deadline_s: float) -> list[Trip]:
    """``UNLINK`` of finished reply keys, one trip per cluster slot, read until ``deadline_s``."""
    by_slot: dict[int, list[str]] = {}
    for key in reply_keys:
        by_slot.setdefault(key_slot(key.encode()), []).append(key)
    return [Trip([("UNLINK", key) for key in group], deadline_s, group[0]) for group in by_slot.values()]


class Router:
    """Which shard a call goes to, whether anyone serves the model, and whether its shard is too
    loaded to meet the deadline.

    I/O-free: the clients feed it the model's state (re-read every ``sharding.LAYOUT_REFRESH_S``
    in one round trip, :meth:`state_trip`) and each shard's load (re-read every
    ``LOAD_REFRESH_S`` by a command riding on a call's first round trip, so it costs no round trip).
    """

    def __init__(self) -> None:
        self._picker = sharding.ShardPicker()
        self._models: dict[str, ModelState] = {}
        self._loads: dict[tuple[str, int], tuple[sharding.ShardLoad | None, float]] = {}
        self._lock = threading.Lock()

    def _state(self, model: str) -> ModelState:
        with self._lock:
            return self._models.setdefault(model, ModelState())

    def layout_stale(self, model: str) -> bool:
        """True when the model's state should be re-read before routing."""
        return time.monotonic() - self._state(model).read_at >= sharding.LAYOUT_REFRESH_S

    def state_trip(self, model: str, deadline_s: float) -> Trip:
        """One round trip in the model's ``{model}`` slot: layout, registry entry, a live worker."""
        zset, min_ms, max_ms = presence.members_query(model)
        return Trip([("HGETALL", keys.shards_hash(model)), ("EXISTS", keys.model_hash(model)),
                     ("ZRANGEBYSCORE", zset, min_ms, max_ms, "LIMIT", 0, 1)],
                    deadline_s, keys.shards_hash(model))

    def set_state(self, model: str, answers: list[Any] | None) -> None:
        """Record :meth:`state_trip`'s answers (None: unread). What could not be read (an error
        answer, e.g. a role without the command) keeps its last value."""
        state = self._state(model)
        state.read_at = time.monotonic()
        if answers is None or len(answers) != 3:
            if state.unread_since is None:
                state.unread_since = state.read_at
            return
        if state.unread_since is not None:  # readable again: the workers' heartbeats lapsed with it
            state.grace_until, state.unread_since = state.read_at + OUTAGE_GRACE_S, None
        layout, known, live = answers
        self.set_layout(model, _as_hash(layout))
        if isinstance(known, int):
            state.known = bool(known)
        if isinstance(live, list):
            state.live = bool(live)
        if isinstance(known, int) or isinstance(live, list):
            state.answered_at = state.read_at

    def set_layout(self, model: str, raw: Any) -> None:
        """Record the layout hash just read (None: it could not be read); a malformed or
        unread one keeps the last good layout until the next refresh."""
        state = self._state(model)
        if raw is not None:
            with contextlib.suppress(InvalidInput, AttributeError, UnicodeDecodeError):
                state.route = sharding.ShardLayout.from_hash(raw).route
        state.read_at = time.monotonic()

    def refusal(self, model: str) -> StreamserveError | None:
        """Why a call to ``model`` must not be sent (nobody would serve it), or None."""
        state = self._state(model)
        if state.known is False:
            return ModelNotFound(f"model {model!r} is not in the registry")
        if state.live is False and time.monotonic() >= state.grace_until:
            return Unavailable(f"no live worker for {model}")
        return None

    def answer_age_s(self, model: str) -> float:
        """Seconds since the model's state was last read successfully."""
        return time.monotonic() - self._state(model).answered_at

    def target(self, model: str, route: str, lane: str) -> Target:
        """The shard and lane for a call with routing key ``route``."""
        shards = self._state(model).route
        return Target(model, self._picker.pick(route, shards), keys.check_lane(lane))

    def load_command(self, target: Target) -> Command | None:
        """``HGETALL`` of the target shard's load when the cached one is stale, else None."""
        _, read_at = self._loads.get((target.model, target.shard), (None, float("-inf")))
        if time.monotonic() - read_at < LOAD_REFRESH_S:
            return None
        return ("HGETALL", keys.load_hash(target.model, target.shard))

    def set_load(self, target: Target, answers: list[Any]) -> None:
        """Record the answer to :meth:`load_command`: a map, or a flat field/value list (parsers differ)."""
        if not answers or not isinstance(answers[0], dict | list):
            return
        raw = answers[0]
        fields = raw if isinstance(raw, dict) else dict(zip(raw[::2], raw[1::2], strict=False))
        load = sharding.ShardLoad.from_hash(fields)
        with self._lock:
            self._loads[(target.model, target.shard)] = (load, time.monotonic())

    def check(self, target: Target, timeout_s: float) -> None:
        """Raise ``Overloaded`` when the shard's backlog ahead of this lane outlasts ``timeout_s``."""
        load, read_at = self._loads.get((target.model, target.shard), (None, 0.0))
        # Dated more than LOAD_MAX_AGE_S either way by this client's clock: stale, or from a host whose
        # clock is off; neither is a basis for refusing work.
        if load is None or abs(time.time() * 1000 - load.at_ms) > LOAD_MAX_AGE_S * 1000:
            return
        # A shed call reads nothing: on a figure read LOAD_REFRESH_S ago or more the call goes out
        # (and re-reads it), or one bad reading would shed everything for LOAD_MAX_AGE_S.
        if time.monotonic() - read_at >= LOAD_REFRESH_S:
            return
        wait_ms = load.expected_wait_ms(target.lane)
        if wait_ms > timeout_s * 1000:
            raise Overloaded(f"shard {target.shard} of {target.model}: {load.ahead(target.lane)} entries "
                             f"ahead of lane {target.lane} drain in ~{wait_ms:.0f} ms at "
                             f"{load.drain_per_s:.0f}/s, beyond the {timeout_s * 1000:.0f} ms timeout: "
                             "not sent")
