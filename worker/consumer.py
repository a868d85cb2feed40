"""Reading one shard of a model's streams through its consumer group, and writing back in one transaction.

A shard has one stream per priority lane (``keys.LANES``: ``live``, then
``backfill``), all in the shard's hash slot. Reads drain the higher lane first.
An entry is acknowledged, and deleted from its stream, only in the MULTI/EXEC
that carries its reply (or its dead letter): the streams hold only unread and
pending entries, and an entry never answered stays pending for another worker.
Entries pending on a consumer whose worker's heartbeat has expired are taken
over at once (``take_over``); ``reclaim`` (idle time) is the backstop, and
``recover`` answers what a read delivered to this consumer without its answer
ever arriving. A pending entry may be gone from its stream (a bot trims with
``XADD … MINID``): every path that claims pending entries acks such ids and counts
them as discarded.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import redis

from protocol import keys
from protocol.settings import Settings
from protocol.values import text
from worker.arms import ExperimentLog
from worker.transaction import Link, RawTransaction, exec_answers, xreadgroup_command

if TYPE_CHECKING:
    from redis.typing import StreamIdT

    from protocol.values import Fields, StreamRows

log = logging.getLogger(__name__)
TOUCH_MAX = 10_000  # pending entries one touch renews: far more than a consumer reads ahead
LIVE_RECENT_S = 1.0  # live entries read this recently cap the backfill in a batch (backfill_max_batch)


class Entry(NamedTuple):
    """One stream entry as read: its id, raw fields, and the lane (stream) of its shard it came from."""

    id: str
    fields: dict[bytes, bytes]
    lane: str = "live"


class LaneCounts(NamedTuple):
    """One lane of a shard as read: backlog (undelivered), pending, answered and added since it began."""

    backlog: int
    pending: int
    answered: int
    added: int


def _field_map(fields: Any) -> dict[bytes, bytes]:
    """An entry's fields as a dict, from a dict or a flat ``[field, value, …]`` list."""
    if isinstance(fields, dict):
        return fields
    return dict(zip(fields[::2], fields[1::2], strict=True))


def _counter(raw: object) -> int:
    """An untrusted counter's value (0 when absent, malformed or negative)."""
    try:
        return max(0, int(raw))  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0


# Gets the fresh entries and those delivered too often (to dead-letter).
ClaimHandler = Callable[[list[Entry], list[Entry]], None]


class Outbox:
    """What one batch writes back: replies, entries to ack (per lane), entries to dead-letter."""

    # Slots and a plain __init__: one is made per batch, on the path from the read to the replies.
    __slots__ = ("replies", "acks", "dead", "calls", "experiment", "codes", "waits", "computed",
                 "markers", "replayed")

    def __init__(self) -> None:
        self.replies: dict[str, list[bytes]] = {}  # reply token → payloads
        self.acks: dict[str, list[str]] = {}  # lane → entry ids
        self.dead: list[tuple[Entry, str]] = []
        self.calls: list[tuple[str, int, float]] = []  # (version, rows, seconds) per model call
        self.experiment = ExperimentLog()
        # (version, variant, code) of every reply, for the metrics; version "" when none served it
        self.codes: list[tuple[str, str, str]] = []
        self.waits: list[tuple[str, float]] = []  # (lane, seconds queued) per entry read
        self.computed = 0  # entries that went into a model call; the rest of the acks were discarded
        # (request id, reply payload) of every computed reply: its marker (keys.done_key), for re-sends
        self.markers: list[tuple[str, bytes]] = []
        self.replayed = 0  # re-sent entries answered from their marker, without a model call

    @property
    def discarded(self) -> int:
        """Entries answered without a model call (expired, shed, invalid, dead-lettered, replayed)."""
        return max(0, len(self.ack_ids) - self.computed)

    def reply(self, reply_to: str, payload: bytes) -> None:
        """Queue a reply; replies sharing a token go out in one LPUSH."""
        self.replies.setdefault(reply_to, []).append(payload)

    def ack(self, entry: Entry) -> None:
        """Acknowledge ``entry`` (and delete it from its stream) with the replies."""
        self.acks.setdefault(entry.lane, []).append(entry.id)

    @property
    def ack_ids(self) -> list[str]:
        """Every entry id acknowledged, all lanes."""
        return [i for ids in self.acks.values() for i in ids]


