"""The MLflow bridge against a real MLflow tracking server (tests/mlflow_server.py), both ways.

Import of ONNX versions (by alias and by version, with spec, tags, metrics, label), the refusal
of pickle flavors before any weights are fetched and of a version whose files changed since
its import, export then import, and sync in both directions. One server for the module.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import models
import numpy as np
import onnxruntime as ort
import pytest
import yaml
from conftest import ThreadedWorker
from mlflow_server import MlflowServer

from integrations import cli as integrations_cli
from integrations.mlflow_registry import MlflowRegistryError, import_version
from integrations.mlflow_sync import sync_once
from registry.contract import register_onnx
from streamserve.cli import explain
from worker.worker import Worker

# MLflow warns about its own type hints when mlflow.pyfunc is first imported (by mlflow.onnx.log_model).
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:mlflow")
_NAMES = itertools.count(1)
PYTORCH = {"pytorch": {"model_data": "data", "pytorch_version": "2.13.0"},
           "python_function": {"loader_module": "mlflow.pytorch", "data": "data", "python_version": "3.11"}}
SKLEARN = {"sklearn": {"pickled_model": "model.pkl", "serialization_format": "cloudpickle"},
           "python_function": {"loader_module": "mlflow.sklearn", "model_path": "model.pkl"}}
X = np.random.default_rng(7).standard_normal((2, 60, 110)).astype(np.float32)


@pytest.fixture
def name() -> str:
    """A model name of its own per test: the MLflow server lives for the whole module."""
    return f"desk-model-{next(_NAMES)}"


@pytest.fixture
def client(mlflow_server: MlflowServer):
    """An MlflowClient of the module's server; the fluent API (mlflow.start_run…) points there too."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_server.uri)
    mlflow.set_registry_uri(mlflow_server.uri)
    return mlflow.MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)


def log_onnx(client, path: Path, name: str, *, metrics: dict[str, float] | None = None,
             tags: dict[str, str] | None = None) -> tuple[str, str]:
    """Log ``path`` as a new version of ``name`` the way a desk does: (version, run id)."""
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype("float32"), (-1, 60, 110), "features")]),
                               outputs=Schema([TensorSpec(np.dtype("float32"), (-1, 3), "probs")]))
    with mlflow.start_run() as run:
        mlflow.log_metrics(metrics or {})
        info = mlflow.onnx.log_model(onnx.load(str(path)), name="model", signature=signature,
                                     registered_model_name=name, pip_requirements=["onnxruntime"])
    version = str(info.registered_model_version)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(name, version, key, value)
    return version, run.info.run_id


def log_pickle_flavored(client, name: str, folder: Path, flavors: dict) -> str:
    """A version whose MLmodel lists only pickle flavors, logged as plain files (no pickle is made)."""
    import mlflow

    (folder / "data").mkdir(parents=True)
    (folder / "data" / "model.pth").write_bytes(b"weights that must never be downloaded")
    (folder / "model.pkl").write_bytes(b"weights that must never be downloaded")
    (folder / "MLmodel").write_text(yaml.safe_dump({"flavors": flavors, "mlflow_version": "3.17.2"},
                                                    sort_keys=False))
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), artifact_path="model")
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    return str(client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id).version)


