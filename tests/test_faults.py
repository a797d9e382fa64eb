"""Faults injected into a real job: the driver killed (SIGKILL) in the middle of the patch pass and
of retraining, a finished stage's file cut short; re-running the same command must give what an
uninterrupted run gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from processes import stop_when
from sisray.patch_set import read_rows

REPO = Path(__file__).resolve().parents[1]


def _job(small_benchmark, fcn_checkpoint, run_dir: Path) -> list[str]:
    small = [f"data.source.root={small_benchmark}", f"data.target.root={small_benchmark}",
             "data.source.size=[64, 36]", "data.target.size=[64, 32]", "model.name=fcn8s_vgg16", "model.width=0.0625", "lse.target_bn=false",
             f"model.source_checkpoint={fcn_checkpoint}", "train.batch_size=4", "train.epochs_per_round=2",
             "train.checkpoint_every=1", "lse.selection=global", "lse.p0=0.5", "lse.p_step=0.25", "lse.p_max=0.75",
             "lse.patches_per_image=2", "tracking.enabled=false"]
    return [sys.executable, str(REPO / "jobs" / "adapt.py"), "--run-dir", str(run_dir),
            *[a for o in small for a in ("--set", o)]]


def _finished(run: Path) -> dict:
    return json.loads((run / "state.json").read_text())["finished"]


@pytest.mark.slow
@pytest.mark.ray  # in the jobs it starts
@pytest.mark.timeout(1500, method="thread")
def test_a_killed_job_resumes_to_the_same_result(small_benchmark, fcn_checkpoint, tmp_path):
    """Against an uninterrupted run: SIGKILL mid patch pass and mid training, then a shard of a
    finished stage cut short; the same command then finishes with the same selections, thresholds,
    patches and mIoU, redoing only what was lost."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    whole = tmp_path / "whole"
    done = subprocess.run(_job(small_benchmark, fcn_checkpoint, whole), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    cut = tmp_path / "cut"
    command = _job(small_benchmark, fcn_checkpoint, cut)
    stop_when(command, tmp_path, lambda: (cut / "round_02" / ".patches.tmp").is_dir(), signal.SIGKILL)
    assert "round_02/select" in _finished(cut) and "round_02/patches" not in _finished(cut)
    partial = json.loads((cut / "summary.json").read_text())
    assert not partial["complete"] and len(partial["rounds"]) == 1 and partial["final"] is None
    stamp = (cut / "round_01" / "scores.parquet").stat().st_mtime_ns

    stop_when(command, tmp_path, lambda: any((cut / "round_02" / "train").glob("checkpoint_*")), signal.SIGKILL)
    assert "round_02/patches" in _finished(cut) and "round_02/train" not in _finished(cut)
    shard = sorted((cut / "round_02" / "patches").glob("*.parquet"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])  # as if cut short: detected, the patch stage redone

    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (cut / "round_01" / "scores.parquet").stat().st_mtime_ns == stamp  # not redone
    assert len(shard.read_bytes()) > 100
    for r in ("round_01", "round_02"):
        for name in ("selection.json", "thresholds.json"):
            assert json.loads((whole / r / name).read_text()) == json.loads((cut / r / name).read_text()), (r, name)
        assert read_rows(whole / r / "patches") == read_rows(cut / r / "patches"), r  # boxes, labels
    a, b = (json.loads((run / "summary.json").read_text()) for run in (whole, cut))
    assert b["complete"] and [r["patches"] for r in a["rounds"]] == [r["patches"] for r in b["rounds"]]
    assert b["final"]["miou19"] == pytest.approx(a["final"]["miou19"], abs=1e-6)
