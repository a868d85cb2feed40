"""Version labels ("1.1.0"): unique per model, resolved wherever a command takes a version, and shown."""

from __future__ import annotations

import json

import models
import pytest
from conftest import MODEL, ThreadedWorker
from prometheus_client import generate_latest

from experiments.store import ExperimentStore
from protocol import keys
from protocol.errors import RegistryError
from registry.contract import register_onnx
from streamserve.cli import main
from worker.metrics import WorkerMetrics
from worker.worker import Worker


@pytest.fixture
def labelled(registry, tmp_path):
    """v1 (1.0.0) and v2 (1.1.0), checked and registered through the contract."""
    return [register_onnx(registry, MODEL, models.linear_softmax(tmp_path / f"v{seed}.onnx", seed=seed),
                          labels=models.LABELS, label=label)
            for seed, label in ((1, "1.0.0"), (2, "1.1.0"))]


def cli(settings, *args: str) -> int:
    return main(["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir), *args])


def test_a_label_is_unique_per_model_and_a_duplicate_registers_nothing(r, registry, tmp_path, labelled):
    other = models.linear_softmax(tmp_path / "other.onnx", seed=9)
    with pytest.raises(RegistryError) as caught:
        registry.register(MODEL, other, input_spec=models.SPEC, output_names=["probs"], label="1.1.0")
    assert str(caught.value) == f"model '{MODEL}' already has a version labelled '1.1.0'"
    with pytest.raises(RegistryError, match="already has a version labelled '1.0.0'"):
        register_onnx(registry, MODEL, other, label="1.0.0")
    assert [mv.version for mv in registry.versions(MODEL)] == [1, 2]
    assert r.hget(keys.model_hash(MODEL), "latest_version") == b"2"
    assert not any(p.read_bytes() == other.read_bytes() for p in registry.artifact_dir.rglob("*.onnx"))
    assert r.hgetall(keys.labels_hash(MODEL)) == {b"1.0.0": b"1", b"1.1.0": b"2"}
    # Another model may use the same label.
    assert register_onnx(registry, "other_model", other, label="1.1.0").version == 1


def test_labels_that_would_read_as_something_else_are_refused(registry, model_path, labelled):
    for label, why in (("7", "would read as a version number"), ("production", "would read as"),
                       ("bad label", "invalid label"), ("-x", "invalid label")):
        with pytest.raises(RegistryError, match=why):
            registry.register(MODEL, model_path, input_spec=models.SPEC, output_names=["probs"], label=label)
    registry.set_alias(MODEL, "champion", 1)
    with pytest.raises(RegistryError, match="has an alias 'champion'"):
        registry.register(MODEL, model_path, input_spec=models.SPEC, output_names=["probs"], label="champion")
    with pytest.raises(RegistryError, match="has a version labelled '1.1.0'"):
        registry.set_alias(MODEL, "1.1.0", 1)


def test_resolve_by_number_alias_or_label_and_a_deleted_versions_label_is_free(registry, labelled):
    assert registry.resolve(MODEL, "1.1.0").version == 2 and registry.resolve(MODEL, "1.0.0").version == 1
    assert registry.resolve(MODEL, 2).title == "v2 (1.1.0)"
    with pytest.raises(RegistryError, match="has no alias or label '9.9.9'"):
        registry.resolve(MODEL, "9.9.9")
    registry.delete(MODEL, 1)
    with pytest.raises(RegistryError, match="no alias or label '1.0.0'"):
        registry.resolve(MODEL, "1.0.0")
    registry.register(MODEL, registry.artifact_dir / labelled[0].artifact, input_spec=models.SPEC,
                      output_names=["probs"], label="1.0.0")
    assert registry.resolve(MODEL, "1.0.0").version == 3


def test_a_malformed_label_in_redis_is_a_registry_error_naming_the_field(r, registry, labelled):
    r.hset(keys.version_hash(MODEL, 1), "label", "1.0.0\nforged line")
    with pytest.raises(RegistryError, match="label"):
        registry.get(MODEL, 1)
    r.hset(keys.version_hash(MODEL, 1), "label", "x" * 65)
    with pytest.raises(RegistryError, match="label"):
        registry.get(MODEL, 1)
    r.hdel(keys.version_hash(MODEL, 1), "label", "output_spec")  # a version registered before labels
    assert registry.get(MODEL, 1).label == "" and registry.get(MODEL, 1).output_spec == {}


def test_the_registry_commands_take_a_label_and_show_it(r, settings, registry, model_path, capsys):
    assert cli(settings, "registry", "register", MODEL, str(model_path), "--labels", "down,flat,up",
               "--label", "1.0.0") == 0
    assert cli(settings, "registry", "register", MODEL, str(model_path), "--label", "1.1.0") == 0
    assert "registered ModelVersion(testmodel v2 (1.1.0) None onnx" in capsys.readouterr().out
    assert cli(settings, "registry", "register", MODEL, str(model_path), "--label", "1.1.0") == 2
    assert capsys.readouterr().err == (f"streamserve registry register: RegistryError: model '{MODEL}' "
                                       "already has a version labelled '1.1.0'\n")
    assert cli(settings, "registry", "promote", MODEL, "1.0.0") == 0
    assert cli(settings, "registry", "alias", MODEL, "champion", "1.1.0") == 0
    assert cli(settings, "registry", "metrics", MODEL, "1.1.0", "--metric", "accuracy=0.5") == 0
    assert cli(settings, "registry", "variant", MODEL, "1.1.0", "primary") == 0
    assert registry.aliases(MODEL) == {"champion": 2} and registry.production(MODEL).version == 1
    assert registry.get(MODEL, 2).metrics == {"accuracy": 0.5}
    capsys.readouterr()
    assert cli(settings, "registry", "list", MODEL) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("v1 (1.0.0)     Production") and lines[1].startswith("v2 (1.1.0)     None")
    assert cli(settings, "registry", "history", MODEL) == 0
    assert "stage  v1 (1.0.0)     None → Production" in capsys.readouterr().out
    assert cli(settings, "registry", "compare", MODEL, "1.0.0", "1.1.0") == 0
    assert "v1 (1.0.0)     v2 (1.1.0)" in capsys.readouterr().out
    assert cli(settings, "registry", "show", MODEL, "1.0.0") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{MODEL} v1 (1.0.0): Production, onnx,")
    assert "    features             <f4   [60, 110]" in out
    assert "    probs                <f4   [3]          probabilities labels down,flat,up" in out
    assert cli(settings, "registry", "show", MODEL, "champion", "--json") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["label"] == "1.1.0" and record["output_spec"]["probs"]["kind"] == "value"
    assert cli(settings, "registry", "alias", MODEL, "champion", "--remove") == 0
    assert cli(settings, "registry", "delete", MODEL, "1.1.0") == 0
    assert "deleted testmodel v2 (1.1.0)" in capsys.readouterr().out
    assert registry.versions(MODEL)[-1].version == 1


def test_status_and_experiment_commands_take_and_show_labels(r, settings, registry, labelled, capsys,
                                                             tmp_path):
    registry.promote(MODEL, 1)
    assert cli(settings, "experiment", "create", MODEL, "--control", "1.0.0", "--treatment", "1.1.0",
               "--unit", "request_id") == 0
    e = ExperimentStore(r, registry).get(MODEL)
    assert (e.control_version, e.treatment_version) == (1, 2)
    capsys.readouterr()
    with ThreadedWorker(Worker(settings, MODEL)) as worker:
        cli(settings, "status", MODEL)
    out = capsys.readouterr().out
    assert out.startswith(f"{MODEL}: Production v1 (1.0.0);")
    assert "control v1 (1.0.0) 90%, treatment v2 (1.1.0) 10%" in out
    assert f"  {worker.worker_id:<40} v1 (1.0.0) primary" in out
    cli(settings, "status", MODEL, "--json")
    doc = json.loads(capsys.readouterr().out)
    assert doc["models"][MODEL]["production_version"] == 1
    assert doc["labels"] == {MODEL: {"1": "1.0.0", "2": "1.1.0"}}  # Production, and the experiment's arms
    assert cli(settings, "replay", MODEL, "1.1.0") == 0  # nothing journaled yet: nothing to print
    assert cli(settings, "experiment", "analyze", MODEL) == 0
    capsys.readouterr()
    assert cli(settings, "experiment", "report", MODEL, "--png", str(tmp_path / "report.png")) == 0
    assert f"experiment {e.id}: {MODEL} v1 (1.0.0) vs v2 (1.1.0), primary" in capsys.readouterr().out


def test_the_model_info_metric_carries_the_served_versions_label():
    process = WorkerMetrics("w1")
    metrics = process.model(MODEL)
    metrics.serving(3, 3, label="1.1.0")
    text = generate_latest(process.registry).decode()
    assert f'streamserve_model_info{{label="1.1.0",model="{MODEL}",version="3"}} 1.0' in text
    metrics.serving(4, 4, label="")
    text = generate_latest(process.registry).decode()
    assert f'streamserve_model_info{{label="",model="{MODEL}",version="4"}} 1.0' in text
    assert 'version="3"' not in text.split("streamserve_model_info", 1)[1].split("# HELP", 1)[0]


def test_a_serving_worker_exports_its_versions_label(settings, registry, labelled):
    registry.promote(MODEL, labelled[1].version)
    worker = Worker(settings, MODEL, burst=True)
    worker.run()  # loads the Production version, drains nothing, heartbeats on the way
    text = generate_latest(worker.metrics.registry).decode()
    assert f'streamserve_model_info{{label="1.1.0",model="{MODEL}",version="{labelled[1].version}"}}' in text
