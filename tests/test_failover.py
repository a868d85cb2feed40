"""A Redis Cluster master dies under load: bounded stalls, contained to its shards, re-sends computed once.

Three masters with a replica each (node timeout 2 s). One model is served from three
stream shards on three different masters by two in-process workers; three bot threads
send ~50 requests/s with explicit request ids and routes spread over the shards. The
master holding shard 0's slot (which also holds the model's registry, layout and
heartbeat keys) is SIGKILLed; its replica is promoted. What a trading bot is promised
(docs/protocol.md, failover and re-sends):

(a) no call hangs: each returns by the failover's end + 1 s (plus a margin for a busy box);
(b) calls routed to shards on live masters are not affected: no error, bounded latency;
(c) a call to the dead master's shard succeeds or raises ``Interrupted`` ("may be re-sent"),
    and the same id re-sent with ``resend=True`` gets its answer;
(d) no request id is computed twice (counted at the worker's model call).
"""

from __future__ import annotations

import inspect
import itertools
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import models
import numpy as np
import pytest
import redis
from conftest import ThreadedWorker, started, stopped, wait_until

from lab.bench_cluster import spread_model_name
from lab.embedded_redis import EmbeddedCluster
from producer import Client
from protocol import connection, errors, keys, sharding
from protocol.settings import Settings
from registry import Registry
from worker.worker import Worker

SHARDS = 3
BOTS = 3
RATE_RPS = 50.0  # all bots together
TIMEOUT_S = 10.0  # each call's deadline: a stall of this length is what the test must not see
NODE_TIMEOUT_MS = 2000
AFTER_FAILOVER_S = 1.0  # the promise: a master's death costs a bot at most failover time + this
MARGIN_S = 2.0  # for a busy 2-core box (the cluster, two workers and the bots share it)
LIVE_SHARD_BOUND_S = 2.0  # a call on a live master's shard: far below the 10 s stall, far above normal
X = np.random.default_rng(7).standard_normal((60, 110)).astype(np.float32)
INTERRUPTED = getattr(errors, "Interrupted", None)  # the client's "lost in failover, may be re-sent"


@dataclass
class Call:
    """One prediction as a bot saw it (times are ``time.monotonic()``)."""

    request_id: str
    route: str
    shard: int
    started: float
    ended: float = 0.0
    error: Exception | None = None
    answered_id: str | None = None


@pytest.fixture(params=[True, False], ids=["full-coverage", "partial-coverage"])
def replica_cluster(request) -> Iterator[EmbeddedCluster]:
    """3 masters + 3 replicas, node timeout 2 s; a fresh one per test (the test kills a node).

    With Redis' default ``cluster-require-full-coverage yes`` every node answers ``CLUSTERDOWN``
    from the moment the dead master is marked failed until its replica is promoted (about a
    second here); with ``no`` the live masters keep serving throughout.
    """
    cluster = started(EmbeddedCluster(3, replicas=1, node_timeout_ms=NODE_TIMEOUT_MS,
                                      full_coverage=request.param), "Redis Cluster with replicas")
    yield cluster
    stopped(cluster)


def routes_per_shard(shards: int, per_shard: int = 2) -> dict[int, list[str]]:
    """Routing keys (symbols) whose CRC-32 lands on each shard, ``per_shard`` of each."""
    found: dict[int, list[str]] = {k: [] for k in range(shards)}
    for i in itertools.count():
        route = f"SYM{i}"
        bucket = found[sharding.shard_for(route, shards)]
        if len(bucket) < per_shard:
            bucket.append(route)
        if all(len(b) == per_shard for b in found.values()):
            return found
    raise AssertionError("unreachable")


def serve_sharded(cluster: EmbeddedCluster, tmp_path) -> tuple[str, Settings]:
    """Register a model whose 3 shards sit on 3 masters, in Production, with a 3-shard layout."""
    node = redis.Redis(port=cluster.nodes[0].port)
    model = spread_model_name(node, "failover", SHARDS)
    node.close()
    settings = Settings(redis_url=cluster.url, artifact_dir=tmp_path / "artifacts", block_ms=50,
                        reclaim_interval_s=0.5, reconcile_interval_s=0.5, load_interval_s=0.1)
    client = connection.connect(cluster.url)
    registry = Registry(client, settings.artifact_dir)
    mv = registry.register(model, models.linear_softmax(tmp_path / "m.onnx"), input_spec=models.SPEC,
                           output_names=["probs"], labels=models.LABELS)
    registry.promote(model, mv.version)
    sharding.write_layout(client, model, sharding.ShardLayout(SHARDS, SHARDS, SHARDS))
    client.close()
    return model, settings


