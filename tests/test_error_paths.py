"""Error paths that users meet: each must say clearly what is wrong."""

import models
import numpy as np
import pydantic
import pytest
from conftest import MODEL, ThreadedWorker

from experiments.store import ExperimentStore
from modeltools.optimizer import optimize
from producer import Client
from protocol import control
from protocol.errors import InvalidInput, RegistryError
from protocol.settings import Settings
from streamserve.cli import main
from worker.loader import GoldenCheckFailed, check_golden
from worker.worker import Worker

X = np.zeros((1, 60, 110), np.float32)


class EchoBackend:
    name = "echo"

    def run(self, inputs):
        return {"probs": np.full((len(inputs["features"]), 3), 1 / 3, np.float32)}

    def stage(self, name, shape, dtype):
        return None


def test_heartbeat_must_outlive_its_interval():
    with pytest.raises(pydantic.ValidationError, match="heartbeat_ttl_s must exceed"):
        Settings(heartbeat_interval_s=2.0, heartbeat_ttl_s=1.0)


def test_golden_output_missing_or_misshaped_is_refused():
    with pytest.raises(GoldenCheckFailed, match="missing or shape mismatch"):
        check_golden(EchoBackend(), {"input:features": X, "output:logits": np.zeros((1, 3))}, 1e-4)
    with pytest.raises(GoldenCheckFailed, match="missing or shape mismatch"):
        check_golden(EchoBackend(), {"input:features": X, "output:probs": np.zeros((2, 3))}, 1e-4)
    check_golden(EchoBackend(), {"input:features": X, "output:probs": np.full((1, 3), 1 / 3)}, 1e-4)


@pytest.mark.parametrize("raw, message", [
    (b"not json", "malformed control message"),
    (b'{"command": "explode", "model": "m"}', "unknown control command"),
    (b'{"command": "reload", "model": "m", "version": "2"}', "integer"),
])
def test_bad_control_messages_are_refused(raw, message):
    with pytest.raises(InvalidInput, match=message):
        control.decode(raw)


def test_variant_and_alias_mistakes(registry, production):
    with pytest.raises(RegistryError, match="has no variant 'int9'"):
        registry.select_variant(MODEL, production.version, "int9")
    with pytest.raises(RegistryError, match="bad variant"):
        registry.add_variant(MODEL, production.version, "primary", models.__file__)
    with pytest.raises(RegistryError, match="has no alias 'nope'"):
        registry.remove_alias(MODEL, "nope")


def test_optimize_needs_a_pytorch_artifact(registry, production, tmp_path):
    with pytest.raises(ValueError, match="no torch_export artifact"):
        optimize(registry, production, None, tmp_path)


def test_experiment_commands_without_an_experiment(settings, production, capsys):
    base = ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir)]
    assert main([*base, "experiment", "status", MODEL]) == 1
    assert "no experiment" in capsys.readouterr().out
    assert main([*base, "experiment", "report", MODEL]) == 1
    assert "no analyses yet" in capsys.readouterr().out
    assert main([*base, "replay", MODEL, "1"]) == 2
    assert "no experiment to replay" in capsys.readouterr().err


def test_treatment_that_cannot_load_leaves_the_control_serving_untagged(r, settings, registry, tmp_path,
                                                                     production):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a graph")
    bad = registry.register(MODEL, broken, input_spec=models.SPEC, output_names=["probs"])
    ExperimentStore(r, registry).create(MODEL, production.version, bad.version, treatment_share=0.5,
                                        unit="request_id")
    with ThreadedWorker(Worker(settings, MODEL)) as worker, Client.from_url(settings.redis_url) as client:
        predictions = client.predict_many(MODEL, list(np.zeros((10, 60, 110), np.float32)))
        assert worker.arms.treatment is None
    assert all(p.model_version == production.version and p.variant == "" for p in predictions)
