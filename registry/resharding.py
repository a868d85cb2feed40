"""Change the number of stream shards of a live model without losing a request (docs/protocol.md §12).

Growing (S → S' > S): workers first read the new shards (``serve = S'``), and
only once the live fleet covers every one of them do bots start sending there
(``route = S'``). Shrinking (S → S' < S): bots stop sending to the retired
shards first (``route = S'``); after bots have had time to re-read the layout and
the retired shards hold no entry, workers stop reading them (``serve = S'``).
``highest`` keeps every shard ever used, and workers keep draining a retired
shard whenever it holds entries, so even a bot still routing with a stale
layout loses nothing. A symbol's requests change shard once, at the switch:
those already queued on the old shard may be answered after the first ones on
the new shard (order across the switch is not kept).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from protocol import keys, presence, sharding
from protocol.errors import RegistryError
from registry.rollout import publish_reload

if TYPE_CHECKING:
    import redis

    from protocol.control import Secret


@dataclass
class ReshardReport:
    """What the procedure did, step by step, and whether it finished."""

    model: str
    before: sharding.ShardLayout
    after: sharding.ShardLayout
    steps: list[str] = field(default_factory=list)
    ok: bool = True

    def lines(self) -> list[str]:
        """The steps, then the summary."""
        state = "done" if self.ok else "NOT finished"
        return [*self.steps, f"{self.model}: shards {self.before.route} → {self.after.route} {state} "
                f"(route {self.after.route}, serve {self.after.serve}, highest {self.after.highest})"]


def reshard(client: redis.Redis, model: str, shards: int, *, timeout_s: float = 60.0,
            ttl_s: float = presence.DEFAULT_TTL_S, secret: Secret | None = None,
            poll_s: float = 0.05) -> ReshardReport:
    """Move ``model`` to ``shards`` stream shards; see the module docstring for the order of steps."""
    before = sharding.read_layout(client, model)
    report = ReshardReport(model, before, before)
    if not 1 <= shards <= keys.MAX_SHARDS:
        raise RegistryError(f"shards must be 1 … {keys.MAX_SHARDS}, got {shards}")
    if shards > before.route:
        _grow(client, model, shards, report, timeout_s, ttl_s, secret, poll_s)
    elif shards < before.route:
        _shrink(client, model, shards, report, timeout_s, secret, poll_s)
    else:
        report.steps.append(f"already routed to {shards} shard(s)")
    return report


def _write(client: redis.Redis, model: str, report: ReshardReport, layout: sharding.ShardLayout,
           why: str, secret: Secret | None) -> None:
    sharding.write_layout(client, model, layout)
    publish_reload(client, model, secret=secret)  # workers re-read the layout now, not at their next interval
    report.after = layout
    report.steps.append(f"route {layout.route}, serve {layout.serve}, highest {layout.highest}: {why}")


def _grow(client: redis.Redis, model: str, shards: int, report: ReshardReport, timeout_s: float,
          ttl_s: float, secret: Secret | None, poll_s: float) -> None:
    layout = report.before
    serving = sharding.ShardLayout(layout.route, max(layout.serve, shards), max(layout.highest, shards))
    _write(client, model, report, serving, "workers read the new shards", secret)
    deadline = time.monotonic() + timeout_s
    while (missing := _unread(client, model, shards, ttl_s)) and time.monotonic() < deadline:
        time.sleep(poll_s)
    if missing:
        report.ok = False
        report.steps.append(f"no live worker reads shard(s) {sorted(missing)} after {timeout_s:.0f} s: "
                            f"bots still route to {layout.route}; rerun when workers cover them")
        return
    _write(client, model, report, sharding.ShardLayout(shards, serving.serve, serving.highest),
           "every shard has a live reader: bots route to all", secret)


def _unread(client: redis.Redis, model: str, shards: int, ttl_s: float) -> set[int]:
    """The shards below ``shards`` that no live worker reports reading."""
    read = {k for w in presence.read_live(client, model, ttl_s) for k in w.shard_list}
    return set(range(shards)) - read


def _shrink(client: redis.Redis, model: str, shards: int, report: ReshardReport, timeout_s: float,
            secret: Secret | None, poll_s: float) -> None:
    layout = report.before
    _write(client, model, report, sharding.ShardLayout(shards, layout.serve, layout.highest),
           "bots stop sending to the retired shards", secret)
    # Bots re-read the layout at least this often; then nothing new reaches the retired shards.
    time.sleep(2 * sharding.LAYOUT_REFRESH_S)
    deadline = time.monotonic() + timeout_s
    while (busy := _holding(client, model, range(shards, layout.serve))) and time.monotonic() < deadline:
        time.sleep(poll_s)
    if busy:
        report.ok = False
        report.steps.append(f"retired shard(s) {busy} still hold entries after {timeout_s:.0f} s: "
                            "workers keep reading them; rerun to finish")
        return
    _write(client, model, report, sharding.ShardLayout(shards, shards, layout.highest),
           "retired shards are empty: workers read only the routed ones (and any retired shard that "
           "receives a late entry)", secret)


def _holding(client: redis.Redis, model: str, shards: range) -> list[int]:
    """The shards in ``shards`` whose streams (any lane) still hold entries."""
    return [k for k in shards if sharding.holds_entries(client, model, k)]
