"""Subprocess smoke tests of the job entry points, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlflow_server import Gate, mlflow_server

REPO = Path(__file__).resolve().parents[1]


def run_job(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_make_synthetic_generates_and_prints_statistics(tmp_path):
    out = tmp_path / "bench"
    args = ("jobs/make_synthetic.py", "--out", str(out), "--n-source", "6", "--n-target-train", "4",
            "--n-target-val", "3", "--processes", "2")
    first = run_job(*args)
    assert first.returncode == 0, first.stderr
    assert "6 source, 4 target-train, 3 target-val images" in first.stdout
    assert "traffic sign" in first.stdout and "larger in the target domain" in first.stdout
    assert (out / "SYNTHETIC.json").is_file()
    second = run_job(*args, "--no-stats")
    assert second.returncode == 0 and "6 source" in second.stdout


def test_bad_config_override_exits_2_with_a_message_and_no_traceback(tmp_path):
    result = run_job("jobs/make_synthetic.py", "--out", str(tmp_path / "b"), "--n-source", "2",
                     "--n-target-train", "2", "--n-target-val", "1", "--set", "data.target.size=[0, 5]")
    assert result.returncode == 2
    assert "error:" in result.stderr and "data.target.size = [0, 5]" in result.stderr
    assert "Traceback" not in result.stderr


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "target").mkdir()
    result = run_job("jobs/make_synthetic.py", "--out", str(tmp_path), "--no-stats")
    assert result.returncode == 2
    assert f"{tmp_path / 'target'} exists but is not part of a sisray synthetic benchmark" in result.stderr


def holds_config(server: MlflowClient) -> bool:
    """Whether the job's MLflow run is open and holds its config.yaml."""
    experiment = server.get_experiment_by_name("sisray")
    return experiment is not None and any("config.yaml" in {a.path for a in server.list_artifacts(r.info.run_id)}
                                          for r in server.search_runs([experiment.experiment_id]))


def run_through_an_outage(args: list[str], gate: Gate, server: MlflowClient, folder: Path,
                          timeout: int = 600) -> tuple[int, str, str]:
    """Run the job; stop the tracking server (close the gate) once its run holds config.yaml, and start
    it again once the job has warned of it. Returns the exit code, stdout and stderr."""
    out, err = folder / "job.out", folder / "job.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        job = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=stdout, stderr=stderr, text=True)
    deadline = time.monotonic() + timeout
    try:
        for ready, then in ((lambda: holds_config(server), gate.close),
                            (lambda: "did not take" in err.read_text(), gate.open)):
            while not ready():
                assert job.poll() is None, f"the job ended before the outage: {err.read_text()[-3000:]}"
                assert time.monotonic() < deadline
                time.sleep(0.1)
            then()
        job.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        job.kill()
    return job.returncode, out.read_text(), err.read_text()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900, method="thread")
def test_train_source_then_evaluate_jobs_with_a_tracking_server_stopped_mid_training(tmp_path, small_benchmark):
    import json

    with mlflow_server(tmp_path) as url:
        gate = Gate(url)
        server = MlflowClient(tracking_uri=url)
        root = os.path.relpath(small_benchmark, REPO)  # relative, as users write it: Ray workers must still find it
        settings = ["--set", f"data.source.root={root}", "--set", f"data.target.root={root}",
                    "--set", "data.source.size=[64, 36]", "--set", "data.target.size=[64, 32]",
                    "--set", "model.name=fcn8s_vgg16", "--set", "model.init=random", "--set", "model.width=0.0625",
                    "--set", "train.batch_size=2", "--set", "train.source_epochs=0.7",
                    "--set", "train.lr=1e-3", "--set", "train.log_every=1", "--set", f"tracking.uri={gate.url}"]
        run_dir = tmp_path / "run"
        code, stdout, stderr = run_through_an_outage(["jobs/train_source.py", "--run-dir", str(run_dir), *settings],
                                                     gate, server, tmp_path)
        assert code == 0, stderr[-3000:]
        assert "source-only model on target val" in stdout and "miou19" in stdout
        assert "source training: " in stdout + stderr  # the Train worker's progress
        # the Train worker warned once, kept its losses and sent them at its end, once the server was back
        assert stderr.count("warning: MLflow") == 1 and "answers again" in stderr, stderr[-3000:]
        checkpoint = run_dir / "source" / "checkpoint"
        assert (checkpoint / "model.pt").is_file() and (run_dir / "config.yaml").is_file()
        block = json.loads((run_dir / "source" / "eval.json").read_text())
        assert set(block) >= {"miou19", "miou16", "miou13", "per_class"}
        assert block["per_class"]["rider"] is None  # no ground truth, no prediction: NaN -> null

        evaluated = run_job("jobs/evaluate.py", "--checkpoint", str(checkpoint), "--export", str(tmp_path / "pred"),
                            "--out", str(tmp_path / "eval.json"), *settings, timeout=600)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        again = json.loads((tmp_path / "eval.json").read_text())
        assert again["miou19"] == pytest.approx(block["miou19"])  # the same checkpoint, the same numbers
        assert len(list((tmp_path / "pred").rglob("*_pred_labelIds.png"))) == 3

        runs = server.search_runs([server.get_experiment_by_name("sisray").experiment_id])
        by_job = {r.data.tags["sisray.job"]: r for r in runs}
        assert set(by_job) == {"train_source", "evaluate"}
        train_run = by_job["train_source"]
        assert train_run.info.status == "FINISHED"
        assert train_run.data.params["model.width"] == "0.0625" and train_run.data.params["lse.scale"] == "2.0"
        assert train_run.data.metrics["source/miou19"] == pytest.approx(block["miou19"])
        # log_every=1: 2 steps (0.7 epochs of the 5 source images trained, batch 2); the sixth is held out
        assert [m.step for m in server.get_metric_history(train_run.info.run_id, "source/loss")] == [1, 2]
        assert [m.step for m in server.get_metric_history(train_run.info.run_id, "source/holdout_loss")] == [2]
        artifacts = {a.path for a in server.list_artifacts(train_run.info.run_id)}
        assert {"config.yaml", "eval.json", "overlay.png"} <= artifacts


def test_evaluate_refuses_a_bad_checkpoint_before_starting_ray(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_text("not a checkpoint")
    result = run_job("jobs/evaluate.py", "--checkpoint", str(bad))
    assert result.returncode == 2
    assert f"{bad}: not a loadable PyTorch state dict" in result.stderr and "Traceback" not in result.stderr
    import torch

    from sisray.models import build_model
    torch.save(build_model("fcn8s_vgg16", 16, width=0.0625).state_dict(), bad)  # another class count
    result = run_job("jobs/evaluate.py", "--checkpoint", str(bad), "--set", "model.name=fcn8s_vgg16",
                     "--set", "model.init=random", "--set", "model.width=0.0625")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bad} does not fit FCN8s (width 0.0625, 19 classes): shapes differ" in result.stderr
