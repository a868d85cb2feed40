"""Reading a model's stream through its consumer group, and writing back in one transaction.

An entry is acknowledged, and deleted from the stream, only in the MULTI/EXEC
that carries its reply (or its dead letter): the stream holds only unread and
pending entries, and an entry never answered stays pending for another worker.
Entries pending on a consumer whose worker's heartbeat has expired are taken
over at once (``take_over``); ``reclaim`` (idle time) is the backstop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import redis

from protocol import keys
from protocol.settings import Settings
from protocol.values import text
from worker.arms import ExperimentLog

if TYPE_CHECKING:
    from redis.typing import StreamIdT

    from protocol.values import Fields, StreamRows

log = logging.getLogger(__name__)
Entry = tuple[str, dict[bytes, bytes]]
# Gets the fresh entries and those delivered too often (to dead-letter).
ClaimHandler = Callable[[list[Entry], list[Entry]], None]


@dataclass
class Outbox:
    """What one batch writes back: replies, entries to ack, entries to dead-letter."""

    replies: dict[str, list[bytes]] = field(default_factory=dict)  # reply token → payloads
    ack_ids: list[str] = field(default_factory=list)
    dead: list[tuple[Entry, str]] = field(default_factory=list)
    call_rows: list[int] = field(default_factory=list)  # rows of each model call
    experiment: ExperimentLog = field(default_factory=ExperimentLog)

    def reply(self, reply_to: str, payload: bytes) -> None:
        """Queue a reply; replies sharing a token go out in one LPUSH."""
        self.replies.setdefault(reply_to, []).append(payload)


class StreamConsumer:
    """One consumer (``name``) of the model's group: read, reclaim, write back."""

    def __init__(self, client: redis.Redis, model: str, name: str, settings: Settings) -> None:
        self.redis, self.model, self.name, self.settings = client, model, name, settings
        self.stream = keys.request_stream(model)
        self.group = keys.consumer_group(model)
        self.has_xackdel = False  # Redis ≥ 8.2 acks and deletes in one command

    def detect_server(self) -> None:
        """Use XACKDEL where the server has it (one command instead of XACK + XDEL)."""
        try:  # for an id that cannot exist this is a no-op where the command exists
            self.redis.execute_command("XACKDEL", self.stream, self.group, "IDS", 1, "0-1")
            self.has_xackdel = True
        except redis.ResponseError:  # unknown command (Redis < 8.2, Valkey)
            self.has_xackdel = False

    def ensure_group(self) -> None:
        """Create the group (and the stream) from id 0 unless it exists."""
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def read(self, count: int, wait_ms: float) -> list[Entry]:
        """Up to ``count`` new entries, blocking up to ``wait_ms`` (not at all below 1 ms)."""
        block = int(wait_ms) if wait_ms >= 1 else None
        try:
            # RESP2 from a bytes client: [[stream, rows]], or None when the block timed out.
            response = cast("list[tuple[bytes, StreamRows]] | None", self.redis.xreadgroup(
                self.group, self.name, {self.stream: ">"}, count=count, block=block))
        except redis.ResponseError as e:
            # NOGROUP: stream or group deleted; UNBLOCKED: deleted while we were blocked on it.
            if not str(e).startswith(("NOGROUP", "UNBLOCKED")):
                raise
            log.warning("stream or group vanished (%s); recreating", e)
            self.ensure_group()
            return []
        return [(text(i), f) for i, f in response[0][1]] if response else []

    def reclaim(self, handle: ClaimHandler) -> int:
        """Claim entries idle past ``reclaim_min_idle_ms``; ``handle`` answers them. Returns how many."""
        start, handled = "0-0", 0
        while True:
            start, claimed, deleted = self._autoclaim(start)
            if deleted:  # trimmed away while pending: nothing left to answer
                self.redis.xack(self.stream, self.group, *deleted)
            if claimed:
                handled += len(claimed)
                handle(*self._split_over_delivered(claimed))
            if start == "0-0":
                return handled

    def _autoclaim(self, start: str) -> tuple[str, list[Entry], list[str]]:
        result = self.redis.xautoclaim(self.stream, self.group, self.name,
                                       self.settings.reclaim_min_idle_ms, start_id=start,
                                       count=self.settings.max_batch)
        claimed = [(text(i), f) for i, f in result[1] if f is not None]
        deleted = [text(i) for i in (result[2] if len(result) > 2 else [])]
        return text(result[0]), claimed, deleted

    def _split_over_delivered(self, claimed: list[Entry]) -> tuple[list[Entry], list[Entry]]:
        ids = [entry_id for entry_id, _ in claimed]
        pending = self.redis.xpending_range(self.stream, self.group, min=min(ids, key=_id_key),
                                            max=max(ids, key=_id_key), count=len(ids) + 1000,
                                            consumername=self.name)
        deliveries = {text(p["message_id"]): int(p["times_delivered"]) for p in pending}
        limit = self.settings.max_deliveries
        over = [e for e in claimed if deliveries.get(e[0], 0) > limit]
        fresh = [e for e in claimed if deliveries.get(e[0], 0) <= limit]
        log.warning("claimed %d entries (%d over %d deliveries)", len(claimed), len(over), limit)
        return fresh, over

    def write(self, out: Outbox) -> None:
        """Replies, dead letters, histogram, experiment log and XACK in one MULTI/EXEC (one slot)."""
        ttl_ms = int(self.settings.reply_ttl_s * 1000)
        pipe = self.redis.pipeline(transaction=True)
        for reply_to, payloads in out.replies.items():
            key = keys.reply_key(self.model, reply_to)
            pipe.lpush(key, *payloads)
            pipe.pexpire(key, ttl_ms)
        for (entry_id, fields), reason in out.dead:
            record = {**fields, b"entry_id": entry_id, b"reason": reason, b"worker": self.name}
            # A bytes-keyed dict is a fine XADD argument; redis-py's dict type is invariant in the key.
            pipe.xadd(keys.dead_letter_stream(self.model), cast("Fields", record),
                      maxlen=self.settings.dead_letter_maxlen, approximate=True)
        for rows in out.call_rows:
            pipe.hincrby(keys.batch_histogram(self.model), str(rows), 1)
        out.experiment.queue(pipe, self.model)
        if out.ack_ids:
            self._queue_ack_and_delete(pipe, out.ack_ids)
        pipe.execute()

    def _queue_ack_and_delete(self, pipe: redis.client.Pipeline, ids: list[str]) -> None:
        """Retention: an answered entry leaves the stream with its ack, so the stream stays bounded."""
        if self.has_xackdel:
            pipe.execute_command("XACKDEL", self.stream, self.group, "IDS", len(ids), *ids)
        else:
            pipe.xack(self.stream, self.group, *ids)
            pipe.xdel(self.stream, *ids)

    def take_over(self, live: set[str], handle: ClaimHandler) -> int:
        """Claim what is pending on consumers not in ``live`` (their heartbeat expired), then drop them.

        XCLAIM with a minimum idle time makes the takeover exclusive: a second worker
        racing for the same entries finds them freshly claimed (idle ≈ 0) and skips them.
        """
        taken = 0
        for consumer in self._consumers():
            name = text(consumer["name"])
            if name != self.name and name not in live:
                taken += self._take_over_from(name, handle)
        return taken

    def _take_over_from(self, consumer: str, handle: ClaimHandler) -> int:
        taken = 0
        while claimed := self._claim_from(consumer):
            log.warning("took over %d entries from dead consumer %s", len(claimed), consumer)
            taken += len(claimed)
            handle(*self._split_over_delivered(claimed))
        if not self._pending_ids(consumer):  # DELCONSUMER would drop entries still pending on it
            self.redis.xgroup_delconsumer(self.stream, self.group, consumer)
            log.info("removed dead consumer %s", consumer)
        return taken

    def _consumers(self) -> list[dict[str, Any]]:
        try:
            return self.redis.xinfo_consumers(self.stream, self.group)
        except redis.ResponseError:  # NOGROUP: nothing to take over; read() recreates the group
            return []

    def _pending_ids(self, consumer: str) -> list[StreamIdT]:
        rows = self.redis.xpending_range(self.stream, self.group, "-", "+", self.settings.max_batch,
                                         consumername=consumer)
        return [text(r["message_id"]) for r in rows]

    def _claim_from(self, consumer: str) -> list[Entry]:
        ids = self._pending_ids(consumer)
        if not ids:
            return []
        min_idle_ms = int(self.settings.heartbeat_interval_s * 1000)
        claimed = cast("StreamRows", self.redis.xclaim(self.stream, self.group, self.name, min_idle_ms, ids))
        gone = [i for i, f in claimed if f is None]  # deleted from the stream: nothing left to answer
        if gone:
            self.redis.xack(self.stream, self.group, *gone)
        return [(text(i), f) for i, f in claimed if f is not None]

    def leave(self) -> None:
        """Delete this consumer from the group unless entries are still pending on it (for reclaim)."""
        if not self.redis.xpending_range(self.stream, self.group, "-", "+", 1, self.name):
            self.redis.xgroup_delconsumer(self.stream, self.group, self.name)


def id_ms(entry_id: str) -> float:
    """The entry's enqueue time (ms since the epoch), from its stream id."""
    return float(entry_id.split("-", 1)[0])


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-", 1)
    return int(ms), int(seq)
