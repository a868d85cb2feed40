"""``python -m lab.overlap``: what the worker's ``overlap_io`` buys where a worker has a core to itself.

One burst worker process pinned to core 0 drains a backlog written up front; Redis and this
process (the writer, then the watcher) are pinned to core 1. The drain rate is timed from the
first entry answered to the last (the worker deletes each entry it answers, so ``XLEN`` tells
how far it is: polled every millisecond), and the worker's CPU is read from ``/proc`` at both
ends, so neither its start-up nor its model load counts. Overlap on and off alternate in pairs
(on, off, off, on, …) so that a busy spell weighs on both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from redis import Redis

from lab.bench import cpu_seconds, reference_artifact
from lab.bench_peers import trivial_onnx
from lab.embedded_redis import EmbeddedRedis
from lab.fleet import pin
from modeltools import reference
from protocol import keys, messages
from protocol.errors import ConfigError
from registry import Registry

MODELS = ("trivial", "reference")
DEFAULT_ENTRIES = {"trivial": 20_000, "reference": 3_000}
WORKER_CORE, REDIS_CORE = 0, 1
POLL_S = 0.001
DRAIN_TIMEOUT_S = 300.0


def fill(r: Redis, model: str, entries: int) -> None:
    """``entries`` one-sample requests on ``model``'s stream, deadlines far off."""
    x = np.random.default_rng(0).standard_normal((1, reference.TIMESTEPS, reference.N_FEATURES))
    inputs = {reference.INPUT_NAME: x.astype(np.float32)}
    deadline_ms = int(time.time() * 1000) + 3_600_000
    for first in range(0, entries, 1000):
        pipe = r.pipeline(transaction=False)
        for i in range(first, min(entries, first + 1000)):
            fields = messages.encode_request(f"o{i}", inputs, deadline_ms=deadline_ms)
            pipe.xadd(keys.request_stream(model), fields)
        pipe.execute()


@contextmanager
def pinned_worker(redis_url: str, artifact_dir: Path, model: str,
                  overlap: bool) -> Iterator[subprocess.Popen[bytes]]:
    """A burst worker process on the worker core (its threads inherit the affinity it starts with)."""
    args = [sys.executable, "-m", "streamserve", "--redis-url", redis_url,
            "--artifact-dir", str(artifact_dir), "worker", "--model", model, "--burst",
            "--max-batch", "32", "--max-wait-ms", "0", "--overlap-io" if overlap else "--no-overlap-io"]
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {WORKER_CORE})
    try:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finally:
        os.sched_setaffinity(0, own)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def drain(r: Redis, proc: subprocess.Popen[bytes], stream: str, entries: int) -> dict[str, float]:
    """Watch the backlog go: entries per second from the first answered to the last, and the share
    of that time the worker's core was busy."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while (left := r.xlen(stream)) >= entries:
        _alive(proc, deadline)
        time.sleep(POLL_S)
    t0, cpu0 = time.perf_counter(), cpu_seconds(proc.pid)
    if not left:
        raise ConfigError(f"the worker drained all {entries} entries between two looks: give it more")
    while r.xlen(stream):
        _alive(proc, deadline)
        time.sleep(POLL_S)
    elapsed_s, cpu_s = time.perf_counter() - t0, cpu_seconds(proc.pid) - cpu0
    if proc.wait(60) != 0:
        raise ConfigError(f"the burst worker exited {proc.returncode}: {_stderr(proc)}")
    return {"entries": left, "rps": left / elapsed_s, "busy": cpu_s / elapsed_s}


def _alive(proc: subprocess.Popen[bytes], deadline: float) -> None:
    if proc.poll() is not None:
        raise ConfigError(f"the burst worker exited {proc.returncode} before the backlog was drained: "
                          f"{_stderr(proc)}")
    if time.monotonic() > deadline:
        raise ConfigError(f"the backlog was not drained within {DRAIN_TIMEOUT_S} s")


def _stderr(proc: subprocess.Popen[bytes]) -> str:
    return (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")[-500:]


def run(models: tuple[str, ...], pairs: int, entries: dict[str, int],
        redis_binary: Path | None = None) -> dict[str, Any]:
    """``pairs`` on/off pairs per model; every drain's figures, and on / off of the medians."""
    if not {WORKER_CORE, REDIS_CORE} <= os.sched_getaffinity(0):
        raise ConfigError(f"needs cores {WORKER_CORE} and {REDIS_CORE} (this process may use "
                          f"{sorted(os.sched_getaffinity(0))})")
    doc: dict[str, Any] = {"pairs": pairs, "models": {}}
    own = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(binary=redis_binary) as server:
        assert server.process is not None
        pin(server.process.pid, {REDIS_CORE})
        os.sched_setaffinity(0, {REDIS_CORE})
        try:
            r = Redis.from_url(server.url)
            registry = Registry(r, Path(tmp) / "artifacts")
            for name in models:
                model = _register(registry, name, Path(tmp))
                doc["models"][name] = _pairs(r, server.url, registry.artifact_dir, model, pairs,
                                             entries[name])
            doc["server"] = server.version()
            r.close()
        finally:
            os.sched_setaffinity(0, own)
    return doc