def run_cli(settings, *argv: str) -> int:
    """``streamserve registry …`` through a parser made by ``integrations.cli.register``."""
    parser = argparse.ArgumentParser(prog="streamserve registry")
    integrations_cli.register(parser.add_subparsers(dest="registry_command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args, settings)


def served(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probs"], {"features": X})[0]


def test_import_by_alias_then_by_version(mlflow_server, client, registry, settings, tmp_path, name, capsys):
    path = models.linear_softmax(tmp_path / "m.onnx")
    version, run_id = log_onnx(client, path, name, metrics={"accuracy": 0.91, "loss": 0.25},
                               tags={"desk": "rates", "streamserve.labels": json.dumps(models.LABELS)})
    client.set_registered_model_alias(name, "champion", version)

    assert run_cli(settings, "import", "mlflow", "--uri", mlflow_server.uri, f"models:/{name}@champion") == 0
    out = capsys.readouterr().out
    mv = registry.resolve(name, f"mlflow-{version}")
    assert (mv.version, mv.label, mv.stage, mv.format) == (1, f"mlflow-{version}", "None", "onnx")
    assert mv.input_spec == models.SPEC
    assert mv.output_names == ["probs"]
    assert mv.output_spec == {"probs": {"dtype": "<f4", "shape": [3], "kind": "probabilities"}}
    assert mv.labels == models.LABELS
    assert mv.metrics == {"accuracy": 0.91, "loss": 0.25}
    assert mv.golden, "golden outputs for the workers' check"
    expected = {"mlflow.model_name": name, "mlflow.version": version, "mlflow.run_id": run_id,
                "mlflow.tag.desk": "rates"}
    assert {k: mv.tags[k] for k in expected} == expected
    assert mv.tags["mlflow.source"] and len(mv.tags["mlflow.sha256"]) == 64
    # mlflow.onnx.log_model keeps the weights in an external data file by default: it was fetched and
    # inlined, so the stored artifact serves alone, with the logged model's outputs.
    assert "downloaded: MLmodel, model.onnx, " in out and ".data" in out
    np.testing.assert_allclose(served(registry.artifact_path(mv)), models.reference_outputs(path, X),
                               rtol=1e-5)

    # By version: the same MLflow version, recognised, not registered twice.
    assert run_cli(settings, "import", "mlflow", "--uri", mlflow_server.uri, f"models:/{name}/{version}") == 0
    assert "was imported before as" in capsys.readouterr().out
    assert [v.version for v in registry.versions(name)] == [1]


@pytest.mark.parametrize("flavors", [PYTORCH, SKLEARN], ids=["pytorch", "sklearn"])
def test_pickle_flavors_are_refused_before_any_weights_are_fetched(
        mlflow_server, client, registry, tmp_path, name, flavors, monkeypatch):
    import mlflow.artifacts

    version = log_pickle_flavored(client, name, tmp_path / "model", flavors)
    fetched: list[str] = []
    download = mlflow.artifacts.download_artifacts

    def spy(*args, **kwargs):
        fetched.append(kwargs["artifact_uri"])
        return download(*args, **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", spy)
    with pytest.raises(MlflowRegistryError) as refused:
        import_version(registry, client, f"models:/{name}/{version}", tracking_uri=mlflow_server.uri)
    message = explain(refused.value)[1]
    assert "\n" not in message
    assert (f"models:/{name}/{version} is not an ONNX model (flavors: {next(iter(flavors))}, "
            "python_function (loader_module mlflow.") in message
    assert "never loads pickled models: export it to ONNX first (torch.onnx.export for PyTorch, skl2onnx " \
           "for scikit-learn) and log that with mlflow.onnx.log_model" in message
    assert [uri.rsplit("/", 1)[-1] for uri in fetched] == ["MLmodel"], "only the MLmodel file"
    assert registry.models() == []


def test_a_version_whose_files_changed_after_its_import_is_refused(
        mlflow_server: MlflowServer, client, registry, tmp_path, name):
    version, _ = log_onnx(client, models.linear_softmax(tmp_path / "m.onnx"), name)
    uri = f"models:/{name}/{version}"
    first = import_version(registry, client, uri, tracking_uri=mlflow_server.uri).version
    # Someone rewrites the version's graph in MLflow's artifact store, under the same version number.
    location = client.get_model_version_download_uri(name, version)
    assert location.startswith("mlflow-artifacts:/"), location
    stored = mlflow_server.artifact_root / location.removeprefix("mlflow-artifacts:/") / "model.onnx"
    assert stored.is_file()
    models.linear_softmax(stored, seed=2)

    recorded = first.tags["mlflow.sha256"][:16]
    changed = (rf"models:/{name}/{version}: its files changed since it was imported as {name} v1 "
               rf"\(mlflow-{version}\) \(sha256 [0-9a-f]{{16}}…, recorded {recorded}…\): "
               "an MLflow version must not change")
    with pytest.raises(MlflowRegistryError, match=changed):
        import_version(registry, client, uri, tracking_uri=mlflow_server.uri)
    assert [v.version for v in registry.versions(name)] == [1]


# About 20 calls to the MLflow server (3 to 9 s on 2 busy cores): room for a busier box.
@pytest.mark.timeout(60)
def test_export_then_import_round_trip(mlflow_server, client, registry, settings, tmp_path, name, capsys):
    import mlflow.artifacts

    ours = register_onnx(registry, name, models.linear_softmax(tmp_path / "m.onnx", seed=3),
                         labels=models.LABELS, label="1.4.0", metrics={"accuracy": 0.88})
    registry.promote(name, ours.version, "Staging")
    assert run_cli(settings, "export", "mlflow", "--uri", mlflow_server.uri, name, "1.4.0") == 0
    assert f"exported {name} v1 (1.4.0) as models:/{name}/1" in capsys.readouterr().out

    exported = client.get_model_version_by_alias(name, "staging")
    assert client.get_registered_model(name).aliases == {"staging": "1", "challenger": "1"}
    expected = {"streamserve.model": name, "streamserve.version": "1", "streamserve.label": "1.4.0"}
    assert {k: exported.tags[k] for k in expected} == expected
    assert client.get_run(exported.run_id).data.metrics == {"accuracy": 0.88}
    mlmodel = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(name, "1") + "/MLmodel",
        dst_path=str(tmp_path / "dl"), tracking_uri=mlflow_server.uri)
    doc = yaml.safe_load(Path(mlmodel).read_text())
    assert set(doc["flavors"]) == {"onnx", "python_function"}
    assert doc["flavors"]["python_function"]["loader_module"] == "mlflow.onnx"
    assert json.loads(doc["signature"]["inputs"]) == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 60, 110]}, "name": "features"}]
    assert json.loads(doc["signature"]["outputs"])[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 3]}

    # Exported again: already there. Imported into the same model: its own export, same files.
    assert run_cli(settings, "export", "mlflow", "--uri", mlflow_server.uri, name, "1") == 0
    assert f"{name} v1 (1.4.0) is already models:/{name}/1" in capsys.readouterr().out
    again = import_version(registry, client, f"models:/{name}@staging", tracking_uri=mlflow_server.uri)
    assert not again.created and again.version.version == ours.version
    # Imported as another model: the same bytes, contract, labels and metrics.
    copy = import_version(registry, client, f"models:/{name}/1", tracking_uri=mlflow_server.uri,
                          as_name=f"{name}-copy").version
    assert copy.sha256 == ours.sha256
    assert (copy.input_spec, copy.output_spec, copy.labels, copy.metrics) == (
        ours.input_spec, ours.output_spec, ours.labels, ours.metrics)
    # The copy is MLflow's models:/NAME/1: exported elsewhere, its provenance would be lost.
    with pytest.raises(MlflowRegistryError, match=rf"is MLflow's models:/{name}/1; export it to that"):
        run_cli(settings, "export", "mlflow", "--uri", mlflow_server.uri, f"{name}-copy", "1",
                "--mlflow-name", "elsewhere")


