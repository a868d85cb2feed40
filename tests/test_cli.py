"""The ``streamserve`` command: discoverable, and the registry/predict paths work."""

import json
import subprocess
import sys

import models
import numpy as np
from conftest import MODEL, ThreadedWorker

from streamserve.cli import build_parser, main
from worker.worker import Worker


def test_every_subcommand_has_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"worker", "train", "predict", "health", "registry", "bench", "demo"} <= set(commands)
    out = subprocess.run([sys.executable, "-m", "streamserve", "registry", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "promote" in out and "register" in out


def test_register_promote_list_predict_health(settings, model_path, capsys, tmp_path):
    base = ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir)]
    assert main([*base, "registry", "register", MODEL, str(model_path), "--input-spec",
                 json.dumps(models.SPEC), "--labels", "down,flat,up", "--metric", "accuracy=0.5"]) == 0
    assert main([*base, "registry", "promote", MODEL, "1"]) == 0
    assert main([*base, "registry", "list", MODEL]) == 0
    assert "Production" in capsys.readouterr().out
    np.save(tmp_path / "x.npy", np.zeros((60, 110), np.float32))
    with ThreadedWorker(Worker(settings, MODEL)):
        assert main([*base, "predict", MODEL, "--npy", str(tmp_path / "x.npy")]) == 0
        reply = json.loads(capsys.readouterr().out)
        assert reply["version"] == 1 and reply["label"][0] in models.LABELS
        assert main([*base, "health", MODEL]) == 0


def test_errors_are_reported_not_raised(settings, capsys):
    base = ["--redis-url", settings.redis_url, "--artifact-dir", str(settings.artifact_dir)]
    assert main([*base, "registry", "promote", MODEL, "7"]) == 2
    assert "RegistryError" in capsys.readouterr().err
    assert main(["--redis-url", "redis://x", "worker", "--max-batch", "0"]) == 2
    assert "invalid settings" in capsys.readouterr().err
