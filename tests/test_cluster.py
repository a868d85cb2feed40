"""On a real 3-master Redis Cluster: serving, reload, experiments, takeover, sharded streams, resharding.

The cluster is started by conftest's ``redis_cluster`` fixture (three servers in
cluster mode, slots split with CLUSTER ADDSLOTSRANGE): every command here crosses
real slot routing, MOVED-free only because every key of a transaction shares a slot.
"""

from __future__ import annotations

import asyncio
import threading
import time

import models
import numpy as np
import pytest
from conftest import MODEL, ThreadedWorker, wait_until

from experiments.runner import run_analysis, snapshot
from experiments.store import ExperimentStore
from producer import AsyncClient, Client, _core
from protocol import connection, keys, messages, presence, sharding
from protocol.errors import DeadlineExceeded
from protocol.settings import Settings
from registry import Registry
from registry.resharding import reshard
from registry.rollout import publish_reload, wait_for_fleet
from worker.worker import Worker

X = np.random.default_rng(11).standard_normal((60, 110)).astype(np.float32)


@pytest.fixture
def rc(redis_cluster):
    client = connection.connect(redis_cluster.url)
    client.flushall()  # every primary
    yield client
    client.close()


@pytest.fixture
def csettings(redis_cluster, rc, tmp_path) -> Settings:
    return Settings(redis_url=redis_cluster.url, artifact_dir=tmp_path / "artifacts",
                    reclaim_min_idle_ms=300, reclaim_interval_s=0.2, heartbeat_interval_s=0.2,
                    heartbeat_ttl_s=1.0, block_ms=50, grace_period_s=5.0, reconcile_interval_s=0.5,
                    load_interval_s=0.1)


@pytest.fixture
def cregistry(rc, csettings) -> Registry:
    return Registry(rc, csettings.artifact_dir)


@pytest.fixture
def cproduction(cregistry, tmp_path):
    path = models.linear_softmax(tmp_path / "model.onnx")
    mv = cregistry.register(MODEL, path, input_spec=models.SPEC, output_names=["probs"], labels=models.LABELS)
    return cregistry.promote(MODEL, mv.version)


@pytest.fixture
def cclient(redis_cluster):
    with Client.from_url(redis_cluster.url, timeout_s=5.0) as c:
        yield c


def node_of(rc, key: str) -> str:
    return rc.get_node_from_key(key).name


def test_the_client_factory_opens_a_cluster_client_for_the_cluster_scheme(redis_cluster, rc):
    assert connection.is_cluster(rc) and len(rc.get_primaries()) == 3
    assert connection.cluster_url("rediss+cluster://h:7000/0") == "rediss://h:7000"
    assert connection.cluster_url("redis://h:6379/0") is None


def test_a_worker_serves_predictions_on_a_cluster(csettings, cproduction, cclient):
    with ThreadedWorker(Worker(csettings, MODEL)):
        p = cclient.predict(MODEL, X)
        many = cclient.predict_many(MODEL, [X] * 5)
    assert p.model_version == cproduction.version and len(many) == 5
    assert {m.model_version for m in many} == {cproduction.version}


@pytest.mark.timeout(60)  # waits: the worker's 10 s, calls of 5 s, then 5 + 10 + 5 s
def test_reload_and_promote_wait_reach_the_fleet_on_a_cluster(rc, csettings, cregistry, cproduction,
                                                              cclient, tmp_path):
    path2 = models.linear_softmax(tmp_path / "v2.onnx", seed=2)
    v2 = cregistry.register(MODEL, path2, input_spec=models.SPEC, output_names=["probs"],
                            labels=models.LABELS)
    with ThreadedWorker(Worker(csettings.with_overrides(reconcile_interval_s=3600), MODEL)) as worker:
        assert cclient.predict(MODEL, X).model_version == 1
        wait_until(lambda: worker.listener is not None and worker.listener.thread.is_alive(), 5)
        cregistry.promote(MODEL, v2.version)
        # Only the control message can make it switch: the periodic re-read is an hour away.
        wait_until(lambda: publish_reload(rc, MODEL, v2.version) and worker.slot.loaded
                   and worker.slot.loaded.version.version == v2.version, 10, interval_s=0.2)
        report = wait_for_fleet(rc, MODEL, v2.version, timeout_s=5, ttl_s=csettings.heartbeat_ttl_s)
        assert report.ok, report.lines()
        assert cclient.predict(MODEL, X).model_version == v2.version