# About 20 calls to the MLflow server (3 to 9 s on 2 busy cores): room for a busier box.
@pytest.mark.timeout(60)
def test_sync_mirrors_our_stages_as_aliases(mlflow_server, client, registry, settings, tmp_path, name):
    v1, v2 = (register_onnx(registry, name, models.linear_softmax(tmp_path / f"{s}.onnx", seed=s))
              for s in (1, 2))
    registry.promote(name, v1.version, reason="backtest passed")
    sync_once(registry, client, name, tracking_uri=mlflow_server.uri, fleet_timeout_s=5)
    first = registry.get(name, v1.version).tags["mlflow.version"]
    assert client.get_registered_model(name).aliases == {"production": first, "champion": first}
    assert client.get_model_version(name, first).tags["streamserve.stage"] == "Production"
    assert "backtest passed" in client.get_model_version(name, first).tags["streamserve.last_change"]

    registry.promote(name, v2.version, "Staging")
    assert run_cli(settings, "sync", "mlflow", "--uri", mlflow_server.uri, name, "--once") == 0
    second = registry.get(name, v2.version).tags["mlflow.version"]
    assert client.get_registered_model(name).aliases == {"production": first, "champion": first,
                                                         "staging": second, "challenger": second}

    registry.promote(name, v2.version)  # Production here: v1 archived, no Staging left
    sync_once(registry, client, name, tracking_uri=mlflow_server.uri, fleet_timeout_s=5)
    assert client.get_registered_model(name).aliases == {"production": second, "champion": second}
    assert client.get_model_version(name, first).tags["streamserve.stage"] == "Archived"
    assert not sync_once(registry, client, name, tracking_uri=mlflow_server.uri, fleet_timeout_s=5).lines


