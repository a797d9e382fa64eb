"""Faults injected into a real job: the driver killed (SIGKILL) in the middle of the patch pass and
in the middle of retraining; re-running the same command must give what an uninterrupted run gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sisray.stages.score import read_patches

REPO = Path(__file__).resolve().parents[1]


def _job(small_benchmark, fcn_checkpoint, run_dir: Path) -> list[str]:
    small = [f"data.source.root={small_benchmark}", f"data.target.root={small_benchmark}",
             "data.source.size=[64, 36]", "data.target.size=[64, 32]", "model.name=fcn8s_vgg16", "model.width=0.0625", "lse.target_bn=false",
             f"model.source_checkpoint={fcn_checkpoint}", "train.batch_size=4", "train.epochs_per_round=2",
             "train.checkpoint_every=1", "lse.selection=global", "lse.p0=0.5", "lse.p_step=0.25", "lse.p_max=0.75",
             "lse.patches_per_image=2", "tracking.enabled=false"]
    return [sys.executable, str(REPO / "jobs" / "adapt.py"), "--run-dir", str(run_dir),
            *[a for o in small for a in ("--set", o)]]


def _kill_when(command: list[str], cwd: Path, ready) -> None:
    """Start the job in its own process group and SIGKILL the whole group (driver and the Ray it
    started) as soon as `ready()` holds."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    job = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        while not ready():
            assert job.poll() is None, f"the job ended before the fault: {job.stderr.read()[-3000:]}"
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(1500, method="thread")
def test_a_driver_killed_during_the_patch_pass_and_during_training_resumes_to_the_same_result(
        small_benchmark, fcn_checkpoint, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    whole = tmp_path / "whole"
    done = subprocess.run(_job(small_benchmark, fcn_checkpoint, whole), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    cut = tmp_path / "cut"
    command = _job(small_benchmark, fcn_checkpoint, cut)
    _kill_when(command, tmp_path, lambda: (cut / "round_02" / ".patches.tmp").is_dir())  # mid patch pass
    state = json.loads((cut / "state.json").read_text())["finished"]
    assert "round_02/select" in state and "round_02/patches" not in state
    _kill_when(command, tmp_path, lambda: any((cut / "round_02" / "train").glob("checkpoint_*")))  # mid training
    state = json.loads((cut / "state.json").read_text())["finished"]
    assert "round_02/patches" in state and "round_02/train" not in state

    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for r in ("round_01", "round_02"):
        for name in ("selection.json", "thresholds.json"):
            assert json.loads((whole / r / name).read_text()) == json.loads((cut / r / name).read_text()), (r, name)
        assert read_patches(whole / r / "patches") == read_patches(cut / r / "patches"), r  # boxes, labels
    a, b = (json.loads((run / "summary.json").read_text()) for run in (whole, cut))
    assert b["complete"] and [r["patches"] for r in a["rounds"]] == [r["patches"] for r in b["rounds"]]
    assert b["final"]["miou19"] == pytest.approx(a["final"]["miou19"], abs=1e-6)