def _register(registry: Registry, name: str, tmp: Path) -> str:
    path = trivial_onnx(tmp / "trivial.onnx") if name == "trivial" else reference_artifact(tmp)
    model = f"overlap_{name}"
    mv = registry.register(model, path, input_spec=reference.input_spec(),
                           output_names=[reference.OUTPUT_NAME], labels=list(reference.LABELS))
    registry.promote(model, mv.version)
    return model


def _pairs(r: Redis, url: str, artifact_dir: Path, model: str, pairs: int, entries: int) -> dict[str, Any]:
    drains: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    for i in range(pairs):
        for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
            fill(r, model, entries)
            with pinned_worker(url, artifact_dir, model, overlap=mode == "on") as proc:
                drains[mode].append(drain(r, proc, keys.request_stream(model), entries))
            _delete_replies(r, model, entries)
    median = {m: statistics.median(d["rps"] for d in ds) for m, ds in drains.items()}
    return {"entries": entries, "drains": drains, "on_off": median["on"] / median["off"]}


def _delete_replies(r: Redis, model: str, entries: int) -> None:
    """The drain's replies (nobody reads them here): Redis starts the next drain as empty as this."""
    for first in range(0, entries, 1000):
        r.unlink(*(keys.reply_key(model, f"o{i}") for i in range(first, min(entries, first + 1000))))


def main(argv: list[str] | None = None) -> int:
    """Run, print a table and the JSON (``--out``)."""
    p = argparse.ArgumentParser(prog="python -m lab.overlap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: trivial, reference")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--entries", type=int, help="backlog per drain (default: trivial 20,000, reference 3,000)")
    p.add_argument("--redis-server", type=Path, help="server binary (default: redis-server on PATH)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    models = tuple(m for m in args.models.split(",") if m)
    if unknown := set(models) - set(MODELS):
        p.error(f"unknown model(s): {', '.join(sorted(unknown))}")
    entries = {m: args.entries or DEFAULT_ENTRIES[m] for m in models}
    try:
        doc = run(models, args.pairs, entries, args.redis_server)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _print(doc)
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2))
    return 0


def _print(doc: dict[str, Any]) -> None:
    print(f"one burst worker on core {WORKER_CORE}, Redis and the writer on core {REDIS_CORE}, "
          f"{doc['server']}")
    for name, m in doc["models"].items():
        for mode in ("on", "off"):
            rates = " / ".join(f"{d['rps']:,.0f}" for d in m["drains"][mode])
            busy = " / ".join(f"{d['busy']:.2f}" for d in m["drains"][mode])
            print(f"{name:<10} overlap {mode:<3}  req/s {rates}   worker's core busy {busy}")
        print(f"{name:<10} on / off (medians): {m['on_off']:.2f}   ({m['entries']:,} entries per drain)")


if __name__ == "__main__":
    raise SystemExit(main())