def count_computes(worker: Worker, computed: Counter[str], lock: threading.Lock) -> Worker:
    """Count every request id that goes into a model call of ``worker`` (the model is deterministic,
    so only this count tells a second computation from an answer kept from the first)."""
    original = worker.processor._call

    def counted(loaded, batch):  # type: ignore[no-untyped-def]  # the processor's own signature
        with lock:
            computed.update(r.request_id for r in batch)
        return original(loaded, batch)

    worker.processor._call = counted  # type: ignore[method-assign]  # instance attribute wins
    return worker


class Bots:
    """``BOTS`` threads, each a client of its own sending paced predictions with explicit ids."""

    def __init__(self, url: str, model: str, routes: dict[int, list[str]]) -> None:
        self.url, self.model = url, model
        self.routes = [(k, r) for k, rs in routes.items() for r in rs]
        self.calls: list[Call] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(b,), daemon=True) for b in range(BOTS)]

    def __enter__(self) -> Bots:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        deadline = time.monotonic() + TIMEOUT_S + 5  # each ends its call in flight: all together
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _run(self, bot: int) -> None:
        period_s, next_at = BOTS / RATE_RPS, time.monotonic()
        with Client.from_url(self.url, timeout_s=TIMEOUT_S) as client:
            for i in itertools.count():
                if self.stop.is_set():
                    return
                shard, route = self.routes[(bot + i) % len(self.routes)]
                call = Call(f"b{bot}-{i}-{os.urandom(4).hex()}", route, shard, time.monotonic())
                self._one(client, call)
                next_at += period_s
                self.stop.wait(max(0.0, next_at - time.monotonic()))

    def _one(self, client: Client, call: Call) -> None:
        try:
            call.answered_id = client.predict(self.model, X, route=call.route,
                                              request_id=call.request_id).request_id
        except Exception as e:  # every outcome is recorded and judged afterwards
            call.error = e
        call.ended = time.monotonic()
        with self.lock:
            self.calls.append(call)

    def succeeded_on_every_shard(self) -> bool:
        """At least two answered calls per shard so far."""
        with self.lock:
            ok = Counter(c.shard for c in self.calls if c.error is None)
        return all(ok[k] >= 2 for k in range(SHARDS))


def resend(url: str, model: str, calls: list[Call]) -> dict[str, str]:
    """Re-send each call with its id and ``resend=True``; request id → "OK" or the error."""
    if "resend" not in inspect.signature(Client.predict).parameters:
        return {c.request_id: "Client.predict has no resend parameter" for c in calls}
    outcome = {}
    with Client.from_url(url, timeout_s=TIMEOUT_S) as client:
        for c in calls:
            try:
                p = client.predict(model, X, route=c.route, request_id=c.request_id,  # type: ignore[call-arg]
                                   resend=True)
                outcome[c.request_id] = "OK" if p.request_id == c.request_id else f"answered {p.request_id}"
            except Exception as e:  # reported, not raised: every re-send is judged
                outcome[c.request_id] = f"{type(e).__name__}: {e}"
    return outcome


def interrupted(call: Call) -> bool:
    """The call ended with the client's "lost in failover, may be re-sent" error."""
    return INTERRUPTED is not None and isinstance(call.error, INTERRUPTED)


def describe(e: Exception | None) -> str:
    """``OK`` or the error's class and its first words."""
    return "OK" if e is None else f"{type(e).__name__}: {str(e)[:90]}"


def summary(calls: list[Call], killed_at: float, failed_over_at: float) -> str:
    """Per shard: calls, outcomes, worst latency and longest wait, for the failure message."""
    lines = [f"failover took {failed_over_at - killed_at:.2f} s after the SIGKILL"]
    for k in range(SHARDS):
        mine = [c for c in calls if c.shard == k]
        outcomes = Counter(describe(c.error).split(":")[0] for c in mine)
        worst = max(mine, key=lambda c: c.ended - c.started)
        took_s = worst.ended - worst.started
        lines.append(f"shard {k}: {len(mine)} calls {dict(outcomes)}; worst {took_s:.2f} s "
                     f"({describe(worst.error)}), sent {worst.started - killed_at:+.2f} s from the kill")
    errors_seen = Counter(describe(c.error) for c in calls if c.error is not None)
    lines += [f"  {n} x {what}" for what, n in errors_seen.most_common(8)]
    return "\n".join(lines)


