"""Tell the fleet to converge on the registry, and watch it do so through the heartbeats.

A reload message is a nudge (``protocol.control``), signed with the
``control_secret`` when one is set; the registry stays the truth.
``wait_for_fleet`` reads the heartbeat schema of ``protocol.presence``, so the
registry needs nothing from the serving side to wait for a rollout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from protocol import control, keys, presence
from protocol.presence import DEFAULT_TTL_S


@dataclass(frozen=True)
class FleetReport:
    """Where every live worker of a model stands after a reload."""

    model: str
    version: int
    switched: list[str]
    failed: dict[str, str]
    pending: list[str]
    elapsed_s: float

    @property
    def ok(self) -> bool:
        """Every live worker serves ``version``."""
        return not self.failed and not self.pending and bool(self.switched)

    def lines(self) -> list[str]:
        """One line per worker, then the summary."""
        out = [f"  {w:<40} serving v{self.version}" for w in self.switched]
        out += [f"  {w:<40} FAILED: {error}" for w, error in self.failed.items()]
        out += [f"  {w:<40} not switched after {self.elapsed_s:.1f} s" for w in self.pending]
        state = "switched" if self.ok else "NOT switched"
        counts = f"{len(self.switched)} switched, {len(self.failed)} failed, {len(self.pending)} pending"
        return [*out, f"{self.model}: fleet {state} to v{self.version} in {self.elapsed_s:.2f} s ({counts})"]


def publish_reload(client, model: str, version: int | None = None, *,
                   secret: control.Secret | None = None) -> int:
    """Publish a reload command, signed when there is a ``secret``; returns how many subscribers got it.

    Workers that have the secret (setting ``control_secret``) ignore an unsigned reload.
    """
    command = control.reload(model, version, secret=secret)
    return int(client.publish(keys.control_channel(), command.encode()))


def wait_for_fleet(client, model: str, version: int, *, timeout_s: float, poll_s: float = 0.05,
                   ttl_s: float = DEFAULT_TTL_S) -> FleetReport:
    """Poll heartbeats until every live worker serves ``version`` or reports it failed."""
    started = time.monotonic()
    while True:
        workers = presence.read_live(client, model, ttl_s)
        switched = [w.worker_id for w in workers if w.version == version]
        failed = {w.worker_id: w.error for w in workers
                  if w.version != version and w.failed_version == version}
        pending = [w.worker_id for w in workers if w.worker_id not in switched and w.worker_id not in failed]
        elapsed_s = time.monotonic() - started
        if not pending or elapsed_s >= timeout_s:
            return FleetReport(model, version, switched, failed, pending, elapsed_s)
        time.sleep(poll_s)
