"""End to end: an experiment under bot traffic, outcomes reported, analysis promotes, fleet switches."""

import models
import numpy as np
from conftest import MODEL, ThreadedWorker

from experiments import runner
from experiments.store import ExperimentStore, Margins
from producer import Client
from registry.rollout import wait_for_fleet
from streamserve.cli import main
from worker.worker import Worker


def test_analysis_promotes_the_better_arm_and_the_fleet_switches(r, settings, registry, tmp_path,
                                                                 production, capsys):
    v2 = registry.register(MODEL, models.linear_softmax(tmp_path / "v2.onnx", seed=2),
                           input_spec=models.SPEC, output_names=["probs"], labels=models.LABELS)
    store = ExperimentStore(r, registry)
    e = store.create(MODEL, production.version, v2.version, treatment_share=0.5, unit="request_id",
                     planned_looks=2, min_effect_pp=30,
                     # 120 latency samples per arm cannot show p95 within 2 ms; this test is about
                     # the hit rate, so the latency margin is wide.
                     margins=Margins(latency_p95_ms=50))
    windows = list(np.random.default_rng(3).standard_normal((240, 60, 110)).astype(np.float32))
    with ThreadedWorker(Worker(settings, MODEL)), Client.from_url(settings.redis_url, timeout_s=10) as client:
        predictions = client.predict_many(MODEL, windows)
        assert {p.variant for p in predictions} == {"control", "treatment"}
        for i, p in enumerate(predictions):  # the treatment is right every time, the control half the time
            client.record_outcome(MODEL, p.request_id, correct=p.variant == "treatment" or i % 2 == 0)
        first = runner.run_analysis(r, registry, MODEL)  # a look without acting
        decision = runner.run_analysis(r, registry, MODEL, apply=True)
        assert first.decision == decision.decision == "PROMOTE", decision
        assert registry.production(MODEL).version == v2.version
        assert store.get(MODEL).status == "stopped" and "PROMOTE" in store.get(MODEL).stopped_reason
        assert wait_for_fleet(r, MODEL, v2.version, timeout_s=10).ok
        after = client.predict_many(MODEL, windows[:20])
    assert all(p.model_version == v2.version and p.variant == "" for p in after), "no failed request"

    base = ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir)]
    png = tmp_path / "report.png"
    assert main([*base, "experiment", "report", MODEL, "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.count("PROMOTE") == 2 and png.stat().st_size > 1000
    records = runner.decisions(r, e)
    assert [rec["applied"] for rec in records] == [False, True]
    assert all(rec["planned_n_per_arm"] > 0 for rec in records)


def test_experiment_cli_create_status_analyze_stop(r, settings, registry, tmp_path, production, capsys):
    registry.register(MODEL, models.linear_softmax(tmp_path / "v2.onnx", seed=2), input_spec=models.SPEC,
                      output_names=["probs"], labels=models.LABELS)
    base = ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir)]
    assert main([*base, "experiment", "create", MODEL, "--control", "1", "--treatment", "2",
                 "--share", "0.2", "--mode", "shadow"]) == 0
    with ThreadedWorker(Worker(settings, MODEL)), Client.from_url(settings.redis_url) as client:
        client.predict(MODEL, np.zeros((60, 110), np.float32))
    assert main([*base, "experiment", "status", MODEL]) == 0
    assert "treatment" in capsys.readouterr().out
    assert main([*base, "experiment", "analyze", MODEL]) == 0
    assert "CONTINUE" in capsys.readouterr().out
    assert main([*base, "experiment", "pause", MODEL]) == 0
    assert ExperimentStore(r, registry).get(MODEL).status == "paused"
    assert main([*base, "experiment", "resume", MODEL]) == 0
    assert main([*base, "experiment", "list"]) == 0
    assert "[running] shadow" in capsys.readouterr().out
    assert main([*base, "experiment", "stop", MODEL, "--reason", "enough"]) == 0
    assert ExperimentStore(r, registry).get(MODEL).status == "stopped"
    capsys.readouterr()
    assert main([*base, "experiment", "watch", MODEL, "--interval-s", "0"]) == 0
    assert "no running experiment" in capsys.readouterr().out
