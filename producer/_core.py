"""I/O-free parts of the clients: building entries, the conversation with Redis, reading replies.

The sync and asyncio clients share everything here and differ only in how they run
one round trip (:class:`Trip`) and how they wait between retries.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np
import redis
from redis.crc import key_slot

from protocol import keys, messages, sharding
from protocol.errors import DeadlineExceeded, InvalidInput, Overloaded, ReplyError, Unavailable

if TYPE_CHECKING:
    from protocol.values import Fields

Features = np.ndarray | dict[str, np.ndarray]
Command = tuple[object, ...]  # one Redis command's arguments, e.g. ("LRANGE", key, 0, -1)
DEFAULT_INPUT = "features"
MAX_REPLY_BYTES = 64 << 20
OUTCOMES_MAXLEN = 1_000_000  # a safety cap on the outcomes stream, far above an experiment's needs
# The socket may wait this much longer than the server-side block: a slow network or a busy
# server is not a dead connection, and a read timeout only costs a (safe) retry anyway.
READ_MARGIN_S = 1.0
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.01, 0.25  # between retries after a lost connection
MAX_FINISHED_KEYS = 1024  # reply keys waiting for deletion; beyond this they simply expire
# Server replies that say "not now" rather than "never": retried like a lost connection.
BUSY_PREFIXES = ("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "READONLY")
# redis-py parses these replies into classes and strips the prefix from the message.
BUSY_ERRORS = (redis.exceptions.ReadOnlyError, redis.exceptions.TryAgainError,
               redis.exceptions.MasterDownError)
# Connection trouble: retried within the deadline, without re-sending the request.
RETRYABLE = (redis.ConnectionError, redis.TimeoutError)

LOAD_REFRESH_S = 0.2  # how stale a shard's load may get before the next trip re-reads it (§13)
LOAD_MAX_AGE_S = 3.0  # an older load says nothing about now: nothing is shed on it


class NotConnected(redis.ConnectionError):
    """No connection could be opened: nothing of the round trip reached Redis."""


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


def new_token() -> str:
    """A fresh request id or reply token: 32 random hex digits."""
    return uuid.uuid4().hex


def prepare(target: Target, features: Features, *, route: str, timeout_s: float,
            sample_ndim: int | None, request_id: str | None = None,
            reply_to: str | None = None) -> Pending:
    """Entry fields for one request; a bare array without a batch axis gets one (N = 1).

    ``sample_ndim`` is the rank of one sample; ``None`` means "treat the array as a
    single sample" (the usual bot call with a (60, 110) window). A caller-supplied
    ``request_id`` is checked and gets a random reply token of its own, so its reply
    key is never one an earlier call (or another bot) used.
    """
    if timeout_s <= 0:
        raise InvalidInput(f"timeout_s must be > 0, got {timeout_s}")
    inputs = features if isinstance(features, dict) else {DEFAULT_INPUT: features}
    arrays = {name: np.asarray(a) for name, a in inputs.items()}
    first = next(iter(arrays.values()))
    if sample_ndim is None or first.ndim == sample_ndim:
        arrays = {name: a[np.newaxis] for name, a in arrays.items()}
    if request_id is None:
        request_id = new_token()
    elif reply_to is None:
        reply_to = new_token()
    deadline_s = time.time() + timeout_s
    fields = messages.encode_request(request_id, arrays, deadline_ms=int(deadline_s * 1000),
                                     route=route, reply_to=reply_to)
    reply_key = keys.reply_key(target.model, reply_to or request_id, target.shard)
    return Pending(request_id, reply_key, fields, deadline_s, target.stream)


def prepare_many(target: Target, batch: Sequence[Features], *, route: str,
                 timeout_s: float) -> list[Pending]:
    """Single-sample requests that share one reply list (one wait collects them all)."""
    token = new_token()
    return [prepare(target, f, route=route, timeout_s=timeout_s, sample_ndim=None, reply_to=token)
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
        self.wanted = {p.request_id for p in pendings}
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
            result = parse(payload)
            if result.request_id in self.wanted:
                self.results.setdefault(result.request_id, result)

    def done(self) -> bool:
        """All replies in, or out of time."""
        return self.remaining == 0 or time.time() >= self.deadline_s

    def outcome(self) -> list[messages.Prediction | ReplyError]:
        """Results in request order; missing replies become client-side DeadlineExceeded."""
        return [self.results.get(p.request_id) or timed_out(p, self.timeout_s) for p in self.pendings]


@dataclass(frozen=True, slots=True)
class Trip:
    """One round trip: commands sent together on one connection, and how long a read may wait."""

    commands: list[Command]
    read_timeout_s: float
    key: str = ""  # every command's key is in this key's slot (the node a cluster client sends to)


def xadd_command(stream: str, fields: Fields) -> Command:
    """``XADD stream * field value …`` as raw arguments."""
    return ("XADD", stream, "*", *chain.from_iterable(fields.items()))


class Exchange:
    """One call's conversation with Redis, without the I/O.

    First round trip: ``UNLINK`` of finished calls' reply keys, the ``XADD``\\ s, then
    ``BLMOVE key key RIGHT LEFT t`` and ``LRANGE key 0 -1``. Moving a list onto itself
    removes nothing (it rotates), so the wait is non-destructive, and so is LRANGE: a
    round trip lost with its connection is simply repeated, no reply is ever lost in
    flight, and the XADDs are never sent twice. Later round trips start with
    ``LTRIM key 0 -(n+1)``, dropping the n replies already read: workers LPUSH, so
    whatever arrived since sits at the head. After a lost round trip nothing is trimmed
    (it may have run); replies read twice are told apart by their ``id``.
    """

    def __init__(self, pendings: list[Pending], timeout_s: float,
                 finished: Sequence[str] = (), extra: Sequence[Command] = ()) -> None:
        self.stream = pendings[0].stream if pendings else ""
        self.extra = list(extra)  # read-only commands riding on the first trip (a shard's load)
        self.extra_answers: list[Any] = []
        self.gatherer = Gatherer(pendings, timeout_s)
        self.reply_key = self.gatherer.reply_key
        self.finished = list(finished)
        self.queued = False  # the XADDs were sent (they may have been executed)
        self.read = 0  # replies the last LRANGE returned, to trim on the next round trip
        self.failures = 0  # consecutive lost round trips
        self.error: Exception | None = None  # why the last round trip was lost, until one succeeds
        self._head = 0

    def trip(self) -> Trip:
        """The next round trip."""
        key = self.reply_key
        if not self.queued:
            head = [*(("UNLINK", k) for k in self.finished),
                    *(xadd_command(self.stream, p.fields) for p in self.gatherer.pendings)]
        else:
            head = [("LTRIM", key, 0, -self.read - 1)] if self.read else []
        self._head = len(head)
        wait_s = block_s(self.gatherer.deadline_s)
        tail = self.extra if not self.queued else []
        return Trip([*head, ("BLMOVE", key, key, "RIGHT", "LEFT", wait_s), ("LRANGE", key, 0, -1),
                     *tail], wait_s + READ_MARGIN_S, key)

    def receive(self, answers: list[Any]) -> None:
        """The answers to :meth:`trip`'s commands, in order (errors as exception values)."""
        if not self.queued:
            for answer in answers[len(self.finished):self._head]:
                _raise_for(answer, "XADD", queued=False)
            self.queued = True
            self.extra_answers = answers[self._head + 2:]
        moved, listed = answers[self._head:self._head + 2]
        _raise_for(moved, "BLMOVE", queued=True)
        _raise_for(listed, "LRANGE", queued=True)
        self.gatherer.take(oldest_first(moved, listed))
        self.read, self.failures, self.error = len(listed), 0, None

    def lost(self, error: Exception) -> float:
        """A round trip failed with ``error`` (one of :data:`RETRYABLE`); seconds to wait before
        the next. Raises ``Unavailable`` when nothing was sent, or when out of time."""
        if isinstance(error, NotConnected) and not self.queued:
            raise Unavailable(f"Redis cannot be reached: {error}") from error
        self.queued, self.read, self.error = True, 0, error
        self.failures += 1
        left_s = self.gatherer.deadline_s - time.time()
        if left_s <= 0:
            raise self.unavailable() from error
        return min(left_s, BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** (self.failures - 1))

    def redirected(self, error: Redirected) -> float:
        """A trip bounced off a node that no longer serves the slot: nothing of it ran, so the
        same trip is repeated (after the slot map is refreshed); seconds to wait before it."""
        self.failures += 1
        self.error = error
        left_s = self.gatherer.deadline_s - time.time()
        if left_s <= 0:
            raise self.unavailable() from error
        return min(left_s, BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** (self.failures - 1))

    def unavailable(self) -> Unavailable:
        """The error for connection trouble that outlasted the deadline."""
        return Unavailable(f"lost the connection to Redis and could not read the reply within "
                           f"{self.gatherer.timeout_s:.3f} s: {self.error}")

    def done(self) -> bool:
        """Sent, and every reply in or out of time."""
        return self.queued and self.gatherer.done()

    def outcome(self) -> list[messages.Prediction | ReplyError]:
        """Results in request order; raises ``Unavailable`` if the connection was lost at the end."""
        if self.error is not None and self.gatherer.remaining:
            raise self.unavailable() from self.error
        return self.gatherer.outcome()


