"""Heartbeats of multi-model workers: the cache fields, read as untrusted, and what counts as serving.

Heartbeats are written here as a worker writes them (``Heartbeat.to_hash`` + the zset member):
no worker runs, so each case is exactly the hash it names.
"""

from __future__ import annotations

import json

import pytest
import redis
from conftest import MODEL

from lab.fleet import Fleet
from producer import Client
from producer.health import read_health
from protocol import connection, keys, presence
from protocol.presence import Heartbeat
from streamserve.cli import main

OTHER = "othermodel"


def beat(r: redis.Redis, hb: Heartbeat, ttl_ms: int = 60_000) -> None:
    """Write ``hb`` as a worker does: the hash (with its TTL), then the member scored with its time."""
    key = keys.worker_hash(hb.model, hb.worker_id)
    r.hset(key, mapping=hb.to_hash())
    r.pexpire(key, ttl_ms)
    r.zadd(keys.workers_zset(hb.model), {hb.worker_id: hb.heartbeat_ms})


def live(worker_id: str, model: str = MODEL, **fields: object) -> Heartbeat:
    return Heartbeat(worker_id, model=model, state="serving", heartbeat_ms=presence.now_in_ms(), **fields)


def test_a_heartbeat_round_trips_through_redis(r):
    hb = live("w1", version=3, cache="loaded", loaded_at_ms=1_764_150_000_000, load_ms=850.5, size_mb=43.25,
              models=3, pinned=True, load_error="")
    beat(r, hb)
    assert Heartbeat.from_hash(r.hgetall(keys.worker_hash(MODEL, "w1"))) == hb
    assert r.hget(keys.worker_hash(MODEL, "w1"), "pinned") == b"1"
    beat(r, live("w2", cache="cold"))
    assert r.hget(keys.worker_hash(MODEL, "w2"), "pinned") == b"", "a flag off is the empty string"


def test_an_older_workers_hash_parses_with_defaults_and_counts_as_before(r):
    """The hash a single-model worker wrote before the cache fields existed."""
    old = {"worker_id": "old", "model": MODEL, "version": "2", "target_version": "2", "failed_version": "",
           "backend": "onnxruntime", "variant": "primary", "fallback": "", "error": "", "state": "serving",
           "host": "h", "pid": "12", "batches": "3", "requests": "4", "heartbeat_ms": presence.now_in_ms(),
           "shards": "0"}
    r.hset(keys.worker_hash(MODEL, "old"), mapping=old)
    r.zadd(keys.workers_zset(MODEL), {"old": old["heartbeat_ms"]})
    health = read_health(r, MODEL)
    [w] = health.workers
    assert (w.version, w.pid, w.computed, w.cache) == (2, 12, 0, "")
    assert (w.loaded_at_ms, w.load_ms, w.size_mb) == (0, 0.0, 0.0)
    assert (w.load_error, w.models, w.pinned) == ("", 1, False), "an older worker serves one model"
    assert health.ok and [b.worker_id for b in health.loaded_workers] == ["old"]
    r.hset(keys.worker_hash(MODEL, "old"), mapping={"version": "", "state": "loading"})
    health = read_health(r, MODEL)
    assert not health.ok and health.serving_workers == [], "nothing loaded and no cache state: as before"


HOSTILE = {"version": "v3", "target_version": "9" * 5000, "pid": "-", "batches": "1e3", "requests": "nan",
           "heartbeat_ms": "now", "loaded_at_ms": str(2**70), "load_ms": "nan", "size_mb": "inf",
           "models": "many", "pinned": "yes", "cache": "x" * 100_000, "load_error": b"\xff\xfe" * 10_000,
           "error": b"\xc3\x28", "shards": "0,a,99999,1"}


