"""Registry logic on fakeredis; the artifact store on disk."""

import fakeredis
import models
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


@pytest.mark.parametrize("stage", ["None", "Live", "production"])
def test_bad_stage_is_refused(reg, artifact, stage):
    register(reg, artifact)
    with pytest.raises(RegistryError, match="cannot promote"):
        reg.promote("m", 1, stage)


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
