"""Registry logic on fakeredis; the artifact store on disk."""

import time

import fakeredis
import models
import numpy as np
import pytest

from protocol import keys
from protocol.errors import ArtifactIntegrityError, RegistryError
from registry import Registry, sha256_of


@pytest.fixture
def reg(tmp_path):
    return Registry(fakeredis.FakeRedis(), tmp_path / "store")


@pytest.fixture
def artifact(tmp_path):
    return models.linear_softmax(tmp_path / "m.onnx")


def register(reg, artifact, **kw):
    return reg.register("m", artifact, input_spec=models.SPEC, output_names=["probs"],
                        labels=models.LABELS, **kw)


def test_register_copies_into_content_addressed_store(reg, artifact):
    mv = register(reg, artifact, metrics={"accuracy": 0.9}, description="first")
    digest = sha256_of(artifact)
    assert mv.sha256 == digest and mv.artifact == f"sha256/{digest[:2]}/{digest}.onnx"
    assert (reg.artifact_dir / mv.artifact).read_bytes() == artifact.read_bytes()
    assert mv.version == 1 and mv.stage == "None" and mv.size_bytes == artifact.stat().st_size
    assert reg.get("m", 1) == mv and reg.models() == ["m"]


def test_versions_count_up_and_identical_bytes_share_one_file(reg, artifact):
    a, b = register(reg, artifact), register(reg, artifact)
    assert (a.version, b.version) == (1, 2) and a.artifact == b.artifact
    assert [v.version for v in reg.versions("m")] == [1, 2]


def test_promote_to_production_archives_the_previous(reg, artifact):
    register(reg, artifact)
    register(reg, artifact)
    reg.promote("m", 1)
    assert reg.production("m").version == 1
    reg.promote("m", 2)
    assert reg.production("m").version == 2
    assert reg.get("m", 1).stage == "Archived" and reg.get("m", 2).stage == "Production"


def test_moving_production_to_staging_leaves_no_production(reg, artifact):
    register(reg, artifact)
    reg.promote("m", 1)
    reg.promote("m", 1, "Staging")
    with pytest.raises(RegistryError, match="no version in Production"):
        reg.production("m")


@pytest.mark.parametrize("stage", ["Live", "production", ""])
def test_unknown_stage_is_refused(reg, artifact, stage):
    register(reg, artifact)
    with pytest.raises(RegistryError, match="unknown stage"):
        reg.promote("m", 1, stage)


def test_archived_to_production_needs_an_explicit_rollback(reg, artifact):
    register(reg, artifact)
    register(reg, artifact)
    reg.promote("m", 1)
    reg.promote("m", 2)  # v1 → Archived
    with pytest.raises(RegistryError, match="Archived → Production is not allowed.*rollback"):
        reg.promote("m", 1)
    reg.promote("m", 1, allow_archived=True, reason="v2 misbehaves")
    assert reg.production("m").version == 1 and reg.get("m", 2).stage == "Archived"


def test_aliases_several_per_version_resolve_and_remove(reg, artifact):
    register(reg, artifact)
    register(reg, artifact)
    reg.set_alias("m", "champion", 1)
    reg.set_alias("m", "stable", 1)
    reg.set_alias("m", "challenger", 2)
    assert reg.aliases("m") == {"champion": 1, "stable": 1, "challenger": 2}
    assert reg.resolve("m", "challenger").version == 2 and reg.resolve("m", "1").version == 1
    reg.set_alias("m", "champion", 2)
    reg.remove_alias("m", "stable")
    assert reg.aliases("m") == {"champion": 2, "challenger": 2}
    kinds = [(c.kind, c.source, c.target) for c in reg.history("m")]
    assert ("alias", "champion@1", "champion@2") in kinds and ("alias", "stable@1", "-") in kinds
    with pytest.raises(RegistryError, match="no alias"):
        reg.resolve("m", "stable")


def test_metrics_and_tags_merge_after_the_fact(reg, artifact):
    register(reg, artifact, metrics={"accuracy": 0.8, "f1": 0.7})
    mv = reg.update("m", 1, metrics={"accuracy": 0.82, "live_hit_rate": 0.55}, tags={"data": "2026-11"},
                    description="retrained")
    assert mv.metrics == {"accuracy": 0.82, "f1": 0.7, "live_hit_rate": 0.55}
    assert mv.tags == {"data": "2026-11"} and mv.description == "retrained"


def test_compare_gives_deltas_and_differing_facts(reg, artifact, tmp_path):
    register(reg, artifact, metrics={"accuracy": 0.80, "loss": 0.5})
    other = models.linear_softmax(tmp_path / "other.onnx", seed=1)
    reg.register("m", other, input_spec=models.SPEC, output_names=["probs"], metrics={"accuracy": 0.83})
    result = reg.compare("m", 1, 2)
    assert result["metrics"]["accuracy"]["delta"] == pytest.approx(0.03)
    assert result["metrics"]["loss"] == {"a": 0.5, "b": None, "delta": None}
    assert result["facts"]["sha256"]["a"] != result["facts"]["sha256"]["b"]
    assert result["facts"]["labels"] == {"a": models.LABELS, "b": []}