def test_hostile_values_take_defaults_and_never_raise(r):
    fields = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in HOSTILE.items()}
    hb = Heartbeat.from_hash({b"worker_id": b"w\xff", **fields})
    assert hb.worker_id == "w\ufffd", "bytes that are not UTF-8 are replaced, not raised on"
    assert (hb.version, hb.target_version, hb.pid, hb.batches, hb.requests, hb.heartbeat_ms) == (
        None, None, 0, 0, 0, 0)
    assert (hb.loaded_at_ms, hb.load_ms, hb.size_mb, hb.models, hb.pinned) == (0, 0.0, 0.0, 1, False)
    assert len(hb.cache) == len(hb.load_error) == presence.MAX_TEXT_CHARS
    assert hb.shard_list == [0, 1]
    assert Heartbeat.from_hash({}) == Heartbeat(""), "an empty (expired) hash"


def test_a_hostile_heartbeat_does_not_break_health_or_status(r, registry, production, settings, capsys):
    key = keys.worker_hash(MODEL, "evil")
    r.hset(key, mapping={**HOSTILE, "worker_id": "evil", "heartbeat_ms": presence.now_in_ms(),
                         "state": "serving"})
    r.zadd(keys.workers_zset(MODEL), {"evil": presence.now_in_ms()})
    [w] = read_health(r, MODEL).workers
    assert w.version is None and not w.can_serve
    args = ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir), "status"]
    code = main([*args, "--json"])
    doc = json.loads(capsys.readouterr().out)  # strict: NaN or Infinity would not be JSON
    assert code == 1 and doc["models"][MODEL]["workers"][0]["load_ms"] == 0.0
    r.hset(key, mapping={"cache": "loaded", "loaded_at_ms": str(2**62), "load_error": "line 1\nline 2"})
    assert main(args) == 1
    out = capsys.readouterr().out
    assert f"loaded at {2**62} ms" in out and "load error: line 1 line 2" in out, "no date, no traceback"


@pytest.mark.parametrize("cache", ["evicted", "cold", "loading"])
def test_a_worker_without_the_model_in_memory_still_serves_it(r, cache):
    beat(r, live("w1", cache=cache, models=3))
    health = read_health(r, MODEL)
    assert health.ok, f"a {cache} model is loaded by its first request"
    assert [w.worker_id for w in health.serving_workers] == ["w1"] and health.loaded_workers == []
    assert health.versions == set()


def test_a_failed_load_without_a_version_is_not_serving(r):
    beat(r, live("w1", cache="failed", load_error="ONNX file is corrupt", failed_version=2))
    health = read_health(r, MODEL)
    assert not health.ok and health.serving_workers == []
    beat(r, live("w2", version=1, cache="failed", load_error="v2: ONNX file is corrupt", failed_version=2))
    health = read_health(r, MODEL)
    assert health.ok and [w.worker_id for w in health.loaded_workers] == ["w2"], "still serves what it has"


def test_a_stopping_worker_serves_nothing(r):
    beat(r, Heartbeat("w1", model=MODEL, version=1, cache="loaded", state="stopping",
                      heartbeat_ms=presence.now_in_ms()))
    assert not read_health(r, MODEL).ok


def test_refresh_many_renews_every_models_hash_and_member(r):
    old_ms = presence.now_in_ms() - 1500
    for model in (MODEL, OTHER):
        beat(r, Heartbeat("w1", model=model, version=1, cache="loaded", state="serving", size_mb=5.0,
                          heartbeat_ms=old_ms), ttl_ms=2000)
    assert presence.live_ids_many(r, [MODEL, OTHER], ttl_s=1.0) == {MODEL: set(), OTHER: set()}
    now_ms = presence.refresh_many(r, [MODEL, OTHER], "w1", ttl_s=30.0)
    for model in (MODEL, OTHER):
        key = keys.worker_hash(model, "w1")
        hb = Heartbeat.from_hash(r.hgetall(key))
        assert (hb.heartbeat_ms, hb.version, hb.cache, hb.size_mb, hb.state) == (now_ms, 1, "loaded", 5.0,
                                                                                 "serving"), "the rest kept"
        assert 29_000 < r.pttl(key) <= 30_000
        assert r.zscore(keys.workers_zset(model), "w1") == now_ms
    assert presence.live_ids_many(r, [MODEL, OTHER], ttl_s=1.0) == {MODEL: {"w1"}, OTHER: {"w1"}}
    assert presence.live_ids_many(r, []) == {}
    assert presence.refresh(r, MODEL, "w1", 30.0) >= now_ms, "the one-model form"


