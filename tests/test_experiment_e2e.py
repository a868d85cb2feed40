"""End to end: an experiment under bot traffic, outcomes reported, analysis promotes, fleet switches."""

import models
import numpy as np
import pytest
from conftest import MODEL, ThreadedWorker, wait_until

from experiments import runner
from experiments.store import ExperimentStore, Margins
from producer import Client
from registry.rollout import wait_for_fleet
from streamserve.cli import main
from worker.worker import Worker


@pytest.mark.timeout(90)  # worker start 10 s, calls 10 s each, maturing 12 s, fleet switch 10 s
def test_analysis_promotes_the_better_arm_and_the_fleet_switches(r, settings, registry, tmp_path,
                                                                 production, capsys):
    v2 = registry.register(MODEL, models.linear_softmax(tmp_path / "v2.onnx", seed=2),
                           input_spec=models.SPEC, output_names=["probs"], labels=models.LABELS)
    store = ExperimentStore(r, registry)
    horizon_s = 2.0
    e = store.create(MODEL, production.version, v2.version, treatment_share=0.5, planned_looks=2,
                     min_effect_pp=30, label_horizon_s=horizon_s,
                     # A few seconds of traffic cannot show latency (no complete minute) or a rare error
                     # rate within tight margins; this test is about the hit rate, so those are wide.
                     margins=Margins(latency_p95_ms=50, error_rate_pp=50))
    windows = list(np.random.default_rng(3).standard_normal((240, 60, 110)).astype(np.float32))
    right = np.random.default_rng(4).random(240) < 0.5  # the control is right half the time
    with ThreadedWorker(Worker(settings, MODEL)), Client.from_url(settings.redis_url, timeout_s=10) as client:
        predictions = []
        for k in range(40):  # 40 symbols, 6 requests each; outcomes reported well within the horizon
            batch = client.predict_many(MODEL, windows[6 * k:6 * k + 6], route=f"SYM{k}")
            outcomes = [(p.request_id, {"correct": bool(p.variant == "treatment" or right[i])})
                        for i, p in enumerate(batch, start=len(predictions))]
            client.record_outcomes(MODEL, outcomes)
            predictions += batch
        assert {p.variant for p in predictions} == {"control", "treatment"}
        matured_s = runner.outcomes_due_s(r, e)
        wait_until(lambda: runner.redis_now_s(r) > matured_s, horizon_s + 10, interval_s=0.05)
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
    assert "PROMOTE" in capsys.readouterr().out and png.stat().st_size > 1000
    records = runner.decisions(r, e)
    assert [rec["applied"] for rec in records] == [False, True]
    n_treatment = sum(p.variant == "treatment" for p in predictions)
    for rec in records:
        assert rec["exposures"] == [240 - n_treatment, n_treatment] and sum(rec["units"]) == 40
        assert rec["info_fraction"] >= 1 and rec["look"] == 2 and rec["now_s"] > matured_s
    assert records[0]["boundary_tested"] and not records[1]["boundary_tested"], "the boundary is tested once"


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
