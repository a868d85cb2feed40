"""Hot reload: zero-downtime swaps under load, refused bad versions, fleet acknowledgement."""

from __future__ import annotations

import threading
import time

import models
import numpy as np
import pytest
from conftest import MODEL, ThreadedWorker, wait_for_workers, wait_until

from producer import Client
from registry.rollout import wait_for_fleet
from streamserve.cli import main
from worker.worker import Worker

X = np.random.default_rng(5).standard_normal((60, 110)).astype(np.float32)


def register_version(registry, tmp_path, seed: int, **kwargs):
    path = models.linear_softmax(tmp_path / f"v{seed}.onnx", seed=seed)
    return registry.register(MODEL, path, input_spec=models.SPEC, output_names=["probs"],
                             labels=models.LABELS, **kwargs), path


def corrupt(settings, mv) -> None:
    target = settings.artifact_dir / mv.artifact
    target.chmod(0o644)
    target.write_bytes(target.read_bytes()[:-10] + b"0123456789")


# Waits: the workers' start 30 s, then 10 s, the switch 10 s, 10 s, the bots' last calls 15 s: 75 s.
@pytest.mark.timeout(120)
def test_reload_under_load_loses_nothing_and_every_reply_names_its_version(
        r, settings, registry, tmp_path, start_worker, production, model_path):
    v2, v2_path = register_version(registry, tmp_path, seed=2)
    expected = {production.version: models.reference_outputs(model_path, X[None])[0],  # one sample each
                v2.version: models.reference_outputs(v2_path, X[None])[0]}
    procs = [start_worker() for _ in range(2)]
    results: list = []
    stop = threading.Event()
    rounds = [0, 0, 0]  # calls each bot has completed

    def bot(i: int) -> None:
        with Client.from_url(settings.redis_url, timeout_s=10) as client:
            while not stop.is_set():
                results.extend(client.predict_many(MODEL, [X] * 4, return_exceptions=True))
                rounds[i] += 1

    with Client.from_url(settings.redis_url) as client:
        wait_for_workers(client, len(procs))
        bots = [threading.Thread(target=bot, args=(i,)) for i in range(len(rounds))]
        for b in bots:
            b.start()
        # Every bot has been answered by the old version before the promote ...
        wait_until(lambda: all(rounds), 10, message="the bots got no replies")
        registry.promote(MODEL, v2.version)
        report = wait_for_fleet(registry.redis, MODEL, v2.version, timeout_s=10)
        # ... and, after the fleet switched, has finished the call in flight and a whole one
        # started later, so its last call (below) is sent after the switch too.
        switched = list(rounds)
        wait_until(lambda: all(n >= k + 2 for n, k in zip(rounds, switched, strict=True)), 10,
                   message="the bots stalled after the switch")
        stop.set()
        deadline = time.monotonic() + 15  # each bot ends its call in flight: 10 s at most
        for b in bots:
            b.join(max(0.0, deadline - time.monotonic()))
    assert report.ok and len(report.switched) == 2, report
    errors = [e for e in results if isinstance(e, Exception)]
    assert not errors, errors[:3]
    versions = [p.model_version for p in results]
    assert versions[0] == production.version and versions[-1] == v2.version
    for p in results:  # the outputs are those of the version the reply names
        np.testing.assert_allclose(p.outputs["probs"], expected[p.model_version], rtol=1e-4, atol=1e-6)


def test_corrupt_new_version_is_refused_and_the_old_keeps_serving(r, settings, registry, tmp_path,
                                                                  production):
    v2, _ = register_version(registry, tmp_path, seed=2)
    corrupt(settings, v2)
    with ThreadedWorker(Worker(settings, MODEL)), Client.from_url(settings.redis_url) as client:
        client.predict(MODEL, X)
        registry.promote(MODEL, v2.version)
        report = wait_for_fleet(r, MODEL, v2.version, timeout_s=10)
        assert not report.ok and len(report.failed) == 1
        assert "sha256" in next(iter(report.failed.values()))
        assert client.predict(MODEL, X).model_version == production.version


def test_golden_mismatch_is_refused(r, settings, registry, tmp_path, production):
    golden = {"input:features": X[None], "output:probs": np.full((1, 3), 1 / 3, np.float32)}
    v2, _ = register_version(registry, tmp_path, seed=2, golden=golden)
    with ThreadedWorker(Worker(settings, MODEL)), Client.from_url(settings.redis_url) as client:
        client.predict(MODEL, X)
        registry.promote(MODEL, v2.version)
        report = wait_for_fleet(r, MODEL, v2.version, timeout_s=10)
        assert "golden output 'probs' differs" in next(iter(report.failed.values()))
        assert client.predict(MODEL, X).model_version == production.version


def test_matching_golden_outputs_are_accepted(r, settings, registry, tmp_path, production):
    path = models.linear_softmax(tmp_path / "g.onnx", seed=4)
    golden = {"input:features": X[None], "output:probs": models.reference_outputs(path, X[None])}
    v2 = registry.register(MODEL, path, input_spec=models.SPEC, output_names=["probs"], golden=golden)
    with ThreadedWorker(Worker(settings, MODEL)), Client.from_url(settings.redis_url) as client:
        client.predict(MODEL, X)
        registry.promote(MODEL, v2.version)
        assert wait_for_fleet(r, MODEL, v2.version, timeout_s=10).ok