def test_history_answers_what_was_in_production_at_time_t(reg, artifact, monkeypatch):
    for _ in range(3):
        register(reg, artifact)
    # A clock the test moves (fakeredis stamps stream ids with time.time() too): one second
    # between each promote and the marks either side of it.
    now = [time.time()]
    monkeypatch.setattr(time, "time", lambda: now[0])
    marks = [time.time()]
    for version, kwargs in ((1, {}), (2, {}), (3, {}), (2, {"allow_archived": True})):
        now[0] += 1.0
        reg.promote("m", version, reason=f"to v{version}", **kwargs)
        now[0] += 1.0
        marks.append(time.time())
    assert [reg.production_at("m", t) for t in marks] == [None, 1, 2, 3, 2]
    stages = [(c.version, c.source, c.target) for c in reg.history("m") if c.kind == "stage"]
    assert stages == [(1, "None", "Production"), (1, "Production", "Archived"), (2, "None", "Production"),
                      (2, "Production", "Archived"), (3, "None", "Production"),
                      (3, "Production", "Archived"), (2, "Archived", "Production")]
    assert all(c.who for c in reg.history("m"))


def test_delete_is_refused_for_production_and_aliased_versions(reg, artifact):
    for _ in range(3):
        register(reg, artifact)
    reg.promote("m", 1)
    reg.set_alias("m", "challenger", 2)
    with pytest.raises(RegistryError, match="in Production"):
        reg.delete("m", 1)
    with pytest.raises(RegistryError, match="holds aliases"):
        reg.delete("m", 2)
    reg.delete("m", 3, reason="bad data")
    assert [v.version for v in reg.versions("m")] == [1, 2]
    assert reg.history("m")[-1].kind == "delete"


def test_gc_removes_only_unreferenced_artifacts(reg, artifact, tmp_path):
    register(reg, artifact)
    other = reg.register("m", models.linear_softmax(tmp_path / "o.onnx", seed=3),
                         input_spec=models.SPEC, output_names=["probs"])
    reg.promote("m", 1)
    assert reg.gc() == []
    reg.delete("m", other.version)
    assert reg.gc(dry_run=True) == [reg.artifact_dir / other.artifact]
    assert (reg.artifact_dir / other.artifact).exists()
    assert reg.gc() == [reg.artifact_dir / other.artifact]
    assert not (reg.artifact_dir / other.artifact).exists()
    assert (reg.artifact_dir / reg.get("m", 1).artifact).exists()


def test_alternates_are_stored_verified_and_kept_by_gc(reg, artifact, tmp_path):
    twin = tmp_path / "twin.pt2"
    twin.write_bytes(b"pretend program")
    mv = register(reg, artifact, alternates={"torch_export": twin})
    assert mv.load_order == ["primary", "torch_export"]
    assert reg.artifact_path(mv, "torch_export").read_bytes() == b"pretend program"
    assert reg.gc() == []
    with pytest.raises(RegistryError, match="unsupported format 'pickle'"):
        register(reg, artifact, alternates={"pickle": twin})


def test_golden_inputs_round_trip_verified(reg, artifact):
    x = np.ones((2, 60, 110), np.float32)
    mv = register(reg, artifact, golden={"input:features": x, "output:probs": np.zeros((2, 3))})
    golden = reg.golden(mv)
    np.testing.assert_array_equal(golden["input:features"], x)
    (reg.artifact_dir / mv.golden).write_bytes(b"tampered")
    with pytest.raises(ArtifactIntegrityError):
        reg.golden(mv)


def test_promote_to_production_publishes_a_reload_command(r, settings, model_path):
    from protocol import control

    reg = Registry(r, settings.artifact_dir)
    reg.register("m", model_path, input_spec=models.SPEC, output_names=["probs"])
    with r.pubsub() as pubsub:
        pubsub.subscribe(keys.control_channel())
        pubsub.get_message(timeout=1)  # subscribe confirmation
        reg.promote("m", 1)
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
    command = control.decode(message["data"])
    assert (command.command, command.model, command.version) == ("reload", "m", 1)


def test_unknown_version_and_format_are_refused(reg, artifact):
    with pytest.raises(RegistryError, match="no version 3"):
        reg.promote("m", 3)
    with pytest.raises(RegistryError, match="unsupported format"):
        reg.register("m", artifact, input_spec=models.SPEC, output_names=["probs"], fmt="pickle")


def test_tampered_or_missing_artifact_is_refused(reg, artifact):
    mv = register(reg, artifact)
    path = reg.artifact_dir / mv.artifact
    path.write_bytes(b"evil")
    with pytest.raises(ArtifactIntegrityError, match="refusing to load"):
        reg.artifact_path(mv)
    path.unlink()
    with pytest.raises(ArtifactIntegrityError, match="missing"):
        reg.artifact_path(mv)


def test_registry_keys_share_the_models_hash_slot():
    from redis.crc import key_slot

    slots = {key_slot(k.encode()) for k in (
        keys.model_hash("m"), keys.version_hash("m", 3), keys.request_stream("m"),
        keys.reply_key("m", "abc"), keys.dead_letter_stream("m"), keys.workers_zset("m"),
        keys.worker_hash("m", "w1"), keys.batch_histogram("m"))}
    assert len(slots) == 1


@pytest.mark.parametrize("name", ["", "a{b}", "x" * 65, "has space", "-lead"])
def test_invalid_model_names_are_refused(name):
    from protocol.errors import InvalidInput

    with pytest.raises(InvalidInput):
        keys.request_stream(name)