class StreamConsumer:
    """One consumer (``name``) of the group on one shard's streams: read, reclaim, write back."""

    def __init__(self, client: redis.Redis, model: str, name: str, settings: Settings,
                 shard: int = 0) -> None:
        self.redis, self.model, self.name, self.settings = client, model, name, settings
        self.shard = keys.check_shard(shard)
        self.streams = {lane: keys.request_stream(model, shard, lane) for lane in keys.LANES}
        self.lane_of = {stream: lane for lane, stream in self.streams.items()}
        self.stream = self.streams["live"]
        self.group = keys.consumer_group(model)
        self.has_xackdel = False  # Redis ≥ 8.2 acks and deletes in one command
        self.has_markers = True  # off when the worker's ACL may not write keys.done_key (detect_server)
        # Lower-lane entries a read delivered beyond the batch: served before newer lower-lane ones.
        self.held: list[Entry] = []
        # What the read riding on the last write returned (None: nothing rode on it).
        self.prefetched: list[Entry] | None = None
        self._live_seen_s = float("-inf")  # when a read last brought live entries
        self.spin_until = 0.0  # low-latency mode: poll, not sleep, while waiting until then (monotonic)
        # Rows per model call → calls, counted here and added to the shard's histogram by
        # flush_stats (with the heartbeat): one write a second instead of one per batch.
        self.batch_sizes: Counter[int] = Counter()
        # overlap_io: reads ahead and reply transactions go out on this connection and are answered
        # later; the writes whose answers came back, and those that failed (to write again).
        self.link = Link(client) if settings.overlap_io and isinstance(client, redis.Redis) else None
        self.confirmed: list[Outbox] = []
        self.unconfirmed: list[Outbox] = []
        self.link_error: redis.RedisError | None = None
        # Reply transactions that failed, kept to be written again (a worker reading several shards
        # serves the others meanwhile): their entries stay pending on this consumer, answered by them.
        self.unwritten: list[Outbox] = []

    def detect_server(self) -> None:
        """Use XACKDEL where the server has it (one command instead of XACK + XDEL)."""
        try:  # for an id that cannot exist this is a no-op where the command exists
            self.redis.execute_command("XACKDEL", self.stream, self.group, "IDS", 1, "0-1")
            self.has_xackdel = True
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except redis.RedisError:  # unknown command (Redis < 8.2, Valkey; a cluster client says so itself)
            self.has_xackdel = False
        self.has_markers = self._may_write_markers()

    def _may_write_markers(self) -> bool:
        """False where the ACL refuses the markers' SET: a reply transaction holding one would be
        refused whole (NOPERM aborts it when queued), so such a worker serves without them."""
        try:
            self.redis.set(keys.done_probe_key(self.model, self.shard), b"", px=1)
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except redis.ResponseError as e:
            if not isinstance(e, redis.exceptions.NoPermissionError) and "NOPERM" not in str(e):
                return True  # OOM, READONLY: a passing state, not a refusal of the key
            log.warning("the ACL refuses SET on %s: re-sent requests are computed again (%s)",
                        keys.done_probe_key(self.model, self.shard), e)
            return False
        return True

    def markers(self, request_ids: list[str]) -> list[object]:
        """The stored replies (``keys.done_key``) of ``request_ids``, None where there is none: one MGET
        (the keys share the shard's slot). Untrusted: the caller checks what it gets."""
        return list(self.redis.mget([keys.done_key(self.model, i, self.shard) for i in request_ids]))

    def ensure_group(self) -> None:
        """Create the group (and the streams) of every lane from id 0 unless it exists."""
        for stream in self.streams.values():
            try:
                self.redis.xgroup_create(stream, self.group, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def read(self, count: int, wait_ms: float) -> list[Entry]:
        """Up to ``count`` entries, live first, blocking up to ``wait_ms`` (not below 1 ms) for any.

        One ``XREADGROUP`` on both lanes (none when the last write already brought the
        next entries, ``prefetch``): it returns up to ``count`` of each, so the lower-lane
        surplus is **held** (pending on this consumer) and goes into the next batches after
        any newer live entries. While live requests are arriving, a batch takes at most
        ``backfill_max_batch`` lower-lane entries: a live request then waits behind a short
        backfill batch, not a full one.
        """
        fresh, self.prefetched = self.prefetched, None
        if not fresh and self.link is not None and self.link.unanswered:
            self.settle()  # a read ahead may be answered; and the last write lands before we wait
            fresh, self.prefetched = self.prefetched, None
        if not fresh:  # nothing rode on the last write, or it found nothing: read (and wait) now
            block = int(wait_ms) if wait_ms >= 1 and not self.held else None
            fresh = self._xread(self._read_streams(count), count, block)
        return self._assemble(fresh, count)

    def _read_streams(self, count: int) -> dict[str, str]:
        """Streams for the next read: the lower lane only while fewer than ``count`` are held (a bound)."""
        lanes = keys.LANES if len(self.held) < count else keys.LANES[:1]
        return {self.streams[lane]: ">" for lane in lanes}

    def _assemble(self, fresh: list[Entry], count: int) -> list[Entry]:
        live = [e for e in fresh if e.lane == keys.LANES[0]]
        # Live beyond ``count`` (a prefetch larger than this read) is held first, never dropped.
        live, lower = live[:count], live[count:] + self.held + [e for e in fresh if e.lane != keys.LANES[0]]
        now_s = time.monotonic()
        if live:
            self._live_seen_s = now_s
        room = count - len(live)
        if now_s - self._live_seen_s < LIVE_RECENT_S:
            room = min(room, self.settings.backfill_max_batch)
        self.held = lower[room:]
        return live + lower[:room]

    def read_ahead(self, count: int) -> None:
        """``overlap_io``: send a non-blocking read of up to ``count`` entries per lane now, before
        the model call; its answer, read after the call, is the next batch (:meth:`settle`)."""
        assert self.link is not None
        streams = self._read_streams(count)
        try:
            self.link.send([xreadgroup_command(self.group, self.name, streams, count)], None)
        except redis.RedisError as e:
            self._link_lost(e)

    def send_write(self, out: Outbox) -> None:
        """``overlap_io``: send the batch's transaction (:meth:`write`'s commands, no read) and read
        the answers of what went before it, not its own: they come back during the next model call."""
        assert self.link is not None
        tx = RawTransaction(self.redis)
        self._queue_write(tx, out)
        try:
            self.link.send(tx.wrapped(), out)
        except redis.RedisError as e:
            self._link_lost(e)
        self.spin_until = time.monotonic() + self.settings.spin_ms / 1000
        self.settle(keep=1)

    def settle(self, keep: int = 0) -> None:
        """Read the answers of all sends on the link but the last ``keep``: landed writes go to
        ``confirmed``; those that did not run, or whose answer was lost, to ``unconfirmed`` (the
        worker writes them again); reads ahead to ``prefetched``."""
        link = self.link
        while link is not None and len(link.unanswered) > keep:
            try:
                tag, answers = link.take()
            except redis.RedisError as e:
                self._link_lost(e)
                return
            if isinstance(tag, Outbox):
                self._settle_write(tag, answers)
            elif not isinstance(answers[0], redis.RedisError):  # e.g. NOGROUP: the next read() recovers
                self.prefetched = (self.prefetched or []) + self._entries(answers[0])

    def _settle_write(self, out: Outbox, answers: list[Any]) -> None:
        try:
            _log_refused(exec_answers(answers), out)
        except redis.RedisError as e:  # the transaction did not run (EXECABORT, OOM, READONLY)
            self.unconfirmed.append(out)
            self.link_error = e
            return
        self.confirmed.append(out)
        self.batch_sizes.update(rows for _, rows, _ in out.calls)

    def _link_lost(self, e: redis.RedisError) -> None:
        """The link failed: every write on it not yet answered is written again; reads ahead are left
        pending on this consumer (the reclaim backstop), as a read whose answer was lost always is."""
        assert self.link is not None
        self.unconfirmed += [t for t in self.link.reset() if isinstance(t, Outbox)]
        self.link_error = e

    @property
    def buffered(self) -> list[Entry]:
        """Entries read and not yet handed out (held, then read ahead), pending on this consumer."""
        return self.held + (self.prefetched or [])

    def deliver(self, fresh: list[Entry]) -> None:
        """Entries a read for several consumers brought (:func:`read_many`): the next :meth:`read`
        hands them out without a round trip."""
        if fresh:
            self.prefetched = (self.prefetched or []) + fresh

    @property
    def busy(self) -> bool:
        """Entries read and not handed out, or sends not answered: not to be dropped yet."""
        return bool(self.held or self.prefetched or self.unwritten
                    or (self.link is not None and self.link.unanswered))

    def take_unanswered(self) -> list[Entry]:
        """Entries read but not yet handed out (held, prefetched): a stopping worker answers them."""
        entries = self.held + (self.prefetched or [])
        self.held, self.prefetched = [], None
        return entries

    def _xread(self, streams: dict[str, str], count: int, block: int | None) -> list[Entry]:
        if block is not None and time.monotonic() < self.spin_until and isinstance(self.redis, redis.Redis):
            return self._xread_spinning(streams, count, block)
        if self.link is not None and not self.link.unanswered:
            return self._xread_linked(streams, count, block)
        try:
            # RESP2 from a bytes client: [[stream, rows], …], or None/[] when the block timed out.
            response = cast("list[tuple[bytes, StreamRows]] | None", self.redis.xreadgroup(
                self.group, self.name, cast("dict[Any, Any]", streams), count=count, block=block))
        except redis.ResponseError as e:
            return self._vanished(e)
        return self._entries(response)

    def _xread_linked(self, streams: dict[str, str], count: int, block: int | None) -> list[Entry]:
        """The read on the kept connection (``overlap_io``, nothing in flight on it): the same
        command without redis-py's checkout, release and retry wrapper around every read, which
        cost more than the rest of a one-request batch's Redis Python. A failure closes the link
        and is raised, as the pool's read would raise it."""
        assert self.link is not None
        try:
            self.link.send([xreadgroup_command(self.group, self.name, streams, count, block)], None)
            _, (answer,) = self.link.take()
        except redis.RedisError as e:
            self._link_lost(e)
            raise
        if isinstance(answer, redis.ResponseError):
            return self._vanished(answer)
        return self._entries(answer)

    def _xread_spinning(self, streams: dict[str, str], count: int, block: int) -> list[Entry]:
        """The blocking read of the low-latency mode: polls the socket until ``spin_until``, then sleeps.

        The same command as :meth:`_xread`; what changes is that an entry arriving soon after
        a batch finds this process running, not asleep in the kernel (one wake-up fewer).
        """
        pool = self.redis.connection_pool
        conn: Any = pool.get_connection()  # Any: redis-py leaves the low-level methods untyped
        try:
            conn.send_command(*xreadgroup_command(self.group, self.name, streams, count, block))
            while time.monotonic() < self.spin_until and not conn.can_read(timeout=0):
                pass
            return self._entries(self.redis.parse_response(conn, "XREADGROUP"))
        except redis.ResponseError as e:
            return self._vanished(e)
        except BaseException:
            conn.disconnect()  # its answer may still be in flight: never reuse it
            raise
        finally:
            pool.release(conn)

    def _vanished(self, e: redis.ResponseError) -> list[Entry]:
        # NOGROUP: stream or group deleted; UNBLOCKED: deleted while we were blocked on it.
        if not str(e).startswith(("NOGROUP", "UNBLOCKED")):
            raise e
        log.warning("stream or group vanished (%s); recreating", e)
        self.ensure_group()
        return []

    def _entries(self, response: Any) -> list[Entry]:
        """Entries from an XREADGROUP answer in any of the shapes redis-py hands back.

        ``[[stream, [(id, {field: value})…]]…]`` normally; inside a cluster transaction
        the answer comes as ``{stream: [[id, [field, value, …]]…]}`` (no callback applied).
        """
        streams = response.items() if isinstance(response, dict) else response or []
        return [Entry(text(i), _field_map(f), self.lane_of[text(stream)])
                for stream, rows in streams for i, f in rows]

    def reclaim(self, handle: ClaimHandler) -> int:
        """Claim entries idle past ``reclaim_min_idle_ms``; ``handle`` answers them. Returns how many."""
        return sum(self._reclaim_lane(lane, handle) for lane in keys.LANES)

    def _reclaim_lane(self, lane: str, handle: ClaimHandler) -> int:
        start, handled = "0-0", 0
        while True:
            try:
                start, claimed, deleted = self._autoclaim(lane, start)
            except redis.ResponseError as e:  # NOGROUP: the group is recreated, nothing to reclaim
                self._vanished(e)
                return handled
            self._forget(lane, deleted)
            holding = self.holding()  # idle, but read by this worker and still to be answered by it
            claimed = [e for e in claimed if e.id not in holding]
            if claimed:
                handled += len(claimed)
                handle(*self._split_over_delivered(lane, claimed))
            if start == "0-0":
                return handled

    def _forget(self, lane: str, gone: Sequence[str]) -> None:
        """Pending ids whose entries were trimmed or deleted: nothing is left to answer. Acked (a
        no-op where XCLAIM already dropped them) and counted as discarded."""
        if not gone:
            return
        pipe = self.redis.pipeline(transaction=False)  # both keys in the shard's slot
        pipe.xack(self.streams[lane], self.group, *gone)
        pipe.incrby(keys.discarded_counter(self.model, self.shard), len(gone))
        pipe.execute()
        log.warning("%d pending entries of %s were gone from the stream (trimmed); discarded",
                    len(gone), self.streams[lane])

    def holding(self) -> set[str]:
        """Ids of the entries this consumer read and holds to answer later (held, read ahead, or
        answered by a reply transaction still to be written)."""
        unwritten = [i for out in self.unwritten for i in out.ack_ids]
        return {e.id for e in [*self.held, *(self.prefetched or [])]} | set(unwritten)

    def recover(self, handle: ClaimHandler) -> int:
        """Answer the entries pending on this consumer that it does not hold: reads delivered whose
        answer never arrived (a connection cut, or Redis killed, while it was in flight; a read ahead
        lost with its link). Call with nothing in flight (:meth:`settle` first). Returns how many."""
        holding, recovered = self.holding(), 0
        for lane, stream in self.streams.items():
            try:
                lost = [i for i in self._own_pending(lane) if i not in holding]
            except redis.ResponseError as e:  # NOGROUP: Redis came back empty; nothing is pending
                self._vanished(e)
                return recovered
            if not lost:
                continue
            # XCLAIM to itself returns what is left of them (and drops trimmed ids from the PEL).
            rows = cast("StreamRows", self.redis.xclaim(stream, self.group, self.name, 0,
                                                        cast("list[StreamIdT]", lost)))
            claimed = [Entry(text(i), f, lane) for i, f in rows if f]
            found = {e.id for e in claimed}
            self._forget(lane, [i for i in lost if i not in found])
            log.warning("recovered %d entries read by this consumer whose answer never arrived",
                        len(claimed))
            if claimed:
                recovered += len(claimed)
                handle(*self._split_over_delivered(lane, claimed))
        return recovered

    def queue_pending(self, pipe: Any) -> None:
        """Queue each lane's pending summary (XPENDING) on ``pipe``: :meth:`quiet` reads the answers."""
        for stream in self.streams.values():
            pipe.xpending(stream, self.group)

    def quiet(self, answers: Sequence[Any]) -> bool:
        """From :meth:`queue_pending`'s answers: nothing is pending in the shard's group but what this
        consumer holds, so there is nothing to recover, reclaim or take over (a malformed or failed
        answer is not quiet: the full pass finds out)."""
        try:
            pending = sum(int(a["pending"]) for a in answers)
        except (TypeError, KeyError, ValueError):
            return False
        return pending <= len(self.holding())

    def _own_pending(self, lane: str) -> list[str]:
        """Every id pending on this consumer in ``lane`` (a few batches at most: what it read)."""
        ids: list[str] = []
        start = "-"
        while True:
            rows = self.redis.xpending_range(self.streams[lane], self.group, start, "+", 1000,
                                             consumername=self.name)
            ids += [text(r["message_id"]) for r in rows]
            if len(rows) < 1000:
                return ids
            start = "(" + ids[-1]

    def touch(self) -> None:
        """Reset the idle time of every entry pending on this consumer: the batch in hand, entries
        held, a read ahead whose answer is not read yet. The reclaim backstop takes entries by idle
        time, and these have a live worker (its own lost reads are its to recover: :meth:`recover`).
        XCLAIM to itself with JUSTID changes neither owner nor delivery count; it drops trimmed
        ids from the pending list (Redis ≥ 7), which are counted as discarded here."""
        acking = self._acking()  # before the listing: a write confirmed since then is still in it
        pipe = self.redis.pipeline(transaction=False)  # both lanes in the shard's slot
        for stream in self.streams.values():
            pipe.xpending_range(stream, self.group, "-", "+", TOUCH_MAX, consumername=self.name)
        listed: dict[str, list[str]] = {}
        for lane, rows in zip(self.streams, pipe.execute(raise_on_error=False), strict=True):
            if rows and not isinstance(rows, redis.RedisError):  # NOGROUP: nothing pending there
                listed[lane] = [text(r["message_id"]) for r in rows]
                pipe.xclaim(self.streams[lane], self.group, self.name, 0,
                            cast("list[StreamIdT]", listed[lane]), justid=True)
        if not listed:
            return
        for (lane, ids), claimed in zip(listed.items(), pipe.execute(), strict=True):
            if acking is not None:  # unknown: forget nothing now (recover() will, with nothing in flight)
                found = {text(i) for i in claimed} | acking
                self._forget_gone(lane, [i for i in ids if i not in found])

    def _acking(self) -> set[str] | None:
        """Ids that reply transactions sent on the link and not yet confirmed ack (and delete): gone
        from the stream, but not trimmed. None when the link changed under the pulse thread's feet."""
        if self.link is None:
            return set()
        try:
            tags = [tag for _, tag in list(self.link.unanswered)]
        except RuntimeError:  # the loop's thread sent or settled meanwhile
            return None
        return {i for tag in tags if isinstance(tag, Outbox) for i in tag.ack_ids}

    def _autoclaim(self, lane: str, start: str) -> tuple[str, list[Entry], list[str]]:
        result = self.redis.xautoclaim(self.streams[lane], self.group, self.name,
                                       self.settings.reclaim_min_idle_ms, start_id=start,
                                       count=self.settings.max_batch)
        claimed = [Entry(text(i), f, lane) for i, f in result[1] if f is not None]
        deleted = [text(i) for i in (result[2] if len(result) > 2 else [])]
        return text(result[0]), claimed, deleted

    def _split_over_delivered(self, lane: str, claimed: list[Entry]) -> tuple[list[Entry], list[Entry]]:
        ids = [e.id for e in claimed]
        pending = self.redis.xpending_range(self.streams[lane], self.group, min=min(ids, key=_id_key),
                                            max=max(ids, key=_id_key), count=len(ids) + 1000,
                                            consumername=self.name)
        deliveries = {text(p["message_id"]): int(p["times_delivered"]) for p in pending}
        limit = self.settings.max_deliveries
        over = [e for e in claimed if deliveries.get(e.id, 0) > limit]
        fresh = [e for e in claimed if deliveries.get(e.id, 0) <= limit]
        log.warning("claimed %d entries (%d over %d deliveries)", len(claimed), len(over), limit)
        return fresh, over

    def write(self, out: Outbox, prefetch: int = 0) -> None:
        """Replies, dead letters, experiment log and acks in one MULTI/EXEC (the shard's slot).

        With ``prefetch`` the transaction ends with a non-blocking read of up to that many
        entries per lane, kept for the next :meth:`read`: under load the next batch comes
        back with this write's answer, one round trip per batch instead of two. Raises when
        the transaction did not run; a command refused inside it is logged (``_log_refused``).
        """
        # A cluster client's pipeline finds the slot's node; on one node the raw transaction
        # does the same work with less Python per command.
        pipe: Any = RawTransaction(self.redis) if isinstance(self.redis, redis.Redis) \
            else self.redis.pipeline(transaction=True)
        self._queue_write(pipe, out)
        if prefetch:
            pipe.xreadgroup(self.group, self.name, cast("dict[Any, Any]", self._read_streams(prefetch)),
                            count=prefetch)
        answers = pipe.execute(raise_on_error=False)
        if prefetch:  # a failed read (e.g. NOGROUP) is left to the next read(), which recovers
            read, answers = answers[-1], answers[:-1]
            self.prefetched = None if isinstance(read, redis.RedisError) else self._entries(read)
        _log_refused(answers, out)
        self.spin_until = time.monotonic() + self.settings.spin_ms / 1000
        self.batch_sizes.update(rows for _, rows, _ in out.calls)

    def _queue_write(self, pipe: Any, out: Outbox) -> None:
        ttl_ms = int(self.settings.reply_ttl_s * 1000)
        for reply_to, payloads in out.replies.items():
            key = keys.reply_key(self.model, reply_to, self.shard)
            pipe.lpush(key, *payloads)
            pipe.pexpire(key, ttl_ms)
        if self.has_markers:
            window_ms = int(self.settings.idempotency_window_s * 1000)
            for request_id, payload in out.markers:
                pipe.set(keys.done_key(self.model, request_id, self.shard), payload, px=window_ms)
        for entry, reason in out.dead:
            record = {**entry.fields, b"entry_id": entry.id, b"lane": entry.lane, b"reason": reason,
                      b"worker": self.name}
            # A bytes-keyed dict is a fine XADD argument; redis-py's dict type is invariant in the key.
            pipe.xadd(keys.dead_letter_stream(self.model, self.shard), cast("Fields", record),
                      maxlen=self.settings.dead_letter_maxlen, approximate=True)
        if out.discarded:  # only under overload or bad input: a healthy batch writes nothing here
            pipe.incrby(keys.discarded_counter(self.model, self.shard), out.discarded)
        out.experiment.queue(pipe, self.model, self.shard)
        for lane, ids in out.acks.items():
            self._queue_ack_and_delete(pipe, self.streams[lane], ids)

    def flush_stats(self) -> None:
        """Add the batch sizes counted since the last flush to the shard's histogram (one round trip)."""
        if not self.batch_sizes:
            return
        sizes, self.batch_sizes = self.batch_sizes, Counter()
        pipe = self.redis.pipeline(transaction=False)
        for rows, calls in sizes.items():
            pipe.hincrby(keys.batch_histogram(self.model, self.shard), str(rows), calls)
        try:
            pipe.execute()
        except redis.RedisError:
            self.batch_sizes.update(sizes)  # kept for the next flush
            raise

    def _queue_ack_and_delete(self, pipe: Any, stream: str, ids: list[str]) -> None:
        """Retention: an answered entry leaves the stream with its ack, so the stream stays bounded."""
        if self.has_xackdel:
            pipe.execute_command("XACKDEL", stream, self.group, "IDS", len(ids), *ids)
        else:
            pipe.xack(stream, self.group, *ids)
            pipe.xdel(stream, *ids)

    def take_over(self, live: set[str], handle: ClaimHandler) -> int:
        """Claim what is pending on consumers not in ``live`` (their heartbeat expired), then drop them.

        XCLAIM with a minimum idle time makes the takeover exclusive: a second worker
        racing for the same entries finds them freshly claimed (idle ≈ 0) and skips them.
        A consumer seen within a heartbeat interval is left alone: ``live`` was read
        before the listing, so a worker that started in between (first heartbeat, first
        read) is missing from it, and deleting its consumer would drop what it reads next.
        """
        taken, min_idle_ms = 0, self.settings.heartbeat_interval_s * 1000
        for lane in keys.LANES:
            for consumer in self._consumers(lane):
                name = text(consumer["name"])
                if name != self.name and name not in live and _idle_ms(consumer) >= min_idle_ms:
                    taken += self._take_over_from(lane, name, handle)
        return taken

    def _take_over_from(self, lane: str, consumer: str, handle: ClaimHandler) -> int:
        taken = 0
        while ids := self._pending_ids(consumer, lane):
            claimed = self._claim_from(lane, ids)
            if not claimed:  # trimmed (now off its list), or claimed by another worker first
                if ids == self._pending_ids(consumer, lane):
                    break
                continue
            log.warning("took over %d entries from dead consumer %s", len(claimed), consumer)
            taken += len(claimed)
            handle(*self._split_over_delivered(lane, claimed))
        if not self._pending_ids(consumer, lane):  # DELCONSUMER would drop entries still pending on it
            self.redis.xgroup_delconsumer(self.streams[lane], self.group, consumer)
            log.info("removed dead consumer %s from %s", consumer, self.streams[lane])
        return taken

    def _consumers(self, lane: str = "live") -> list[dict[str, Any]]:
        try:
            return self.redis.xinfo_consumers(self.streams[lane], self.group)
        except redis.ResponseError:  # NOGROUP: nothing to take over; read() recreates the group
            return []

    def _pending_ids(self, consumer: str, lane: str = "live") -> list[str]:
        rows = self.redis.xpending_range(self.streams[lane], self.group, "-", "+", self.settings.max_batch,
                                         consumername=consumer)
        return [text(r["message_id"]) for r in rows]

    def _claim_from(self, lane: str, ids: list[str]) -> list[Entry]:
        """XCLAIM ``ids`` (idle past a heartbeat interval); trimmed ones are forgotten (discarded)."""
        stream, min_idle_ms = self.streams[lane], int(self.settings.heartbeat_interval_s * 1000)
        rows = cast("StreamRows", self.redis.xclaim(stream, self.group, self.name, min_idle_ms,
                                                    cast("list[StreamIdT]", ids)))
        claimed = [Entry(text(i), f, lane) for i, f in rows if f]
        # Not returned: trimmed (Redis ≥ 7 drops them from the PEL; older servers return nil), or
        # freshly claimed by another worker (the idle guard). Only the first are gone from the stream.
        found = {e.id for e in claimed}
        self._forget_gone(lane, [i for i in ids if i not in found])
        return claimed

    def _forget_gone(self, lane: str, missing: list[str]) -> None:
        """:meth:`_forget` those of ``missing`` no longer in the stream (one round trip, if any)."""
        if not missing:
            return
        pipe = self.redis.pipeline(transaction=False)
        for i in missing:
            pipe.xrange(self.streams[lane], i, i)
        self._forget(lane, [i for i, row in zip(missing, pipe.execute(), strict=True) if not row])

    def group_state(self) -> tuple[dict[str, LaneCounts], int]:
        """Per lane its :class:`LaneCounts`; and how many entries of the shard were discarded so far.

        Not the group's ``lag`` and ``entries-read``: servers stop reporting them once
        entries are deleted out of order (Valkey, newer Redis), and we delete every
        answered entry. Because we do, the stream holds exactly the unread and the
        pending entries: backlog = length − pending, and ``entries-added`` − length
        counts every entry answered (or shed, or dead-lettered) since the stream began.
        """
        pipe = self.redis.pipeline(transaction=False)  # every key in the shard's slot: one round trip
        self.queue_group_state(pipe)
        return self.parse_group_state(pipe.execute(raise_on_error=False))

    def queue_group_state(self, pipe: Any) -> int:
        """Queue :meth:`group_state`'s reads on ``pipe`` (several shards' in one round trip); how many."""
        for stream in self.streams.values():
            pipe.xinfo_stream(stream)
            pipe.xinfo_groups(stream)
        pipe.get(keys.discarded_counter(self.model, self.shard))
        return 2 * len(self.streams) + 1

    def parse_group_state(self, answers: list[Any]) -> tuple[dict[str, LaneCounts], int]:
        """:meth:`group_state` from the answers of :meth:`queue_group_state`'s reads."""
        state = {}
        for i, lane in enumerate(self.streams):
            info, groups = answers[2 * i], answers[2 * i + 1]
            if isinstance(info, redis.ResponseError) or isinstance(groups, redis.ResponseError):
                info, groups = {}, []  # the stream is gone; read() recreates it
            group: dict[str, Any] = next((g for g in groups if text(g["name"]) == self.group), {})
            length, pending = int(info.get("length") or 0), int(group.get("pending") or 0)
            added = int(info.get("entries-added") or 0)  # 0 where the server lacks the field
            state[lane] = LaneCounts(max(0, length - pending), pending, max(0, added - length), added)
        return state, _counter(answers[-1])

    def leave(self) -> None:
        """Delete this consumer from the group unless entries are still pending on it (for reclaim)."""
        for stream in self.streams.values():
            if not self.redis.xpending_range(stream, self.group, "-", "+", 1, self.name):
                self.redis.xgroup_delconsumer(stream, self.group, self.name)


def read_many(consumers: Sequence[StreamConsumer], count: int, wait_ms: float) -> int:
    """One XREADGROUP over the streams of several consumers of one node (every model's group is
    ``workers``, and the consumer name is the worker's), blocking up to ``wait_ms`` (none below
    1 ms); what it brings goes to each consumer's buffer (:meth:`StreamConsumer.deliver`).
    Returns how many entries came. A stream or group deleted under the read (NOGROUP,
    UNBLOCKED) fails the whole call: every consumer's groups are recreated and nothing is read.
    """
    first, owners = consumers[0], {}
    for c in consumers:
        assert (c.group, c.name, c.redis) == (first.group, first.name, first.redis), "one group, one node"
        owners.update(dict.fromkeys(c._read_streams(count), c))
    block = int(wait_ms) if wait_ms >= 1 else None
    try:
        response = first.redis.xreadgroup(first.group, first.name, dict.fromkeys(owners, ">"),
                                          count=count, block=block)
    except redis.ResponseError as e:
        for c in consumers:
            c._vanished(e)
        return 0
    n = 0
    for stream, rows in cast("list[tuple[bytes, StreamRows]]", response or []):
        owner = owners[text(stream)]
        fresh = owner._entries([(stream, rows)])
        owner.deliver(fresh)
        n += len(fresh)
    return n


def read_on_node(node: redis.Redis, consumers: Sequence[StreamConsumer], count: int) -> list[StreamConsumer]:
    """Non-blocking reads of consumers whose hash slots one cluster node serves, pipelined: one
    round trip for all (a cluster refuses one command across slots). What each read brings goes
    to its consumer's buffer. Returns the consumers the node redirected (MOVED, ASK: the slot
    moved), to read through the cluster client. An error other than NOGROUP (the group is
    recreated) is raised once every answer has been taken."""
    pipe = node.pipeline(transaction=False)
    for c in consumers:
        pipe.xreadgroup(c.group, c.name, dict.fromkeys(c._read_streams(count), ">"), count=count)
    moved, failure = [], None
    for c, answer in zip(consumers, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(answer, redis.exceptions.AskError):  # MovedError is one too
            moved.append(c)
        elif isinstance(answer, redis.ResponseError) and str(answer).startswith(("NOGROUP", "UNBLOCKED")):
            c._vanished(answer)
        elif isinstance(answer, Exception):
            failure = failure or answer
        else:
            c.deliver(c._entries(answer))
    if failure is not None:
        raise failure
    return moved


def _log_refused(answers: list[Any], out: Outbox) -> None:
    """Commands refused inside a transaction that ran (a reply key or dead-letter stream of the wrong
    type): the rest of it, acks included, did apply. The same write would be refused again, so it
    is logged, not retried: the request's reply is lost; the worker and every other reply are not."""
    errors = [a for a in answers if isinstance(a, redis.RedisError)]
    if errors:
        log.error("%d of %d commands in the reply transaction of %d entries were refused (%s); the "
                  "other replies and the acks landed", len(errors), len(answers), len(out.ack_ids), errors[0])


def _idle_ms(consumer: dict[str, Any]) -> float:
    """How long ago the server last saw the consumer (XINFO CONSUMERS); unreadable reads as idle."""
    try:
        return float(consumer.get("idle", math.inf))
    except (TypeError, ValueError):
        return math.inf


def id_ms(entry_id: str) -> float:
    """The entry's enqueue time (ms since the epoch), from its stream id."""
    return float(entry_id.split("-", 1)[0])


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-", 1)
    return int(ms), int(seq)
