"""Tell the fleet to converge on the registry, and watch it do so through the heartbeats.

A reload message is a nudge (``protocol.control``), signed with the
``control_secret`` when one is set; the registry stays the truth.
``wait_for_fleet`` reads the heartbeat schema of ``protocol.presence``, so the
registry needs nothing from the serving side to wait for a rollout. A worker that
serves the version through another of its artifacts than the one asked for (the
torch fallback of a corrupt ONNX file) has not switched, unless fallbacks are allowed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from protocol import control, keys, presence
from protocol.presence import DEFAULT_TTL_S

MAX_REASON_CHARS = 500  # a heartbeat is untrusted text: what a report line repeats of it


@dataclass(frozen=True)
class FleetReport:
    """Where every live worker of a model stands after a reload."""

    model: str
    version: int
    switched: list[str]
    failed: dict[str, str]
    pending: list[str]
    elapsed_s: float
    # worker → which variant it serves instead of the one asked for, and why
    fallback: dict[str, str] = field(default_factory=dict)
    fallback_allowed: bool = False
    label: str = ""  # the version's label, shown beside its number
    # workers serving the model without it in memory (a multi-model worker's cache): they load the
    # version on their first request, so they are neither waited for nor counted as serving it
    unloaded: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        """``v3 (1.1.0)``, or ``v3`` without a label."""
        return f"v{self.version} ({self.label})" if self.label else f"v{self.version}"

    @property
    def ok(self) -> bool:
        """Every live worker serves ``version``, as asked (or through a fallback, when allowed)."""
        if self.failed or self.pending or (self.fallback and not self.fallback_allowed):
            return False
        return bool(self.switched or self.fallback or self.unloaded)

    def lines(self) -> list[str]:
        """One line per worker, then the summary."""
        out = [f"  {w:<40} serving {self.title}" for w in self.switched]
        mark = f"serving {self.title} through a fallback" if self.fallback_allowed else "FALLBACK"
        out += [f"  {w:<40} {mark}: {why}" for w, why in self.fallback.items()]
        out += [f"  {w:<40} FAILED: {error}" for w, error in self.failed.items()]
        out += [f"  {w:<40} not switched after {self.elapsed_s:.1f} s" for w in self.pending]
        out += [f"  {w:<40} not loaded: loads {self.title} on its first request" for w in self.unloaded]
        state = "switched" if self.ok else "NOT switched"
        counts = (f"{len(self.switched)} switched, {len(self.fallback)} on a fallback, "
                  f"{len(self.failed)} failed, {len(self.pending)} pending")
        if self.unloaded:
            counts += f", {len(self.unloaded)} not loaded"
        return [*out, f"{self.model}: fleet {state} to {self.title} in {self.elapsed_s:.2f} s ({counts})"]


def publish_reload(client, model: str, version: int | None = None, *,
                   secret: control.Secret | None = None) -> int:
    """Publish a reload command, signed when there is a ``secret``; returns how many subscribers got it.

    Workers that have the secret (setting ``control_secret``) ignore an unsigned reload.
    """
    command = control.reload(model, version, secret=secret)
    return int(client.publish(keys.control_channel(), command.encode()))


def wait_for_fleet(client, model: str, version: int, *, timeout_s: float, poll_s: float = 0.05,
                   ttl_s: float = DEFAULT_TTL_S, variant: str | None = None,
                   allow_fallback: bool = False, label: str = "") -> FleetReport:
    """Poll heartbeats until every live worker serves ``version`` or reports it failed (a worker
    that does not hold the model in memory loads the version when a request comes: not waited for).

    ``variant``: the artifact asked for (the version's ``serving_variant``, or ``"primary"``); a
    worker serving another one is on a fallback. Without it, a worker is on a fallback when its
    heartbeat gives a fallback reason. ``allow_fallback`` counts such a worker as switched.
    ``label``: the version's, for the report's lines.
    """
    started = time.monotonic()
    while True:
        workers = presence.read_live(client, model, ttl_s)
        unloaded = [w.worker_id for w in workers if w.loads_on_demand]
        workers = [w for w in workers if not w.loads_on_demand]
        on_version = [w for w in workers if w.version == version]
        fallback = {w.worker_id: fallback_reason(w, variant) for w in on_version
                    if fallback_reason(w, variant)}
        switched = [w.worker_id for w in on_version if w.worker_id not in fallback]
        failed = {w.worker_id: w.error for w in workers
                  if w.version != version and w.failed_version == version}
        pending = [w.worker_id for w in workers if w.version != version and w.worker_id not in failed]
        elapsed_s = time.monotonic() - started
        if not pending or elapsed_s >= timeout_s:
            return FleetReport(model, version, switched, failed, pending, elapsed_s, fallback, allow_fallback,
                               label, unloaded)
        time.sleep(poll_s)


def fallback_reason(beat: presence.Heartbeat, variant: str | None = None) -> str:
    """Why ``beat``'s worker does not serve the variant asked for; empty when it does."""
    why = beat.fallback[:MAX_REASON_CHARS] or "no reason given"
    if variant is not None:
        return "" if beat.variant == variant else f"serves {beat.variant or '?'}, not {variant}: {why}"
    return f"serves {beat.variant or '?'}: {why}" if beat.fallback else ""