# Waits: the workers' 2 x 10 s, answers on every shard 15 s, 1 s of load, the failover 20 s, 2 s of load,
# the bots' last calls 15 s, each re-send 10 s (a few): about 85 s.
@pytest.mark.timeout(120)
def test_a_master_killed_under_load_stalls_only_its_shard_and_resends_compute_once(replica_cluster, tmp_path):
    cluster = replica_cluster
    model, settings = serve_sharded(cluster, tmp_path)
    routes = routes_per_shard(SHARDS)
    dead = cluster.master_of(keys.request_stream(model, 0))
    alive_shards = {k for k in range(SHARDS) if cluster.master_of(keys.request_stream(model, k)) != dead}
    assert alive_shards == {1, 2}, "the model's shards should sit on three masters"
    computed: Counter[str] = Counter()
    lock = threading.Lock()
    workers = [ThreadedWorker(count_computes(Worker(settings, model), computed, lock)) for _ in range(2)]
    with workers[0], workers[1]:
        with Bots(cluster.url, model, routes) as bots:
            wait_until(bots.succeeded_on_every_shard, 15, interval_s=0.05, message="no answers at first")
            time.sleep(1.0)  # steady load with requests in flight on every shard when the master dies
            killed_at = time.monotonic()
            cluster.kill_node(dead)
            cluster.wait_failover(dead, timeout_s=20)
            failed_over_at = time.monotonic()
            time.sleep(2.0)  # load after the failover: the shard must be served again
        calls = list(bots.calls)
        resent = resend(cluster.url, model, [c for c in calls if interrupted(c)])
    report = summary(calls, killed_at, failed_over_at)
    print(report)
    problems = judge(calls, failed_over_at, alive_shards, resent, computed,
                     full_coverage=cluster.full_coverage)
    assert not problems, "\n".join([*problems, report])


def judge(calls: list[Call], failed_over_at: float, alive_shards: set[int], resent: dict[str, str],
          computed: Counter[str], *, full_coverage: bool) -> list[str]:
    """Every broken promise (a)–(d), each with its numbers."""
    problems = []
    bound_at = failed_over_at + AFTER_FAILOVER_S + MARGIN_S
    hung = [c for c in calls if c.ended > max(bound_at, c.started + AFTER_FAILOVER_S + MARGIN_S)]
    if hung:
        problems.append(f"(a) {len(hung)} calls hung past failover + {AFTER_FAILOVER_S + MARGIN_S:g} s, "
                        f"e.g. {hung[0].ended - hung[0].started:.2f} s: {describe(hung[0].error)}")
    live = [c for c in calls if c.shard in alive_shards]
    # With full coverage the live masters refuse commands until the promotion: such a call may wait
    # (within its deadline) as long as a dead shard's call, never fail.
    live_bound_at = bound_at if full_coverage else 0.0
    bad_live = [c for c in live if c.error is not None
                or c.ended > max(live_bound_at, c.started + LIVE_SHARD_BOUND_S)]
    if bad_live:
        worst = max(bad_live, key=lambda c: c.ended - c.started)
        problems.append(f"(b) {len(bad_live)} of {len(live)} calls on live masters' shards failed or took "
                        f"too long, worst {worst.ended - worst.started:.2f} s: "
                        f"{dict(Counter(describe(c.error) for c in bad_live).most_common(4))}")
    problems += _judge_dead_shard(calls, alive_shards, resent)
    twice = {rid: n for rid, n in computed.items() if n > 1}
    if twice:
        problems.append(f"(d) {len(twice)} ids computed twice or more, e.g. {sorted(twice.items())[:5]}")
    uncounted = [c for c in calls if c.error is None and c.request_id not in computed]
    if uncounted:  # the counting hook must see what it counts, or (d) proves nothing
        problems.append(f"(d) {len(uncounted)} answered calls never reached a counted model call")
    return problems


def _judge_dead_shard(calls: list[Call], alive_shards: set[int], resent: dict[str, str]) -> list[str]:
    """(c): on the dead master's shard, each call is answered or ``Interrupted``, and its re-send answered."""
    problems = []
    if INTERRUPTED is None:
        problems.append("(c) protocol.errors has no Interrupted: a bot cannot tell 'may be re-sent'")
    dead = [c for c in calls if c.shard not in alive_shards]
    other = [c for c in dead if c.error is not None and not interrupted(c)]
    if other:
        problems.append(f"(c) {len(other)} of {len(dead)} calls on the dead master's shard ended neither "
                        f"answered nor Interrupted: {dict(Counter(describe(c.error) for c in other))}")
    failed = {rid: why for rid, why in resent.items() if why != "OK"}
    if failed:
        problems.append(f"(c) {len(failed)} of {len(resent)} re-sent ids were not answered: "
                        f"{dict(Counter(failed.values()))}")
    missing = [c for c in dead if interrupted(c) and c.request_id not in getattr(c.error, "request_ids", ())]
    if missing:
        problems.append(f"(c) {len(missing)} Interrupted errors do not name their request id in request_ids")
    return problems
