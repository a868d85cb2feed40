"""``streamserve bench``'s cluster scenario: one model on a 3-master Redis Cluster, 1 shard versus 3.

The same fleet and the same client budget as the bench's saturated run (``bots`` ×
``concurrency`` calls of ``predict_many(client_batch)`` in flight) push one model
first through one stream shard, then, after a live ``reshard`` to three, through
three. What sharding spreads is the stream work, so besides throughput and latency
each node's Redis CPU and network bytes per request are read from its ``INFO``
(``used_cpu_sys + used_cpu_user``, ``total_net_input_bytes`` / ``output``) and
its stream commands from ``INFO commandstats``. On one small box the nodes, the
workers and the bots share the cores, so throughput is capped by CPU whatever the
layout; the per-node split is the number that carries over to real machines.

Shard k of a model lives in the slot of its hash tag (``{model}``, ``{model:k}``),
and with one model's three tags over three nodes the slots fall on three
different nodes only by chance (2 in 9). The scenario therefore serves the first
of ``bench``, ``bench-1``, … whose three shards sit on three nodes of this cluster
(read from ``CLUSTER SLOTS``, not assumed) and reports the placement.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from lab.embedded_redis import EmbeddedCluster
from lab.fleet import Fleet
from lab.loadgen import LoadSpec, run_load
from protocol import connection, keys, sharding
from protocol.errors import ConfigError
from protocol.settings import Settings
from registry.resharding import reshard

# Commands that move a stream's entries: what a shard's node does per request.
STREAM_COMMANDS = ("xadd", "xreadgroup", "xack", "xdel", "xackdel", "xautoclaim", "xclaim")
WIDE = 150  # columns for the table, also when stdout is not a terminal (rich's default is then 80)
EXAMPLE_FLEET_RPS = 395_000  # one H200's ceiling for the reference model (issue 11), for the example


@dataclass(frozen=True, slots=True)
class NodeCounters:
    """What one Redis node has done so far (monotonic counters from ``INFO``)."""

    cpu_s: float = 0.0
    net_in_bytes: int = 0
    net_out_bytes: int = 0
    xadd_calls: int = 0
    stream_calls: int = 0

    def __sub__(self, before: NodeCounters) -> NodeCounters:
        return NodeCounters(*(getattr(self, f.name) - getattr(before, f.name) for f in fields(self)))


def read_counters(client: redis.Redis) -> NodeCounters:
    """One node's CPU, network and stream-command counters (three ``INFO`` sections, one round trip)."""
    pipe = client.pipeline(transaction=False)
    for section in ("cpu", "stats", "commandstats"):
        pipe.info(section)
    cpu, stats, commands = pipe.execute()
    calls = {name: int(commands.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in STREAM_COMMANDS}
    return NodeCounters(float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
                        int(stats["total_net_input_bytes"]), int(stats["total_net_output_bytes"]),
                        calls["xadd"], sum(calls.values()))


def per_request(used: NodeCounters, requests: int) -> dict[str, float]:
    """A node's counters over ``requests`` predictions: CPU µs, bytes in and out, stream commands."""
    n = max(1, requests)
    return {"cpu_us_per_request": used.cpu_s / n * 1e6, "net_in_bytes_per_request": used.net_in_bytes / n,
            "net_out_bytes_per_request": used.net_out_bytes / n, "xadd_calls": used.xadd_calls,
            "stream_calls": used.stream_calls}


def slot_owners(client: redis.Redis) -> list[tuple[int, int, int]]:
    """``(first slot, last slot, port)`` of every slot range, from any node's ``CLUSTER SLOTS``."""
    ranges = client.execute_command("CLUSTER", "SLOTS")
    return [(int(r[0]), int(r[1]), int(r[2][1])) for r in ranges]


def shard_ports(owners: list[tuple[int, int, int]], model: str, shards: int) -> list[int]:
    """The port of the node holding each shard's request stream."""
    def port(key: str) -> int:
        slot = connection.slot(key)
        return next(p for first, last, p in owners if first <= slot <= last)

    return [port(keys.request_stream(model, k)) for k in range(shards)]


def spread_model_name(client: redis.Redis, base: str, shards: int, tries: int = 500) -> str:
    """The first of ``base``, ``base-1``, … whose ``shards`` shards sit on as many nodes as can be."""
    owners = slot_owners(client)
    wanted = min(shards, len({p for *_, p in owners}))
    for i in range(tries):
        name = base if i == 0 else f"{base}-{i}"
        if len(set(shard_ports(owners, name, shards))) == wanted:
            return name
    raise ConfigError(f"no name {base}[-i] puts {shards} shards on {wanted} nodes within {tries} tries")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """The client budget: the bench's saturated run's bots, in-flight calls and predict_many size."""

    bots: int = 2
    concurrency: int = 4
    client_batch: int = 16
    requests: int = 4000  # predictions per bot and per layout
    shards: int = 3

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClusterConfig:
        """From ``streamserve bench``'s flags."""
        return cls(args.bots, args.concurrency, args.client_batch, args.cluster_requests)


def saturate(cluster: EmbeddedCluster, model: str, cfg: ClusterConfig) -> dict[str, Any]:
    """Run the client budget against ``model``; throughput, latency and every node's share of the work."""
    nodes = cluster.node_clients()
    try:
        before = [read_counters(c) for c in nodes]
        # No routing key: round-robin over the shards, so every shard gets the same share.
        spec = LoadSpec(cluster.url, model, requests=cfg.requests, concurrency=cfg.concurrency,
                        timeout_s=10.0, batch_every=1 if cfg.client_batch > 1 else 0,
                        batch_size=cfg.client_batch, routes=("",))
        result = run_load(spec, cfg.bots)
        used = [read_counters(c) - b for c, b in zip(nodes, before, strict=True)]
    finally:
        for c in nodes:
            c.close()
    per_node = [{"port": node.port, **per_request(u, result.requests)}
                for node, u in zip(cluster.nodes, used, strict=True)]
    cpu = [n["cpu_us_per_request"] for n in per_node]
    # A bot thread that gets an exception (e.g. Overloaded raised by the client itself) stops early.
    return {"throughput_rps": len(result.latencies_ms) / result.elapsed_s, "p50_ms": result.percentile(50),
            "p99_ms": result.percentile(99), "n": result.requests, "errors": dict(result.errors),
            "not_sent": cfg.requests * cfg.bots - result.requests,
            "nodes": per_node, "busiest_node_cpu_us_per_request": max(cpu),
            "total_cpu_us_per_request": sum(cpu)}


def run_cluster(cluster: EmbeddedCluster, settings: Settings, model: str, processes: int,
                fleet_args: Sequence[str], cfg: ClusterConfig,
                progress: Callable[[str], object] = print) -> dict[str, Any]:
    """Serve ``model`` (registered and in Production on ``cluster``) from 1 shard, then from ``cfg.shards``.

    One fleet of ``processes`` workers serves both runs; between them the model is
    resharded live (``registry.resharding.reshard``), the documented procedure.
    """
    client = connection.connect(cluster.url)
    try:
        sharding.write_layout(client, model, sharding.ShardLayout())
        runs, steps = {}, []
        with Fleet(settings.with_overrides(redis_url=cluster.url), model, processes, *fleet_args):
            progress(f"cluster: {cfg.bots} clients x {cfg.concurrency} in flight, 1 shard …")
            runs["1"] = saturate(cluster, model, cfg)
            report = reshard(client, model, cfg.shards, timeout_s=30.0)
            steps = report.lines()
            if not report.ok:
                raise ConfigError("resharding did not finish: " + "; ".join(steps))
            progress(f"cluster: the same, {cfg.shards} shards …")
            runs[str(cfg.shards)] = saturate(cluster, model, cfg)
        placement = _placement(cluster, model, cfg.shards)
    finally:
        client.close()
    one, many = runs["1"], runs[str(cfg.shards)]
    ratios = {"throughput": many["throughput_rps"] / one["throughput_rps"],
              "p99": many["p99_ms"] / one["p99_ms"],
              "busiest_node_cpu_per_request": many["busiest_node_cpu_us_per_request"]
              / one["busiest_node_cpu_us_per_request"],
              "total_cpu_per_request": many["total_cpu_us_per_request"] / one["total_cpu_us_per_request"]}
    return {"server": cluster.version(), "model": model, "processes": processes, "config": asdict(cfg),
            "placement": {"ports": [n.port for n in cluster.nodes], "shard_ports": placement},
            "reshard": steps, "runs": runs, "ratios": {f"{cfg.shards}_vs_1_shard": ratios}}


def _placement(cluster: EmbeddedCluster, model: str, shards: int) -> list[int]:
    node = redis.Redis(port=cluster.nodes[0].port)
    try:
        return shard_ports(slot_owners(node), model, shards)
    finally:
        node.close()


def capacity_model(cluster: dict[str, Any] | None, overload: dict[str, Any] | None) -> dict[str, Any]:
    """What one Redis node carries for the reference model, from the measured CPU and bytes per request.

    Redis runs commands on one thread, so one node tops out near ``1e6 / cpu µs per
    request`` requests/s, and moves that rate times the bytes per request. This assumes
    the CPU per request stays what it was when measured (under saturation it tends to
    fall a little, as replies and reads batch up).
    """
    sources = {}
    if cluster is not None:
        run = cluster["runs"]["1"]
        busiest = max(run["nodes"], key=lambda n: n["cpu_us_per_request"])
        cfg = cluster["config"]
        sources["cluster_node_1_shard"] = _node_capacity(
            busiest, f"the node holding the one shard, Redis Cluster, {cfg['bots']}x{cfg['concurrency']} "
                     f"predict_many({cfg['client_batch']})")
    if overload is not None:
        sources["standalone_single_requests"] = _node_capacity(
            overload["capacity"]["redis"], "one standalone Redis, single-sample predict calls, saturated")
    return sources


def _node_capacity(node: dict[str, Any], measured_as: str) -> dict[str, Any]:
    cpu_us = node["cpu_us_per_request"]
    rps = 1e6 / cpu_us if cpu_us > 0 else float("inf")
    bytes_per_request = node["net_in_bytes_per_request"] + node["net_out_bytes_per_request"]
    return {"measured_as": measured_as, "redis_cpu_us_per_request": cpu_us,
            "net_in_bytes_per_request": node["net_in_bytes_per_request"],
            "net_out_bytes_per_request": node["net_out_bytes_per_request"],
            "requests_per_s_per_redis_core": rps, "bytes_per_s_at_that_rate": rps * bytes_per_request,
            "example": {"fleet_rps": EXAMPLE_FLEET_RPS,
                        "shards_needed": math.ceil(EXAMPLE_FLEET_RPS / rps) if math.isfinite(rps) else 1}}


def print_cluster(section: dict[str, Any]) -> None:
    """The cluster scenario as a table, then the ratios."""
    runs = section["runs"]
    ports = section["placement"]["ports"]
    table = Table(title=f"cluster scenario — {len(ports)} masters ({section['server']}), "
                        f"{section['processes']} worker processes, model {section['model']}")
    for col in ("shards", "throughput/s", "p50 ms", "p99 ms", "Redis CPU µs/req per node",
                "busiest", "in+out KB/req per node"):
        table.add_column(col, justify="right")
    for shards, run in runs.items():
        cpu = " / ".join(f"{n['cpu_us_per_request']:.0f}" for n in run["nodes"])
        kb = " / ".join(f"{(n['net_in_bytes_per_request'] + n['net_out_bytes_per_request']) / 1e3:.1f}"
                        for n in run["nodes"])
        table.add_row(shards, f"{run['throughput_rps']:.0f}", f"{run['p50_ms']:.2f}", f"{run['p99_ms']:.2f}",
                      cpu, f"{run['busiest_node_cpu_us_per_request']:.0f}", kb)
    Console(width=max(Console().width, WIDE)).print(table)
    print(f"nodes (ports) {ports}; shard k's stream on port {section['placement']['shard_ports']}")
    for shards, run in runs.items():
        if run["not_sent"]:
            print(f"WARNING: with {shards} shard(s), {run['not_sent']} predictions were never sent "
                  "(a client thread stopped on an exception; see the log above)")
    for name, r in section["ratios"].items():
        print(f"{name}: throughput x{r['throughput']:.2f}, p99 x{r['p99']:.2f}, busiest node's Redis CPU "
              f"per request x{r['busiest_node_cpu_per_request']:.2f}, all nodes together "
              f"x{r['total_cpu_per_request']:.2f} (on 2 cores throughput is capped by CPU)")


def print_capacity_model(model: dict[str, Any]) -> None:
    """One line per measurement of what a Redis node carries."""
    for name, m in model.items():
        print(f"capacity model ({name}: {m['measured_as']}): Redis {m['redis_cpu_us_per_request']:.0f} µs "
              f"CPU and {(m['net_in_bytes_per_request'] + m['net_out_bytes_per_request']) / 1e3:.1f} KB "
              f"per request → one Redis core ≈ {m['requests_per_s_per_redis_core']:.0f} requests/s, "
              f"{m['bytes_per_s_at_that_rate'] / 1e6:.0f} MB/s; {m['example']['fleet_rps']}/s needs "
              f"≈ {m['example']['shards_needed']} shards on as many nodes")