def test_refresh_many_on_a_cluster_crosses_slots(redis_cluster):
    with connection.connect(redis_cluster.url) as rc:
        rc.flushall()
        models = [f"m{i}" for i in range(6)]  # hash tags spread over the three masters
        now_ms = presence.refresh_many(rc, models, "w1", ttl_s=30.0)
        assert all(rc.zscore(keys.workers_zset(m), "w1") == now_ms for m in models)
        assert all(rc.hget(keys.worker_hash(m, "w1"), "heartbeat_ms") == str(now_ms).encode() for m in models)
        assert presence.live_ids_many(rc, models, ttl_s=5.0) == {m: {"w1"} for m in models}


def test_status_shows_the_cache_of_every_worker(r, registry, production, settings, capsys):
    loaded_at_ms = 1_764_150_000_000
    beat(r, live("w-loaded", version=production.version, cache="loaded", loaded_at_ms=loaded_at_ms,
                 load_ms=850.0, size_mb=43.2, models=3, pinned=True))
    beat(r, live("w-evicted", cache="evicted", loaded_at_ms=loaded_at_ms, load_ms=900.0, models=3,
                 load_error="out of memory"))
    args = ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir), "status"]
    assert main([*args, "--json"]) == 0
    model = json.loads(capsys.readouterr().out)["models"][MODEL]
    assert (model["ok"], model["serving_workers"], model["loaded_workers"]) == (True, 2, 1)
    workers = {w["worker_id"]: w for w in model["workers"]}
    cache_keys = ("cache", "loaded_at_ms", "load_ms", "size_mb", "load_error", "models", "pinned")
    assert {k: workers["w-loaded"][k] for k in cache_keys} == {
        "cache": "loaded", "loaded_at_ms": loaded_at_ms, "load_ms": 850.0, "size_mb": 43.2, "load_error": "",
        "models": 3, "pinned": True}
    assert {k: workers["w-evicted"][k] for k in cache_keys} == {
        "cache": "evicted", "loaded_at_ms": loaded_at_ms, "load_ms": 900.0, "size_mb": 0.0,
        "load_error": "out of memory", "models": 3, "pinned": False}
    assert main(args) == 0
    out = capsys.readouterr().out
    assert ("    cache loaded, pinned; loaded at 2025-11-26 09:40:00 UTC in 850 ms; 43.2 MB; "
            "process serves 3 models") in out
    assert "    cache evicted; loaded at 2025-11-26 09:40:00 UTC in 900 ms; process serves 3 models; " \
           "load error: out of memory" in out


def test_a_multi_model_fleet_is_started_with_models_and_waits_for_each(r, settings):
    fleet = Fleet(settings, MODEL, 2, "--pin", MODEL, models=[MODEL, OTHER])
    assert fleet.args[fleet.args.index("worker"):] == [
        "worker", "--models", f"{MODEL},{OTHER}", "--processes", "2", "--pin", MODEL]
    assert "--model" in Fleet(settings, MODEL, 2).args, "without models: as before"
    with Client.from_url(settings.redis_url) as client:
        for wid in ("w1", "w2"):
            beat(r, live(wid, version=1, cache="loaded", models=2))
            beat(r, live(wid, model=OTHER, cache="cold", models=2))
        assert fleet.serving(client), "cold counts: its first request loads it"
        beat(r, live("w2", model=OTHER, cache="failed", load_error="corrupt", models=2))
        assert not fleet.serving(client), "one worker cannot serve OTHER"
        beat(r, live("w3", model=OTHER, cache="loading", models=2))
        assert fleet.serving(client)
