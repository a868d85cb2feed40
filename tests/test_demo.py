"""``streamserve demo``: bounded work and threads, a duration line per phase when piped, the whole story."""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from lab import demo
from modeltools import reference


def test_piped_output_has_one_line_per_phase_and_a_total_and_no_bars():
    out = io.StringIO()
    timeline = demo.Timeline(Console(file=out, width=100))  # a file: not a terminal
    with timeline.phase("first", "The first phase"), timeline.spinner("working"):
        pass
    with timeline.phase("second", "The second phase"), timeline.bar() as bar:
        bar.add_task("steps", total=3)
    total_s = timeline.finish()
    lines = out.getvalue().splitlines()
    assert [line for line in lines if "done in" in line] == [
        f"phase 1 (first) done in {timeline.durations_s['first']:.1f} s",
        f"phase 2 (second) done in {timeline.durations_s['second']:.1f} s"]
    assert lines[-1].startswith(f"demo total: {total_s:.1f} s (first ")
    assert "steps" not in out.getvalue() and "\x1b" not in out.getvalue(), "no bar drawn into a file"


def _args(**given) -> argparse.Namespace:
    fields = dict.fromkeys(demo.Size.__dataclass_fields__) | {"full": False}
    return argparse.Namespace(**(fields | given))


def test_the_demo_is_quick_unless_asked_for_the_full_run_and_flags_win():
    assert demo.size_of(_args()) == demo.QUICK
    assert demo.size_of(_args(full=True)) == demo.FULL
    assert demo.size_of(_args(full=True, epochs=1)).epochs == 1
    quick, full = demo.QUICK, demo.FULL
    assert quick.n_train * quick.epochs * 4 <= full.n_train * full.epochs and quick.threads == 1
    assert (full.n_train, full.epochs) == (6000, 4), "the full run trains as `streamserve train` does"


def test_training_reports_every_batch_and_uses_at_most_the_cores_it_has():
    before = torch.get_num_threads()
    steps: list[reference.Step] = []
    try:
        result = reference.train(n_train=130, n_test=30, epochs=2, seed=0, threads=64, progress=steps.append)
        assert torch.get_num_threads() == min(64, reference.available_cores())
    finally:
        torch.set_num_threads(before)
    assert [(s.epoch, s.batch) for s in steps] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert {(s.epochs, s.batches) for s in steps} == {(2, 3)}
    assert result.n_train == 130 and 0 <= result.accuracy <= 1


@pytest.mark.timeout(150)
def test_the_whole_demo_piped_to_a_file_prints_each_phase_and_its_duration(tmp_path: Path):
    # A subprocess: the demo sets torch's thread count for its own process, not the test session's.
    cmd = [sys.executable, "-m", "streamserve", "demo", "--n-train", "128", "--n-test", "100",
           "--epochs", "1", "--bots", "1", "--requests", "300", "--report-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=130)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    phases = re.findall(r"^phase (\d) \((.+)\) done in \d+\.\d s$", out, re.MULTILINE)
    assert phases == [("1", "redis"), ("2", "train v1"), ("3", "train v2"), ("4", "workers"),
                      ("5", "load + promotion"), ("6", "two models"), ("7", "experiment"), ("8", "shutdown")]
    assert re.search(r"^demo total: \d+\.\d s \(redis ", out, re.MULTILINE)
    assert out.count("held-out accuracy") == 2 and "fleet switched" in out
    # One fleet serves both models: every request of each answered, by a version of its own.
    served = dict(re.findall(r"^served (\S+): (\d+)/\d+ ok, .* v\d+, by [12] workers; errors: none$",
                             out, re.MULTILINE))
    assert served == {"hybrid_cnn_lstm": str(demo.TWO_MODEL_REQUESTS),
                      demo.SECOND_MODEL: str(demo.TWO_MODEL_REQUESTS)}, out
    report = json.loads(next(line for line in out.splitlines() if line.startswith('{"experiment"')))
    assert report["analyses"] >= 2, "the report plots a time series: analyses during and after the load"
    assert (tmp_path / "experiment-report.png").stat().st_size > 0
    assert "\x1b" not in out, "no bars or colours drawn into a file"