def test_worker_that_missed_the_message_converges_within_the_reconcile_period(
        r, settings, registry, tmp_path, production):
    settings = settings.with_overrides(reconcile_interval_s=0.5)
    v2, _ = register_version(registry, tmp_path, seed=2)
    with ThreadedWorker(Worker(settings, MODEL)), Client.from_url(settings.redis_url) as client:
        client.predict(MODEL, X)
        started = time.monotonic()
        registry.promote(MODEL, v2.version, publish=False)  # nobody is told
        report = wait_for_fleet(r, MODEL, v2.version, timeout_s=5)
        assert report.ok and time.monotonic() - started < 2.0
        assert client.predict(MODEL, X).model_version == v2.version


def test_worker_started_after_a_promote_serves_the_new_version(r, settings, registry, tmp_path, production):
    v2, _ = register_version(registry, tmp_path, seed=2)
    registry.promote(MODEL, v2.version)
    with ThreadedWorker(Worker(settings, MODEL)), Client.from_url(settings.redis_url) as client:
        assert client.predict(MODEL, X).model_version == v2.version


@pytest.mark.parametrize("rollback", [False, True])
def test_promote_wait_reports_failure_and_can_roll_back(r, settings, registry, tmp_path, production,
                                                        capsys, rollback):
    v2, _ = register_version(registry, tmp_path, seed=2)
    corrupt(settings, v2)
    base = ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir)]
    with ThreadedWorker(Worker(settings, MODEL)), Client.from_url(settings.redis_url) as client:
        client.predict(MODEL, X)
        extra = ["--rollback-on-failure"] if rollback else []
        code = main([*base, "registry", "promote", MODEL, str(v2.version), "--wait", "--timeout-s", "10",
                     *extra])
        assert code == 1
        out = capsys.readouterr().out
        assert "failed" in out and "ArtifactIntegrityError" in out
        expected = production.version if rollback else v2.version
        assert registry.production(MODEL).version == expected
        assert ("rolled back to v1" in out) is rollback


def test_reload_wait_and_status_commands(r, settings, registry, tmp_path, production, capsys):
    base = ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir)]
    with ThreadedWorker(Worker(settings, MODEL)) as worker, Client.from_url(settings.redis_url) as client:
        client.predict(MODEL, X)
        assert main([*base, "reload", MODEL, "--wait", "--timeout-s", "5"]) == 0
        assert "fleet switched to v1" in capsys.readouterr().out
        assert main([*base, "status"]) == 0
        out = capsys.readouterr().out
    assert f"{MODEL}: Production v1" in out and worker.worker_id in out and "dead letters 0" in out


@pytest.fixture
def v2_on_its_fallback(settings, registry, tmp_path, production):
    """v2 with a torch twin of its ONNX artifact, the ONNX artifact corrupted in the store: a
    worker can serve v2 only through the torch fallback."""
    pytest.importorskip("torch")
    path = models.linear_softmax(tmp_path / "v2.onnx", seed=2)
    v2 = registry.register(MODEL, path, input_spec=models.SPEC, output_names=["probs"],
                           labels=models.LABELS,
                           alternates={"torch_export": models.torch_twin(path, tmp_path / "v2.pt2")})
    corrupt(settings, v2)
    return v2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("allow", [False, True])
def test_promote_wait_counts_a_fallback_variant_as_not_switched_unless_allowed(
        r, settings, registry, v2_on_its_fallback, capsys, allow):
    v2 = v2_on_its_fallback
    base = ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir)]
    with ThreadedWorker(Worker(settings, MODEL)), Client.from_url(settings.redis_url) as client:
        client.predict(MODEL, X)
        extra = ["--allow-fallback"] if allow else []
        code = main([*base, "registry", "promote", MODEL, str(v2.version), "--wait", "--timeout-s", "20",
                     *extra])
        out = capsys.readouterr().out
        assert client.predict(MODEL, X).model_version == v2.version, "v2 serves, through torch"
    assert code == (0 if allow else 1), out
    assert "torch_export" in out and "artifact bytes do not match" in out, "the variant and why"
    summary = out.strip().splitlines()[-1]
    assert ("NOT switched" in summary) is not allow and "1 on a fallback" in summary


@pytest.mark.timeout(60)  # as above: a torch export, then waits of 10 + 20 + 10 s and the worker's 10 s
def test_wait_for_fleet_holds_a_worker_to_the_variant_asked_for(r, settings, registry, v2_on_its_fallback):
    v2 = v2_on_its_fallback
    with ThreadedWorker(Worker(settings, MODEL)), Client.from_url(settings.redis_url) as client:
        client.predict(MODEL, X)
        registry.promote(MODEL, v2.version)
        report = wait_for_fleet(r, MODEL, v2.version, timeout_s=20)
        assert not report.ok and not report.switched and len(report.fallback) == 1
        # Asking for the torch variant itself: serving it is no fallback.
        registry.select_variant(MODEL, v2.version, "torch_export")
        asked = wait_for_fleet(r, MODEL, v2.version, timeout_s=10, variant="torch_export")
    assert asked.ok and len(asked.switched) == 1 and not asked.fallback, asked.lines()