def test_experiments_serve_journal_and_analyse_on_a_cluster(rc, csettings, cregistry, cproduction,
                                                            cclient, tmp_path):
    path2 = models.linear_softmax(tmp_path / "v2.onnx", seed=2)
    cregistry.register(MODEL, path2, input_spec=models.SPEC, output_names=["probs"], labels=models.LABELS)
    sharding.write_layout(rc, MODEL, sharding.ShardLayout(3, 3, 3))
    exp = ExperimentStore(rc, cregistry).create(MODEL, 1, 2, treatment_share=0.5, unit="request_id")
    with ThreadedWorker(Worker(csettings, MODEL)):
        variants = [cclient.predict(MODEL, X, route=f"S{i}").variant for i in range(40)]
    assert set(variants) == {"control", "treatment"}
    journals = [rc.xlen(keys.experiment_journal(MODEL, exp.id, k)) for k in range(3)]
    assert sum(journals) == 40 and sum(n > 0 for n in journals) >= 2, "each shard journals its own"
    snap = snapshot(rc, exp)
    assert snap.control.exposures + snap.treatment.exposures == 40
    decision = run_analysis(rc, cregistry, MODEL)
    assert decision.decision == "CONTINUE"


def test_a_dead_workers_entries_are_taken_over_on_a_cluster(rc, csettings, cproduction):
    stream, group = keys.request_stream(MODEL), keys.consumer_group(MODEL)
    rc.xgroup_create(stream, group, id="0", mkstream=True)
    for i in range(3):
        fields = messages.encode_request(f"t{i}", {"features": X[None]},
                                         deadline_ms=int(time.time() * 1000) + 60_000)
        rc.xadd(stream, fields)
    assert len(rc.xreadgroup(group, "dead-worker", {stream: ">"})[0][1]) == 3
    time.sleep(0.4)  # past the 300 ms reclaim idle time: the backstop may claim them
    Worker(csettings, MODEL, burst=True).run()
    assert [rc.llen(keys.reply_key(MODEL, f"t{i}")) for i in range(3)] == [1, 1, 1]
    assert rc.xlen(stream) == 0 and rc.xpending(stream, group)["pending"] == 0


@pytest.fixture
def patient_layout_reads(monkeypatch):
    """These tests are about routing by the layout. On a loaded box the client's first layout read can
    take longer than its 100 ms bound, and the client then (rightly) routes as if unsharded."""
    monkeypatch.setattr(_core, "STATE_READ_MAX_S", 5.0)


def test_shards_spread_over_nodes_and_a_route_keeps_its_shard(rc, csettings, cproduction, cclient,
                                                              patient_layout_reads):
    sharding.write_layout(rc, MODEL, sharding.ShardLayout(3, 3, 3))
    nodes = {node_of(rc, keys.request_stream(MODEL, k)) for k in range(3)}
    assert len(nodes) >= 2, "shard hash tags should land on different nodes"
    with ThreadedWorker(Worker(csettings, MODEL)) as worker:
        for i in range(30):
            cclient.predict(MODEL, X, route=f"SYM{i % 6}")
        assert sorted(worker.consumers) == [0, 1, 2]
    served = {k: int(sum(int(v) for v in rc.hgetall(keys.batch_histogram(MODEL, k)).values()))
              for k in range(3)}
    assert sum(served.values()) > 0 and sum(1 for n in served.values() if n) >= 2
    expected = {sharding.shard_for(f"SYM{i}", 3) for i in range(6)}
    assert {k for k, n in served.items() if n} == expected, "each symbol's shard is CRC-32 mod S"


def test_pinned_workers_read_only_their_shards(rc, csettings, cproduction):
    sharding.write_layout(rc, MODEL, sharding.ShardLayout(3, 3, 3))
    worker = Worker(csettings.with_overrides(shards="1,2"), MODEL, burst=True)
    worker.run()
    assert sorted(worker.consumers) == [1, 2]


