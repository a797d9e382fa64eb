"""The adaptation loop: schedule, retraining step, run state, resume, and the job as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sisray import rounds, run_state
from sisray.config import load_config
from sisray.datasets.synthetic import CLASSES
from sisray.errors import ConfigError
from sisray.models import build_model
from sisray.optim import freeze_batchnorm_statistics, make_optimizer
from sisray.stages.train_loop import training_step
from sisray.storage import RunStore
from sisray.validators import HIGHER_IS_BETTER
from sisray.weights import shipped_path

REPO = Path(__file__).resolve().parents[1]


def test_schedule_of_portions():
    assert rounds.schedule(load_config(None).lse) == [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]  # the reference: 7
    assert rounds.schedule(load_config(None, ["lse.p0=0.2", "lse.p_step=0.1"]).lse) == [0.2, 0.3, 0.4]
    assert rounds.schedule(load_config(None, ["lse.p0=0.3", "lse.p_step=0"]).lse) == [0.3]


def test_training_step_matches_a_hand_computation():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 3, 1)  # 3 classes, one input channel: logits_k = w_k x + b_k
    w, b = net.weight.detach().flatten().clone(), net.bias.detach().clone()
    source = (torch.tensor([[[[0.5, -1.0]]]]), torch.tensor([[[2, 0]]]))
    patches = (torch.tensor([[[[2.0, 1.0, -0.5]]]]), torch.tensor([[[1, 255, 2]]]))  # one ignored pixel
    beta, gamma = 0.1, 3.0

    def hand(weight, bias):
        def ce(x, y):  # -log softmax_y(w x + b), written out
            logits = weight * x + bias
            return torch.log(torch.exp(logits).sum()) - logits[y]
        source_ce = (ce(0.5, 2) + ce(-1.0, 0)) / 2
        target = [ce(2.0, 1), ce(-0.5, 2)]
        focal = [(1 - torch.exp(-c)) ** gamma * c for c in target]
        return source_ce + sum(c + beta * f for c, f in zip(target, focal)) / 2

    weight, bias = w.clone().requires_grad_(), b.clone().requires_grad_()
    expected = hand(weight, bias)
    expected.backward()
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    parts = training_step(net, optimizer, source, patches, beta, gamma)
    assert parts["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert parts["source_ce"] + parts["target_loss"] == pytest.approx(parts["loss"])
    assert torch.allclose(net.weight.detach().flatten(), w - weight.grad, atol=1e-6)  # SGD lr 1: minus the gradient
    assert torch.allclose(net.bias.detach(), b - bias.grad, atol=1e-6)


def test_optimiser_state_carries_over_but_rates_start_again():
    model = build_model("deeplabv2_r101", width=0.0625)
    sgd, poly = make_optimizer(model, 1e-3, 4)
    model(torch.rand(1, 3, 32, 32)).sum().backward()
    for _ in range(4):
        sgd.step()
        poly.step()
    assert sgd.param_groups[0]["lr"] == 0.0  # the end of the previous stage's poly schedule
    carried, _ = make_optimizer(model, 1e-3, 10, sgd.state_dict())
    assert [g["lr"] for g in carried.param_groups] == [1e-3, 1e-2]
    first = next(p for p in model.parameters() if p.grad is not None)
    assert torch.equal(carried.state[first]["momentum_buffer"], sgd.state[first]["momentum_buffer"])


def test_a_run_directory_of_another_config_is_refused_unless_forced(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    run_state.RunState(RunStore(tmp_path), cfg).save()
    run_state.RunState(RunStore(tmp_path), load_config(None, [f"run_dir={tmp_path}", "resources.num_actors=3",
                                                 "tracking.enabled=false"]))  # where/how, not what: fine
    other = load_config(None, [f"run_dir={tmp_path}", "lse.p0=0.2"])
    with pytest.raises(ConfigError, match=r"lse.p0 = 0.1 there, 0.2 now"):
        run_state.RunState(RunStore(tmp_path), other)
    assert run_state.RunState(RunStore(tmp_path), other, force=True).data["fingerprint"]["lse.p0"] == 0.2


def test_a_run_of_an_earlier_sisray_resumes_when_the_options_added_since_are_at_their_defaults(tmp_path):
    """An option added later (here lse.classmix) is absent from the older run's record: that run
    behaved as the default does, so the default resumes it and another value is refused."""
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    state = run_state.RunState(RunStore(tmp_path), cfg)
    del state.data["fingerprint"]["lse.classmix"]
    state.save()
    run_state.RunState(RunStore(tmp_path), cfg)
    with pytest.raises(ConfigError, match=r"lse.classmix = False there, True now"):
        run_state.RunState(RunStore(tmp_path), load_config(None, [f"run_dir={tmp_path}", "lse.classmix=true"]))


# ------------------------------------------------------------------ end to end (Ray)

@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1200, method="thread")
def test_the_job_without_arguments_runs_the_method_on_the_built_in_benchmark(tmp_path):
    """`python jobs/adapt.py` as a user runs it, in a folder holding the built-in benchmark with fewer
    target images (its source half is the default's, which the shipped model was trained on; written
    by a job where missing: tests/test_synthetic.py), shrunk through SISRAY_SET to one round (the
    shipped source model of the default, target BatchNorm statistics and photometric augmentation
    included); then the same command again, and one with another config. Rounds carrying over into
    rounds: tests/test_storage.py; source training: tests/test_jobs.py."""
    from mlflow.tracking import MlflowClient

    from sisray.datasets.synthetic import SyntheticSpec, generate

    generate(tmp_path / "data" / "synthetic", SyntheticSpec(n_target_train=100, n_target_val=20), processes=1)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    small = ["data.source.size=[64, 36]", "data.target.size=[64, 32]", "train.epochs_per_round=1", "lse.p0=0.2", "lse.p_max=0.2",
             "lse.patches_per_image=2", "validation.images=2", f"tracking.uri={uri}"]
    env = {**os.environ, "SISRAY_SET": ";".join(small), "RAY_AUTH_MODE": "disabled"}

    def job(*args, **extra_env):
        return subprocess.run([sys.executable, str(REPO / "jobs" / "adapt.py"), *args], cwd=tmp_path,
                              env={**env, **extra_env}, capture_output=True, text=True, timeout=1000)

    done = job()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final" in done.stdout and "round 1 (p=0.2)" in done.stdout
    terminal = done.stdout + done.stderr  # sisray's lines; Ray's and MLflow's INFO logs stay in their files
    assert "== round_01/train" in terminal and "scoring: " in terminal
    for chatter in ("logging_progress", "Started a local Ray instance", "Token authentication",
                    "Reporting training result", "mlflow.store.db.utils", "alembic"):
        assert chatter not in terminal, chatter
    # a Train worker's only lines are sisray's progress of the training (step, loss, rate, time left)
    workers = [line for line in terminal.splitlines() if "RayTrainWorker" in line]
    assert any("round_01 training: " in line for line in workers)
    assert all(" training: " in line and " steps (" in line for line in workers), workers[:3]
    summary = json.loads((tmp_path / "runs" / "synthetic" / "summary.json").read_text())
    assert summary["complete"] and set(summary["source_only"]) >= {"miou19", "miou16", "miou13", "per_class"}
    assert [r["p"] for r in summary["rounds"]] == [0.2]
    for block in summary["rounds"]:
        assert block["selected_images"] > 0 and block["patches"] == 2 * block["selected_images"]
        assert len(block["thresholds"]) == 19 and "road" in block["thresholds"]
        assert set(block["timings_s"]) == set(rounds.ROUND_STAGES)
        ran = {k for k, v in block["timings_s"].items() if v is not None}
        assert ran == set(rounds.ROUND_STAGES) - {"target_scores", "safeguard"}  # no safeguard here
        assert "safeguard" not in block and summary["safeguard"] == []
        assert "pseudo_label_accuracy" in block  # the benchmark has train labels: reported, not used
    assert summary["final"] == summary["rounds"][-1]["evaluation"]  # always the last round's model
    # the round scores in the source model's evaluation pass and re-estimates its target statistics in
    # its fit: no Ray pass of their own; its evaluation computes the validators (validation.images) in
    # its own pass
    passes = summary["ray_passes"]
    assert [passes[f"round_01/{s}"] for s in ("score", "patches", "train", "target_bn", "eval")] == [0, 1, 1, 0, 1]
    assert summary["rounds"][0]["ray_passes"] == 3 and passes["source/target_bn"] == 1
    assert (tmp_path / "runs" / "synthetic" / "source" / "target_bn" / "target_scores.parquet").is_file()
    assert summary["source_target_bn"]["miou"] != summary["source_only"]["miou"]
    assert set(summary["final"]["validators"]) == set(HIGHER_IS_BETTER)  # validation.images: on target-train images
    assert "+ target BN" in done.stdout
    for folder in ("source", "round_01"):
        assert (tmp_path / "runs" / "synthetic" / folder / "target_bn" / "model.pt").is_file()
    assert (tmp_path / "runs" / "synthetic" / "round_01" / "target_bn" / "train_state.pt").is_file()
    # the shipped source model, adapted as it is (it predicts the benchmark's 13 classes only), not trained
    assert "source/train" not in json.loads((tmp_path / "runs" / "synthetic" / "state.json").read_text())["finished"]
    assert not (tmp_path / "runs" / "synthetic" / "source" / "checkpoint").exists()
    shipped = torch.load(shipped_path("shipped:synthetic"), weights_only=True)
    assert shipped["label_space.allowed"].nonzero().flatten().tolist() == list(CLASSES)
    assert summary["source_only"]["per_class"]["road"] > 0.5  # a trained model, not ImageNet weights
    assert all(summary["final"]["per_class"][name] is None for name in ("rider", "truck", "bus", "train"))

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sisray").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["lse.p0"] == "0.2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "target_val/miou19")] == [0, 1]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "target_val/validators/bnm")] == [0, 1]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "source_target_bn/miou19")] == [0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "round/selected_images")] == [1]
    assert client.get_metric_history(run.info.run_id, "round_01/target_loss")
    artifacts = {a.path for folder in ("", "round_01") for a in client.list_artifacts(run.info.run_id, folder or None)}
    assert {"summary.json", "config.yaml", "round_01/thresholds.json", "round_01/pseudo_labels.png"} <= artifacts

    # a finished run: nothing is redone, the same MLflow run is continued, and Ray is not needed (a
    # cluster address where none listens)
    again = job(RAY_ADDRESS="127.0.0.1:9")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "== round" not in again.stdout
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "round/selected_images")] == [1]

    resumed = job("--resume", "runs/synthetic")  # the config saved in the run directory
    assert resumed.returncode == 0 and "== round" not in resumed.stdout, resumed.stderr[-3000:]

    other = job("--set", "lse.scale=1.5")
    assert other.returncode == 2 and "lse.scale = 2.0 there, 1.5 now" in other.stderr
    assert "Traceback" not in other.stderr


def test_a_relative_source_checkpoint_reaches_workers_as_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Ray workers run elsewhere: a relative path would name another file
    cfg = load_config(None, ["model.source_checkpoint=models/source", f"run_dir={tmp_path / 'run'}"])
    assert rounds.source_checkpoint(cfg, RunStore(cfg.run_dir)) == str(tmp_path / "models" / "source")
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}"])  # trained by the source stage of the run
    assert rounds.source_checkpoint(cfg, RunStore("run")) == str(tmp_path / "run" / "source" / "checkpoint")


def test_a_stage_whose_files_changed_is_redone_with_every_later_stage(tmp_path, capsys):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    state = run_state.RunState(RunStore(tmp_path), cfg)
    (tmp_path / "round_01").mkdir()
    state.run("round_01/score", lambda: (tmp_path / "round_01" / "scores.parquet").write_bytes(b"s" * 100))
    state.run("round_01/select", lambda: (tmp_path / "round_01" / "selection.json").write_text("[1, 2]"))
    state.run("round_01/patches", lambda: (tmp_path / "round_01" / "patches").mkdir()
              or (tmp_path / "round_01" / "patches" / "part-00000.parquet").write_bytes(b"p" * 50))
    assert list(state.data["outputs"]) == ["round_01/score", "round_01/select", "round_01/patches"]
    assert list(state.data["outputs"]["round_01/patches"]) == ["round_01/patches/part-00000.parquet"]
    assert run_state.RunState(RunStore(tmp_path), cfg).data["finished"] == state.data["finished"]  # intact: kept

    with open(tmp_path / "round_01" / "selection.json", "r+b") as f:
        f.truncate(3)  # a partial write
    again = run_state.RunState(RunStore(tmp_path), cfg)
    assert list(again.data["finished"]) == ["round_01/score"]
    assert "selection.json differs from what it wrote (round_01/select): redoing round_01/select and the 1 " \
           "stage(s) after it" in capsys.readouterr().out
    redone = []
    again.run("round_01/score", lambda: redone.append("score"))
    again.run("round_01/select", lambda: redone.append("select")
              or (tmp_path / "round_01" / "selection.json").write_text("[1, 2]"))
    assert redone == ["select"]

    (tmp_path / "round_01" / "scores.parquet").unlink()
    assert run_state.RunState(RunStore(tmp_path), cfg).data["finished"] == {}
    assert "scores.parquet is missing (round_01/score)" in capsys.readouterr().out


def test_rounds_that_cannot_select_anything_are_known_before_any_work():
    cfg = load_config(None, ["lse.p0=0.2", "lse.p_step=0.1", "lse.p_max=0.4"])
    assert rounds.rounds_without_selection(cfg, 62) == [0.2, 0.3]  # floor(62 * 0.3 / 19) = 0, floor(62 * 0.4 / 19) = 1
    assert rounds.rounds_without_selection(cfg, 95) == []
    assert rounds.rounds_without_selection(load_config(None, ["lse.p0=0.2", "lse.min_per_class=1"]), 62) == []
    assert rounds.rounds_without_selection(load_config(None, ["lse.p0=0.2", "lse.selection=global"]), 62) == []


def test_round_warmup_ramps_the_rate_then_follows_the_recipe():
    model = build_model("lraspp_lite0")
    adam, schedule = make_optimizer(model, 1e-4, 8, warmup_steps=4)
    rates = []
    for _ in range(6):
        rates.append(adam.param_groups[0]["lr"])
        adam.step()
        schedule.step()
    assert rates == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4])  # Adam's recipe is constant after it
    assert [g["lr"] for g in adam.param_groups] == pytest.approx([1e-4, 1e-3])  # the new head at 10x


def test_frozen_batchnorm_keeps_its_statistics_but_its_affine_parameters_train():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5))
    net.train()
    freeze_batchnorm_statistics(net)
    before = net[1].running_mean.clone()
    net(torch.rand(2, 3, 4, 4) * 10).sum().backward()
    assert torch.equal(net[1].running_mean, before)
    assert net[1].weight.grad is not None and net[2].training  # dropout still trains


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900, method="thread")
def test_ctrl_c_during_retraining_ends_the_run_killed_and_the_same_command_resumes_it(
        small_benchmark, fcn_checkpoint, tmp_path):
    """Ctrl-C (SIGINT to the job's process group, as a terminal sends it) once the round's retraining
    has recorded a checkpoint: exit 130 with what to do, the MLflow run KILLED, the run directory's
    lock given back, the retraining not recorded as finished; the same command goes on from that
    checkpoint and ends the same MLflow run FINISHED."""
    import signal

    from mlflow.tracking import MlflowClient
    from processes import stop_when

    from conftest import set_args, small_adaptation

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    settings = [*small_adaptation(small_benchmark, fcn_checkpoint), "lse.p_max=0.5",  # one round,
                "train.epochs_per_round=20",  # 20 steps of 4 of the 4 patches: the interrupt lands among them
                "lse.safeguard=false", "tracking.enabled=true", f"tracking.uri={uri}"]
    command = [sys.executable, str(REPO / "jobs" / "adapt.py"), "--run-dir", str(run_dir), *set_args(settings)]
    snapshot = run_dir / "round_01" / "train" / "checkpoint_manager_snapshot.json"

    def checkpoint_recorded() -> bool:
        try:
            return bool(json.loads(snapshot.read_text())["checkpoint_results"])
        except (OSError, ValueError, KeyError):
            return False

    code, err = stop_when(command, tmp_path, checkpoint_recorded, signal.SIGINT)
    assert code == 130, err[-3000:]
    assert "interrupted: the same command resumes the run" in err, err[-3000:]
    finished = json.loads((run_dir / "state.json").read_text())["finished"]
    assert "round_01/patches" in finished and "round_01/train" not in finished
    assert not (run_dir / ".lock").exists()
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sisray").experiment_id])
    assert run.info.status == "KILLED"

    again = subprocess.run(command, cwd=tmp_path, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "== round_01/score" not in again.stdout and "== round_01/train" in again.stdout
    last = json.loads(snapshot.read_text())["checkpoint_results"][-1]["metrics"]
    assert last["step"] == 20 and 0 < last["resumed_from"] < 20  # from the interrupted run's checkpoint
    (resumed,) = client.search_runs([run.info.experiment_id])
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