def _raise_for(answer: Any, command: str, *, queued: bool) -> None:
    """Turn an error answer into the client's error: OOM → ``Overloaded`` at once; a busy
    server → retried (as a lost connection) once the request may be queued; else ``Unavailable``."""
    if not isinstance(answer, redis.ResponseError):
        return
    message = str(answer)
    # A cluster slot moved (resharding, failover); MovedError subclasses AskError.
    if isinstance(answer, redis.exceptions.AskError) or message.startswith(("MOVED", "ASK")):
        raise Redirected(f"{command}: {message}")
    if isinstance(answer, redis.exceptions.OutOfMemoryError) or message.startswith("OOM"):
        raise Overloaded(f"Redis is out of memory (maxmemory) and refused {command}: {message}") from answer
    if queued and (isinstance(answer, BUSY_ERRORS) or message.startswith(BUSY_PREFIXES)):
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


class Router:
    """Which shard a call goes to, and whether its shard is too loaded to meet the deadline.

    I/O-free: the clients feed it the layout (refreshed every ``sharding.LAYOUT_REFRESH_S``
    with one HGETALL) and each shard's load (re-read every ``LOAD_REFRESH_S`` by a
    command riding on a call's first round trip, so it costs no round trip).
    """

    def __init__(self) -> None:
        self._picker = sharding.ShardPicker()
        self._routes: dict[str, tuple[int, float]] = {}  # model → (shards to route to, read at)
        self._loads: dict[tuple[str, int], tuple[sharding.ShardLoad | None, float]] = {}
        self._lock = threading.Lock()

    def layout_stale(self, model: str) -> bool:
        """True when the model's layout should be re-read before routing."""
        _, read_at = self._routes.get(model, (1, float("-inf")))
        return time.monotonic() - read_at >= sharding.LAYOUT_REFRESH_S

    def set_layout(self, model: str, raw: Any) -> None:
        """Record the layout hash just read (None: it could not be read); a malformed or
        unread one keeps the last good layout until the next refresh."""
        route = self._routes.get(model, (1, 0.0))[0]
        if raw is not None:
            with contextlib.suppress(InvalidInput):
                route = sharding.ShardLayout.from_hash(raw).route
        with self._lock:
            self._routes[model] = (route, time.monotonic())

    def target(self, model: str, route: str, lane: str) -> Target:
        """The shard and lane for a call with routing key ``route``."""
        shards = self._routes.get(model, (1, 0.0))[0]
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
        if load is None or time.time() * 1000 - load.at_ms > LOAD_MAX_AGE_S * 1000:
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
