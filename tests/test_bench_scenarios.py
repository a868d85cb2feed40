"""Smoke runs of the bench's scenarios (lab/bench_overload.py, lab/bench_cluster.py and the others).

Tiny durations against the test model; only what holds on any machine is checked (counts,
ordering of shedding, where the stream work lands), never a timing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import models
import pytest
import redis
from conftest import MODEL

from lab import bench_multimodel as mm
from lab.bench_bulk import BulkConfig, print_bulk, run_bulk
from lab.bench_cluster import ClusterConfig, capacity_model, print_cluster, run_cluster, spread_model_name
from lab.bench_deadlines import DeadlineConfig, print_deadlines, run_deadlines
from lab.bench_fleetdown import FleetDownConfig, print_fleetdown, run_fleetdown
from lab.bench_overload import Flow, OverloadConfig, print_overload, run_overload, schedule, summarize
from lab.bench_overload import Outcome as O
from lab.bench_peers import SYSTEMS, PeersConfig, print_peers, run_peers
from protocol import connection
from protocol.settings import Settings
from registry import Registry

# A detour of 40 matrix products makes each row cost about 2 ms: the worker, not the clients, is
# the bottleneck, so twice its capacity is an offer the senders can make on a small box.
SLOW_WIDTH = 1536
# The bounds on its waits, each many times what it takes on a busy 2-core box (the whole run takes
# about 15 s on 2 cores): the fleet's start 30 s; the capacity run's 10 calls per thread, 3 s
# each; per phase, the senders' start 20 s, their reports 15 s after the phase's last deadline, 5 s to
# exit and 10 s to drain the streams; the fleet's stop 10 s. About 230 s in all: the test has 300.
TINY = OverloadConfig(capacity_bots=1, capacity_concurrency=16, capacity_requests=150, unloaded_s=1.0,
                      loaded_s=2.5, senders=1, live_timeout_s=1.0, backfill_timeout_s=0.5, backfill_chunk=4,
                      drain_timeout_s=10, start_timeout_s=30, report_slack_s=15, capacity_timeout_s=3)


@pytest.fixture
def slow_production(registry, tmp_path):
    path = models.linear_softmax(tmp_path / "slow.onnx", slow_width=SLOW_WIDTH)
    mv = registry.register(MODEL, path, input_spec=models.SPEC, output_names=["probs"], labels=models.LABELS)
    return registry.promote(MODEL, mv.version)


def test_senders_interleave_and_together_keep_the_rate():
    flow = Flow("live", "live", 1000.0, 0.1)
    times = sorted(t for i in range(4) for t in schedule(flow, 1.0, 4, i))
    assert len(times) == 1000 and times[0] == 0.0 and times[-1] < 1.0
    assert max(b - a for a, b in zip(times, times[1:], strict=False)) == pytest.approx(0.001)


def test_a_failure_counts_as_avoidable_only_beyond_what_the_capacity_forces():
    # 10 requests issued over 1 s (first to last issue) at a capacity of 4/s: 6 failures are forced.
    outcomes = [O("live", i / 9, 0.0, 0.01, "OK" if i < 3 else "OVERLOADED", i % 2 == 0) for i in range(10)]
    c = summarize(outcomes, "live", capacity_rps=4.0)
    assert c["issued"] == 10 and c["ok"] == 3 and c["failed"] == {"OVERLOADED": 7}
    assert c["failures_could_have_met_deadline"] == 1
    assert c["overloaded_client"] + c["overloaded_worker"] == 7
    assert c["first_failure_s"]["OVERLOADED"] == pytest.approx(3 / 9)
    assert c["last_failure_s"]["OVERLOADED"] == 1.0
    assert summarize(outcomes, "live", capacity_rps=100.0)["failures_could_have_met_deadline"] == 7


@pytest.mark.timeout(300)  # TINY's waits, summed above
def test_overload_counts_add_up_and_lanes_shed_backfill_before_live(settings, slow_production, capsys):
    doc = run_overload(settings, MODEL, 1, ("--max-batch", "8"), TINY, progress=lambda _: None)
    assert doc["capacity"]["rps"] > 0 and not doc["capacity"]["errors"]
    for run in ("unloaded", "lanes", "no_lanes"):
        for cls, c in doc[run]["classes"].items():
            assert c["issued"] == c["scheduled"], f"{run}/{cls}: a scheduled request has no outcome"
            assert c["issued"] == c["ok"] + sum(c["failed"].values()), f"{run}/{cls}"
            assert c["overloaded_client"] + c["overloaded_worker"] == c["failed"].get("OVERLOADED", 0)
        assert doc[run]["left_in_streams"] == 0, f"{run}: entries left unanswered in the streams"
    lanes = doc["lanes"]["classes"]
    assert lanes["backfill"]["failed"].get("OVERLOADED", 0) > 0, "2x capacity shed nothing"
    live_first = lanes["live"]["first_failure_s"].get("OVERLOADED")
    assert live_first is None or live_first >= lanes["backfill"]["first_failure_s"]["OVERLOADED"]
    assert lanes["live"]["failed"].get("OVERLOADED", 0) <= lanes["backfill"]["failed"]["OVERLOADED"]
    assert doc["capacity"]["redis"]["cpu_us_per_request"] > 0
    print_overload(doc)
    assert "live p99 loaded / unloaded" in capsys.readouterr().out


# lab/bench_cluster's own bounds: the fleet's start 60 s (and its stop 30 s if it fails), the reshard
# 30 s, the fleet's stop 30 s; about 10 s in all on 2 cores.
@pytest.mark.timeout(180)
def test_cluster_scenario_one_shard_on_one_node_three_shards_on_every_node(redis_cluster, tmp_path, capsys):
    # The session's cluster is shared: nothing is flushed, the model gets a name of its own.
    node = redis.Redis(port=redis_cluster.nodes[0].port)
    model = spread_model_name(node, "scenario", 3)
    node.close()
    client = connection.connect(redis_cluster.url)
    registry = Registry(client, tmp_path / "artifacts")
    mv = registry.register(model, models.linear_softmax(tmp_path / "m.onnx"), input_spec=models.SPEC,
                           output_names=["probs"], labels=models.LABELS)
    registry.promote(model, mv.version)
    client.close()
    settings = Settings(redis_url=redis_cluster.url, artifact_dir=tmp_path / "artifacts")
    # One call of 4 in flight: even the smallest drain rate the workers publish (one entry read in a
    # window of about 1.25 s) does not make the client shed 4 entries against its 10 s timeout.
    cfg = ClusterConfig(bots=1, concurrency=1, client_batch=4, requests=200)
    doc = run_cluster(redis_cluster, settings, model, 1, (), cfg, progress=lambda _: None)
    one, three = doc["runs"]["1"], doc["runs"]["3"]
    for run in (one, three):
        assert run["n"] == 200 and not run["errors"]
    assert len(set(doc["placement"]["shard_ports"])) == 3
    assert sum(1 for n in one["nodes"] if n["xadd_calls"]) == 1, "one shard: one node takes every request"
    assert all(n["xadd_calls"] > 0 and n["stream_calls"] > 0 for n in three["nodes"])
    one_node = capacity_model(doc, None)["cluster_node_1_shard"]
    assert one_node["requests_per_s_per_redis_core"] > 0 and one_node["net_in_bytes_per_request"] > 0
    print_cluster(doc)
    assert "busiest node" in capsys.readouterr().out


# About 60 s (TCP) and 35 s (Unix sockets) on 2 cores, mostly starting servers and client processes;
# lab/bench_peers's own bounds (60 s for each start, each client process's report) add up to more.
@pytest.mark.timeout(300)
def test_peers_scenario_serves_the_same_model_behind_each_system(tmp_path, capsys):
    pytest.importorskip("fastapi", reason="the peers extra")  # `make install` brings it
    cfg = PeersConfig(processes=1, sequential_requests=20, client_processes=1, client_threads=2,
                      saturated_requests=10, rounds=1)  # rounds: see the Unix-socket test
    doc = run_peers(cfg, tmp_path, models=("trivial",), progress=lambda _: None)
    _check_peers(doc, capsys)


@pytest.mark.timeout(300)
def test_peers_scenario_over_unix_sockets(tmp_path, capsys):
    pytest.importorskip("fastapi", reason="the peers extra")
    cfg = PeersConfig(processes=1, sequential_requests=20, client_processes=1, client_threads=2,
                      saturated_requests=10, unix_socket=True, rounds=2)
    seen: list[str] = []
    doc = run_peers(cfg, tmp_path, systems=("streamserve", "fastapi"), models=("trivial",),
                    progress=seen.append)
    # Both serve throughout, measured in alternating rounds (the order reversed every other round).
    measured = [m.split(",")[0].removeprefix("peers: ") for m in seen if "round" in m]
    assert measured == ["streamserve", "fastapi", "fastapi", "streamserve"]
    assert {k: len(v) for k, v in doc["round_ratios"].items()} == {k: 2 for k in doc["ratios"]}
    assert set(doc["results"]) == {"streamserve/trivial", "fastapi/trivial"}
    assert doc["results"]["streamserve/trivial"]["address"] == [f"unix://{tmp_path / 'redis.sock'}?db=0"]
    assert all(a.endswith(".sock") for a in doc["results"]["fastapi/trivial"]["address"])
    for r in doc["results"].values():
        assert r["sequential"]["n"] == 20 and r["saturated"]["n"] == 20
    print_peers(doc)
    assert "Unix sockets" in capsys.readouterr().out


def _check_peers(doc, capsys):
    assert set(doc["results"]) == {f"{s}/trivial" for s in SYSTEMS}
    for r in doc["results"].values():
        assert r["sequential"]["n"] == 20 and r["saturated"]["n"] == 20
        assert r["saturated"]["rps"] > 0 and r["sequential"]["p50_ms"] > 0
    assert set(doc["ratios"]) == {f"trivial_{m}_vs_{p}" for m in ("sequential_p50", "saturated_rps")
                                  for p in ("fastapi", "celery", "loop")}
    print_peers(doc)
    assert "streamserve trivial saturated rps vs celery" in capsys.readouterr().out


# lab/bench_bulk's own bounds: two fixed 3 s sleeps, each phase's report 121 s, the fleet's start
# 60 s and stop 30 s, Redis's start 10 s and stop 5 s: about 350 s in all; the run takes about 17 s.
@pytest.mark.timeout(420)
def test_bulk_scenario_sends_multi_sample_entries_and_compares_with_the_ceiling(tmp_path, model_path, capsys):
    cfg = BulkConfig(samples=8, max_batch=32, bots=1, in_flight=2, seconds=1.0)
    doc = run_bulk(Settings(), model_path, tmp_path, 1, cfg, None, lambda _: None, input_spec=models.SPEC,
                   output_names=["probs"], labels=models.LABELS)
    e2e = doc["end_to_end"]
    assert e2e["entries"] > 0 and e2e["errors"] == 0
    assert e2e["samples_per_s"] > 0 and doc["in_process_samples_per_s"] > 0 and doc["ratio"] > 0
    print_bulk(doc)
    assert "bulk end to end / in-process ceiling" in capsys.readouterr().out


def test_deadline_scenario_measures_how_late_each_client_returns_without_a_worker(capsys):
    cfg = DeadlineConfig(timeouts_ms=(2.0, 20.0), calls=5)
    doc = run_deadlines(cfg, progress=lambda _: None)
    assert {(r["client"], r["timeout_ms"]) for r in doc["rows"]} == {
        (c, t) for c in ("sync", "asyncio") for t in (2.0, 20.0)}
    for row in doc["rows"]:
        assert row["n"] == 5 and not row["errors"], "every call should end DeadlineExceeded, nothing else"
        assert row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert doc["hz"] == 10 and doc["worst_p99_late_ms"] == max(r["p99_ms"] for r in doc["rows"])
    print_deadlines(doc)
    assert "deadline precision: worst p99 late" in capsys.readouterr().out


# lab/bench_fleetdown's own bounds: the fleet's start 60 s and stop 30 s, twice (the drain counts from
# the second start: 60 s for both), the senders' joins 30 s each: 244 s in all; about 11 s on 2 cores.
@pytest.mark.timeout(300)
def test_fleet_down_scenario_keeps_the_stream_within_max_timeout_and_drains_when_workers_return(
        settings, production, capsys):
    cfg = FleetDownConfig(rate_rps=200.0, seconds=4.0, max_timeout_s=1.0, senders=2, batch=10,
                          sample_s=0.25, drain_timeout_s=60.0)
    doc = run_fleetdown(settings, MODEL, 1, (), cfg, progress=lambda _: None)
    assert doc["sent"] > 0 and set(doc["outcomes"]) == {"DeadlineExceeded"}, doc["outcomes"]
    # The property itself: nothing older than max_timeout_s stays (1 s of slack for sampling and ~).
    assert doc["peak_oldest_entry_s"] <= cfg.max_timeout_s + 1.0, doc["peak_oldest_entry_s"]
    assert doc["within_bound"], (doc["peak_bytes"], doc["bound_bytes"])
    assert doc["back"]["entries_left"] == 0 and doc["back"]["empty_s"] is not None
    print_fleetdown(doc)
    assert "fleet back: up in" in capsys.readouterr().out


def test_multimodel_schedule_is_seeded_and_follows_the_zipf_ranks():
    cfg = mm.MultiModelConfig(models=5, rate_rps=1000.0, seconds=2.0)
    plan = mm.schedule(cfg)
    assert plan == mm.schedule(cfg) and len(plan) == 2000 and plan[1][0] == pytest.approx(0.001)
    counts = Counter(m for _, m in plan)
    assert [m for m, _ in counts.most_common()][:2] == [0, 1], "rank 1 (mm_00) is the most requested"
    assert mm.zipf_weights(5, 1.1).sum() == pytest.approx(1.0)
    assert mm.schedule(replace(cfg, seed=1)) != plan


# lab/bench_multimodel's own bounds: each fleet's start 60 s (four starts) and stop 30 s, each load run's
# senders 60 s to connect and report, the flood's connect 60 s: far more than the test's 300 s, which
# only a hung step reaches; the run takes about 40 s on 2 cores.
@pytest.mark.timeout(300)
def test_multimodel_scenario_serves_every_model_in_both_layouts(settings, tmp_path, capsys):
    # The test model stands in for the reference model in the cold start (same role, no torch export).
    ref = mm.ReferenceModel(models.linear_softmax(tmp_path / "ref.onnx"), models.SPEC, ["probs"],
                            models.LABELS)
    cfg = mm.MultiModelConfig(models=4, processes=1, rate_rps=40.0, seconds=2.0, senders=1, hot=1, cold=2,
                              warmup_requests=1, sample_s=0.5, fairness_seconds=1.5, trickle_rps=20.0,
                              flood_processes=1, flood_threads=2, cold_repeats=1, start_timeout_s=60.0)
    doc = mm.run_multimodel(settings, cfg, tmp_path, ("--max-batch", "8"), ref, progress=lambda _: None)
    a, b = doc["layout_a"], doc["layout_b"]
    for layout in (a, b):
        lat = layout["latency"]
        assert lat["issued"] == 80 and not lat["errors"] and not layout["warmup"]["errors"], lat["errors"]
        assert sum(m["n"] for m in lat["per_model"].values()) == 80 and lat["per_model"]["mm_00"]["n"] > 0
        assert layout["memory"]["pss_mb"] > 0 and layout["memory"]["samples"] >= 1
    assert a["memory"]["processes"] == 4 and b["memory"]["processes"] == 1
    assert doc["ratios"]["pss_b_vs_a"] < 1, "one process serving four models outweighed four processes"
    for f in doc["fairness"].values():
        assert f["alone"]["n"] > 0 and f["flooded"]["n"] > 0 and f["flood_rps"] > 0
        assert not f["alone"]["errors"] and not f["flooded"]["errors"]
    cold = doc["cold_start"]
    assert cold["codes"] == {"OK": 12}, cold["codes"]  # 3 models x (never loaded + evicted) x (cold + warm)
    assert cold["mm"]["never_loaded"]["n"] == 2 and cold["mm"]["evicted"]["n"] == 2
    assert cold["reference"]["never_loaded"]["n"] == 1 and cold["reference"]["evicted"]["n"] == 1
    assert cold["mm"]["worker_load"]["n"] == 4, "each cold request's load is reported by the worker"
    mm.print_multimodel(doc)
    assert "PSS B / A" in capsys.readouterr().out