# Waits: the worker's 10 s, growing 20 s, 10 s, shrinking 2 + 20 s, the stale calls 5 s, the bot's
# last call 10 s (its join 15 s): about 85 s.
@pytest.mark.timeout(120)
def test_growing_and_shrinking_a_live_model_loses_nothing(rc, redis_cluster, csettings, cproduction):
    results: list = []
    stop = threading.Event()

    def bot() -> None:
        with Client.from_url(redis_cluster.url, timeout_s=10.0) as c:
            i = 0
            while not stop.is_set():
                results.append(c.predict(MODEL, X, route=f"R{i % 7}"))
                i += 1

    with ThreadedWorker(Worker(csettings, MODEL)) as worker:
        thread = threading.Thread(target=bot, daemon=True)
        thread.start()
        grown = reshard(rc, MODEL, 3, timeout_s=20, ttl_s=csettings.heartbeat_ttl_s)
        assert grown.ok, grown.lines()
        assert sorted(worker.consumers) == [0, 1, 2]
        wait_until(lambda: any(rc.hlen(keys.batch_histogram(MODEL, k)) for k in (1, 2)), 10)
        # A bot with a stale layout still sends to shard 2 after the shrink: it must be answered.
        stale = Client.from_url(redis_cluster.url, timeout_s=5.0)
        stale._router.set_layout(MODEL, {"route": "3", "serve": "3", "highest": "3"})
        stale._router.layout_stale = lambda model: False  # type: ignore[method-assign]  # never re-reads
        shrunk = reshard(rc, MODEL, 1, timeout_s=20, ttl_s=csettings.heartbeat_ttl_s)
        assert shrunk.ok, shrunk.lines()
        late = [stale.predict(MODEL, X, route=r) for r in ("a", "b", "c", "d", "e", "f")]
        stale.close()
        stop.set()
        thread.join(15)  # past its call's own timeout
    assert sharding.read_layout(rc, MODEL) == sharding.ShardLayout(1, 1, 3)
    assert all(p.model_version == 1 for p in results + late) and len(results) > 10
    for k in range(3):
        assert rc.xlen(keys.request_stream(MODEL, k)) == 0


def test_heartbeats_say_which_shards_a_worker_reads(rc, csettings, cproduction):
    sharding.write_layout(rc, MODEL, sharding.ShardLayout(2, 2, 2))
    with ThreadedWorker(Worker(csettings, MODEL)):
        beats = wait_until(lambda: [w for w in presence.read_live(rc, MODEL, 5.0) if w.shards == "0,1"], 5)
    assert beats[0].shard_list == [0, 1]


def test_the_asyncio_client_predicts_on_a_sharded_cluster(rc, redis_cluster, csettings, cproduction,
                                                          patient_layout_reads):
    sharding.write_layout(rc, MODEL, sharding.ShardLayout(3, 3, 3))

    async def scenario():
        async with AsyncClient.from_url(redis_cluster.url, timeout_s=5.0) as client:
            one = [await client.predict(MODEL, X, route=f"A{i}") for i in range(6)]
            many = await client.predict_many(MODEL, [X] * 4, route="B")
            return one, many

    with ThreadedWorker(Worker(csettings, MODEL)):
        one, many = asyncio.run(scenario())
    assert {p.model_version for p in one + many} == {cproduction.version}
    used = {k for k in range(3) if rc.hlen(keys.batch_histogram(MODEL, k))}
    assert used == {sharding.shard_for(f"A{i}", 3) for i in range(6)} | {sharding.shard_for("B", 3)}


def _move_slot(plain: dict, slot: int, to_port: int) -> None:
    """Give ``slot`` (emptied first) to the node on ``to_port``, as resharding does."""
    for client in plain.values():
        for key in client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000):
            client.delete(key)
    node_id = plain[to_port].execute_command("CLUSTER", "MYID")
    for client in plain.values():
        client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", node_id)


def test_a_request_follows_its_slot_to_another_node(rc, redis_cluster):
    model = "moved-model"  # its own slot: moving it leaves the other tests' keys where they are
    stream = keys.request_stream(model)
    slot, home = connection.slot(stream), rc.get_node_from_key(stream).port
    plain = {node.port: client for node, client in zip(redis_cluster.nodes, redis_cluster.node_clients(),
                                                       strict=True)}
    away = next(port for port in plain if port != home)
    with Client.from_url(redis_cluster.url, timeout_s=0.2, fail_fast=False) as client:  # not registered
        with pytest.raises(DeadlineExceeded):  # no worker: it only learns the slot map and layout
            client.predict(model, X)
        _move_slot(plain, slot, away)
        try:
            with pytest.raises(DeadlineExceeded):  # not Unavailable: MOVED, refreshed, sent again
                client.predict(model, X)
            assert plain[away].xlen(stream) == 1 and plain[home].execute_command(
                "CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        finally:
            _move_slot(plain, slot, home)
            rc.nodes_manager.initialize()