# Waits: the worker's start 5 s + stop 5 s, the fleet 15 s.
@pytest.mark.timeout(60)
def test_sync_applies_an_alias_moved_in_mlflow_through_the_fleet(
        mlflow_server, client, registry, settings, tmp_path, name):
    registry.promote(name, register_onnx(registry, name, models.linear_softmax(tmp_path / "1.onnx")).version)
    with ThreadedWorker(Worker(settings, name)):
        sync_once(registry, client, name, tracking_uri=mlflow_server.uri, fleet_timeout_s=5)
        version, _ = log_onnx(client, models.linear_softmax(tmp_path / "2.onnx", seed=2), name)
        client.set_registered_model_alias(name, "champion", version)  # a person moves the champion
        report = sync_once(registry, client, name, tracking_uri=mlflow_server.uri, fleet_timeout_s=15,
                           ttl_s=settings.heartbeat_ttl_s)

    assert not report.refused, report.lines
    production = registry.production(name)
    assert (production.version, production.label, production.tags["mlflow.version"]) == (
        2, f"mlflow-{version}", version)
    assert registry.history(name)[-1].reason == f"MLflow alias champion → version {version} (moved in MLflow)"
    tags = client.get_model_version(name, version).tags
    assert "fleet switched to v2" in tags["streamserve.fleet"] and "1 switched" in tags["streamserve.fleet"]
    assert tags["streamserve.stage"] == "Production"
    assert client.get_registered_model(name).aliases == {"production": version, "champion": version}


def test_sync_refuses_an_alias_it_cannot_apply_and_moves_it_back(
        mlflow_server, client, registry, settings, tmp_path, name, capsys):
    registry.promote(name, register_onnx(registry, name, models.linear_softmax(tmp_path / "1.onnx")).version)
    sync_once(registry, client, name, tracking_uri=mlflow_server.uri, fleet_timeout_s=5)
    first = registry.production(name).tags["mlflow.version"]
    pickled = log_pickle_flavored(client, name, tmp_path / "model", PYTORCH)
    client.set_registered_model_alias(name, "champion", pickled)

    assert run_cli(settings, "sync", "mlflow", "--uri", mlflow_server.uri, name, "--once") == 1
    assert f"refused MLflow alias champion → version {pickled}: not applied: " in capsys.readouterr().out
    refusal = client.get_model_version(name, pickled).tags["streamserve.refused"]
    assert refusal.startswith(f"MLflow alias champion → version {pickled}: not applied: models:/{name}/"
                              f"{pickled} is not an ONNX model")
    assert client.get_registered_model(name).aliases == {"production": first, "champion": first}
    assert registry.production(name).version == 1 and len(registry.versions(name)) == 1
    assert not sync_once(registry, client, name, tracking_uri=mlflow_server.uri, fleet_timeout_s=5).refused


def test_sync_refuses_an_alias_to_a_version_whose_files_are_gone_and_goes_on(
        mlflow_server: MlflowServer, client, registry, settings, tmp_path, name, capsys):
    """MLflow cannot serve the version a person pointed an alias at (its artifacts deleted): the pass
    refuses that move like any other, instead of ending before it mirrors our stages."""
    registry.promote(name, register_onnx(registry, name, models.linear_softmax(tmp_path / "1.onnx")).version)
    sync_once(registry, client, name, tracking_uri=mlflow_server.uri, fleet_timeout_s=5)
    first = registry.production(name).tags["mlflow.version"]
    version, _ = log_onnx(client, models.linear_softmax(tmp_path / "2.onnx", seed=2), name)
    location = client.get_model_version_download_uri(name, version)
    folder = mlflow_server.artifact_root / location.removeprefix("mlflow-artifacts:/")
    for path in folder.iterdir():  # the MLmodel file and the graph: nothing left to download
        path.unlink()
    client.set_registered_model_alias(name, "champion", version)

    assert run_cli(settings, "sync", "mlflow", "--uri", mlflow_server.uri, name, "--once") == 1
    assert f"refused MLflow alias champion → version {version}: not applied: " in capsys.readouterr().out
    assert client.get_registered_model(name).aliases == {"production": first, "champion": first}
