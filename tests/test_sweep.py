"""Sweeps: search spaces validated against the config schema, trial resources, the rank
correlation; and a smoke sweep on Ray Tune end to end (interrupted, resumed, best config)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import set_args
from sisray.config import load_config
from sisray.errors import ConfigError
from sisray.sweep import load_space, param_space, spearman, trial_config, trial_metrics, trial_slots
from sisray.validators import HIGHER_IS_BETTER

REPO = Path(__file__).resolve().parents[1]
BASE = load_config(REPO / "configs" / "synthetic.yaml")


def _space(tmp_path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_every_space_in_the_repository_is_valid():
    spaces = sorted((REPO / "tune_spaces").glob("*.yaml"))
    assert {p.stem for p in spaces} >= {"smoke", "lse_thresholds", "lse_scales"}
    for path in spaces:
        space = load_space(path, BASE)
        assert space.dimensions and param_space(space, "random")


@pytest.mark.parametrize("text, message", [
    ("space:\n  lse.scael: {uniform: [1.5, 3]}\n", r"space.lse.scael: unknown key 'lse.scael'; lse allows: p0"),
    ("space:\n  lse: {choice: [1, 2]}\n", r"'lse' is a section, not a value"),
    ("space:\n  model.width: {choice: [0.5, 1]}\n", r"space.model.width: this key cannot be swept"),
    ("space:\n  lse.scale: {normal: [2, 1]}\n", r"space.lse.scale: expected one of \{choice: ..., grid"),
    ("space:\n  lse.scale: {uniform: [3, 1.5]}\n", r"uniform needs \[low, high\] with low < high, got \[3, 1.5\]"),
    ("space:\n  train.lr: {loguniform: [0, 0.1]}\n", r"loguniform needs low > 0, got 0"),
    ("space:\n  lse.patches_per_image: {uniform: [2, 8]}\n", r"lse.patches_per_image takes int values; use randint"),
    ("space:\n  lse.scale: {uniform: [0.5, 2]}\n", r"space.lse.scale: 0.5 is not a valid value: lse.scale = 0.5 is out of range"),
    ("space:\n  lse.threshold.estimator: {choice: [cutoff_image, median]}\n",
     r"space.lse.threshold.estimator: 'median' is not a valid value"),
    ("space:\n  lse.scale: {choice: []}\n", r"choice needs a non-empty list"),
    ("space: {}\n", r"expected a non-empty mapping `space:`"),
    ("space:\n  lse.scale: {choice: [2]}\nrounds: 2\n", r"unknown top-level key\(s\) rounds; expected space, trial"),
    ("space:\n  lse.scale: {choice: [2]}\ntrial:\n  lse.pmax: 0.3\n", r"trial.lse.pmax: unknown key 'lse.pmax'"),
    ("space:\n  lse.scale: {choice: [2]}\ntrial:\n  lse.p0: 0.9\n", r"the trial overrides: lse.p0 = 0.9 is above"),
])
def test_a_bad_space_is_refused_naming_the_file_and_key(tmp_path, text, message):
    path = _space(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_space(path, BASE)
    assert str(path) in str(caught.value)


def test_search_algorithms_take_the_distributions_they_can_sample(tmp_path):
    from ray import tune

    mixed = load_space(_space(tmp_path, "space:\n  lse.scale: {uniform: [1.5, 3]}\n"
                                        "  lse.threshold.estimator: {choice: [cutoff_image, window]}\n"
                                        "  lse.patches_per_image: {randint: [2, 8]}\n"), BASE)
    space = param_space(mixed, "random")
    assert isinstance(space["lse.scale"], tune.search.sample.Float)
    assert space["lse.patches_per_image"].upper == 9  # randint's high is included; Tune's is not
    with pytest.raises(ConfigError, match="space.lse.scale is uniform: --search grid needs choice or grid"):
        param_space(mixed, "grid")
    grid = load_space(_space(tmp_path, "space:\n  lse.scale: {grid: [1.5, 2]}\n"), BASE)
    assert param_space(grid, "random")["lse.scale"] == {"grid_search": [1.5, 2]}
    with pytest.raises(ConfigError, match="space.lse.scale is a grid: use choice with --search optuna"):
        param_space(grid, "optuna")


def _proposals(search: str, space, seed: int, tmp_path) -> list[dict]:
    from ray import tune

    from sisray.sweep import search_algorithm

    def trial(params):
        tune.report({"score": float(params["lse.scale"])})

    tuner = tune.Tuner(trial, param_space=param_space(space, search),
                       tune_config=tune.TuneConfig(metric="score", mode="max", num_samples=4, reuse_actors=True,
                                                   search_alg=search_algorithm(search, seed, 1)),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0))
    return sorted((r.config for r in tuner.fit()), key=lambda c: json.dumps(c, sort_keys=True))


@pytest.mark.ray
@pytest.mark.timeout(300, method="thread")
@pytest.mark.parametrize("search", ["random", "optuna"])
def test_the_same_seed_proposes_the_same_trials(ray_session, tmp_path, search):
    space = load_space(_space(tmp_path, "space:\n  lse.scale: {uniform: [1.5, 3]}\n"
                                        "  lse.threshold.estimator: {choice: [cutoff_image, window, quantile]}\n"),
                       BASE)
    first = _proposals(search, space, 7, tmp_path / "a")
    assert first == _proposals(search, space, 7, tmp_path / "b")
    assert first != _proposals(search, space, 8, tmp_path / "c")
    assert all(1.5 <= c["lse.scale"] <= 3 for c in first)


def test_a_trial_config_applies_the_trial_overrides_then_the_sampled_values():
    cfg = trial_config(BASE, {"lse.p_max": 0.3, "lse.scale": 1.25}, {"lse.scale": 2.5}, "/sweep/trials/t1")
    assert (cfg.lse.p_max, cfg.lse.scale, cfg.run_dir) == (0.3, 2.5, "/sweep/trials/t1")
    assert BASE.lse.p_max == 0.4  # the base is not modified


def test_trials_share_the_cluster_without_starving_each_other():
    cfg = load_config(None)
    slots = trial_slots(cfg, cpus=2, gpus=0)  # 0.5 CPU trial + 1 actor at 0.5 + 1 CPU for Ray Data's tasks
    assert (slots.concurrent, slots.actors, slots.workers) == (1, 1, 2)
    slots = trial_slots(cfg, cpus=16, gpus=0, concurrent=4)  # 4 CPUs each
    assert (slots.concurrent, slots.actors, slots.workers) == (4, 5, 4)
    slots = trial_slots(cfg, cpus=64, gpus=8)  # one GPU per trial
    assert (slots.concurrent, slots.actors, slots.workers) == (8, 1, 1)
    with pytest.raises(ConfigError, match="4 concurrent trial\\(s\\) on 2 CPUs leave 0.5 CPUs each"):
        trial_slots(cfg, cpus=2, gpus=0, concurrent=4)


def test_rank_correlation():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)  # ties share ranks
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_a_round_reports_its_label_free_statistics_and_target_miou():
    block = {"round": 2, "selected_images": 5, "patches": 20,
             "evaluation": {"miou": 0.3, "miou19": 0.25, "miou16": 0.27, "miou13": 0.32,
                            "label_free": {"information": 0.1, "mean_entropy": 0.4, "class_entropy": 0.5}}}
    assert trial_metrics(block) == {"round": 2, "target_val_miou19": 0.25, "target_val_miou": 0.3,
                                    "target_val_miou16": 0.27, "target_val_miou13": 0.32,
                                    "selected_images": 5, "patches": 20, "information": 0.1,
                                    "mean_entropy": 0.4, "class_entropy": 0.5}


@pytest.mark.parametrize("source, metric", [("synthia", "target_val_miou16"), ("gta5", "target_val_miou"),
                                            ("synthetic", "target_val_miou")])
def test_target_miou_is_the_headline_figure_of_the_pair(source, metric):
    """From SYNTHIA the paper reports mIoU16 (and mIoU13), from GTA5 the target's mIoU19."""
    from sisray.sweep.driver import objective

    cfg = load_config(None, [f"data.source.name={source}"])
    assert objective("target_miou", cfg) == (metric, "max", True)
    assert objective("information", cfg) == ("information", "max", False)


class _Result:
    """What summarise reads of a Tune result."""

    def __init__(self, trial_id, scale, rounds, information, error=None):
        self.metrics = {"trial_id": trial_id, "round": rounds, "information": information,
                        "target_val_miou19": 0.1 * scale}
        self.config, self.error, self.path = {"lse.scale": scale}, error, f"/sweep/tuner/{trial_id}"


@pytest.mark.parametrize("mode, best", [("max", "b"), ("min", "c")])
def test_the_best_trial_is_the_best_finalist_by_the_objective(tmp_path, mode, best):
    from sisray.sweep import summarise

    space = load_space(_space(tmp_path, "space:\n  lse.scale: {choice: [1.5, 2.0, 2.5, 3.0]}\n"), BASE)
    results = [_Result("a", 1.5, 2, 0.30), _Result("b", 2.0, 2, 0.40), _Result("c", 2.5, 2, 0.20),
               _Result("d", 3.0, 1, 0.90),  # stopped early by ASHA: not a finalist, however good
               _Result("e", 3.0, 2, 0.95, error="worker died")]  # failed: never the best
    summary = summarise(results, space, "information", mode)
    assert summary["best"]["trial_id"] == best and summary["rounds_of_finalists"] == 2
    assert [t["trial_id"] for t in summary["trials"]] == ["a", "b", "c", "d", "e"]
    assert summary["rank_correlation_with_target_miou19"]["information"] == pytest.approx(-0.5)


def report_by_scale(params):
    """A stand-in trial (no adaptation): two rounds whose `information` grows with lse.scale."""
    from ray import tune

    for r in (1, 2):
        tune.report({"round": r, "information": params["lse.scale"] / 10 + r / 100, "target_val_miou19": 0.3,
                     "trial_id": tune.get_context().get_trial_id()})


@pytest.mark.ray
@pytest.mark.timeout(600, method="thread")
def test_a_grid_sweep_with_fifo_runs_every_point_and_writes_the_best(ray_session, small_benchmark, fcn_checkpoint,
                                                                    tmp_path, monkeypatch):
    """--search grid --scheduler fifo (the README's sweep) through the real driver: every grid point
    runs both rounds, and the best by the objective is written as best_config.yaml."""
    from ray import cloudpickle

    from sisray.sweep import SweepArgs, run_sweep, trial

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules
    monkeypatch.setattr(trial, "adapt_trial", lambda params, setup: report_by_scale(params))
    space = _space(tmp_path, "space:\n  lse.scale: {choice: [1.5, 2.0, 2.5]}\n"
                             "  lse.threshold.estimator: {grid: [cutoff_image, quantile]}\n")
    cfg = load_config(REPO / "configs" / "synthetic.yaml", [
        f"data.source.root={small_benchmark}", f"data.target.root={small_benchmark}", "tracking.enabled=false",
        "model.name=fcn8s_vgg16", "model.width=0.0625", f"model.source_checkpoint={fcn_checkpoint}",
        "lse.target_bn=false"])
    run_sweep(cfg, SweepArgs(str(space), str(tmp_path / "sweep"), search="grid", scheduler="fifo"))
    summary = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    points = {(t["params"]["lse.scale"], t["params"]["lse.threshold.estimator"]) for t in summary["trials"]}
    assert points == {(s, e) for s in (1.5, 2.0, 2.5) for e in ("cutoff_image", "quantile")}  # 3 x 2, once each
    assert all(t["rounds"] == 2 for t in summary["trials"]) and summary["scheduler"] == "fifo"
    assert summary["best"]["params"]["lse.scale"] == 2.5
    assert load_config(tmp_path / "sweep" / "best_config.yaml").lse.scale == 2.5


def test_the_job_refuses_a_bad_space_before_starting_anything(tmp_path):
    space = _space(tmp_path, "space:\n  lse.scale: {uniform: [1.5, 3]}\n")
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "tune.py"), "--space", str(space), "--search", "grid",
                           "--run-dir", str(tmp_path / "sweep")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--search grid needs choice or grid values" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "sweep").exists()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1500, method="thread")
def test_a_smoke_sweep_is_interrupted_resumes_and_writes_a_best_config(small_benchmark, tmp_path):
    """`jobs/tune.py --space` the smoke space, one round per trial (its two rounds: the grid sweep's
    test): Ctrl-C once a trial has finished, the same command again; 2 trials in all, the finished one
    not run again, MLflow parent and child runs, and a best config that loads as `jobs/adapt.py`
    loads it."""
    from mlflow.tracking import MlflowClient

    from sisray.weights import shipped_path

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = tmp_path / "sweep"
    # the default's model and target BN (a trial's tasks run outside its placement group) on small images:
    # the shipped model's file, as a checkpoint of other source images
    source = shipped_path("shipped:synthetic")
    small = [f"data.source.root={small_benchmark}", f"data.target.root={small_benchmark}",
             "data.source.size=[64, 36]", "data.target.size=[64, 32]", f"model.source_checkpoint={source}",
             "train.batch_size=4", "lse.selection=global",
             "lse.patches_per_image=2", f"tracking.uri={uri}"]
    smoke = (REPO / "tune_spaces" / "smoke.yaml").read_text()
    assert "  lse.p_max: 0.3\n" in smoke and "lse.scale: {choice: [1.5, 2.0]}" in smoke
    # p = 0.2 only; one scale (the validators read it): the second trial takes the first's source stages
    space = _space(tmp_path, smoke.replace("  lse.p_max: 0.3\n", "  lse.p_max: 0.2\n").replace(
        "lse.scale: {choice: [1.5, 2.0]}", "lse.scale: {choice: [2.0]}"))
    command = [sys.executable, str(REPO / "jobs" / "tune.py"), "--space", str(space),
               "--num-samples", "2", "--run-dir", str(sweep), "--objective", "validator_bnm", *set_args(small)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    finished_trial = None
    while finished_trial is None and first.poll() is None:
        time.sleep(2)
        for state in sweep.glob("trials/*/state.json"):
            if "round_01/log" in json.loads(state.read_text())["finished"]:  # its last stage
                finished_trial = state
    assert finished_trial is not None, first.communicate()[1][-3000:]
    os.killpg(first.pid, signal.SIGINT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 130 and "sweep interrupted" in err, err[-3000:]
    done = json.loads(finished_trial.read_text())["finished"]  # stage -> seconds

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    # the finished trial's stages were not run again (Tune may restore a trial interrupted between its
    # last stage and its last report: that re-runs no stage)
    assert json.loads(finished_trial.read_text())["finished"] == done
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert len(summary["trials"]) == 2 and not any(t["error"] for t in summary["trials"])
    assert summary["best"]["rounds"] == 1 and "validator_bnm" in summary["best"]
    finalists = [t for t in summary["trials"] if t["rounds"] == 1]
    assert summary["best"]["validator_bnm"] == max(t["validator_bnm"] for t in finalists)  # the objective's best
    assert {t["params"]["lse.scale"] for t in summary["trials"]} == {2.0}
    adopted = [json.loads(f.read_text()).get("adopted_from", {}) for f in sweep.glob("trials/*/summary.json")]
    assert sorted(map(sorted, adopted)) == [[], ["source/classes", "source/eval", "source/narrow", "source/target_bn",
                                                      "source/target_bn_eval"]]
    assert len(list((sweep / "shared_source").iterdir())) == 1
    bench = subprocess.run([sys.executable, str(REPO / "bench" / "sweep.py"), "--report", str(sweep)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)  # bench/sweep.py reads what it ran
    assert bench.returncode == 0, bench.stderr[-3000:]
    figures = json.loads(bench.stdout.strip().splitlines()[-1])
    assert (figures["trials"], figures["source_stages_computed"], figures["source_stages_adopted"]) == (2, 1, 1)
    assert figures["pick"]["params"] == summary["best"]["params"] and figures["objective"] == "validator_bnm"
    assert figures["regret"] == round(100 * (max(t["target_val_miou19"] for t in summary["trials"])
                                             - summary["best"]["target_val_miou19"]), 2)

    best = load_config(sweep / "best_config.yaml")  # what jobs/adapt.py --config does
    assert (best.lse.scale, best.lse.threshold.estimator) == (summary["best"]["params"]["lse.scale"],
                                                             summary["best"]["params"]["lse.threshold.estimator"])
    assert best.lse.p_max == 0.4 and best.model.source_checkpoint == source  # not the trial's 0.2

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("sisray").experiment_id
    (parent,) = client.search_runs([experiment], filter_string="tags.`sisray.job` = 'tune'")
    assert parent.info.status == "FINISHED" and parent.data.tags["sisray.uses_target_labels"] == "false"
    assert parent.data.params["sweep.objective"] == "validator_bnm"
    assert {"sweep_summary.json", "validators.csv", "validators.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    table = client.download_artifacts(parent.info.run_id, "validators.csv", str(tmp_path))
    header, *rows = Path(table).read_text().splitlines()
    assert len(rows) == 2 and {f"validator_{n}" for n in HIGHER_IS_BETTER} <= set(header.split(","))
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2 and {c.info.status for c in children} <= {"FINISHED", "KILLED"}
    for child in children:
        assert child.data.params["lse.scale"] == "2.0" and child.data.params["lse.p_max"] == "0.2"
        # the source model's evaluation (step 0: computed, or adopted from the other trial) and round 1's
        assert {m.step for m in client.get_metric_history(child.info.run_id, "target_val/label_free/information")} == {0, 1}
        for name in HIGHER_IS_BETTER:  # every validator, on target-train images (the objective turned them on)
            assert client.get_metric_history(child.info.run_id, f"target_val/validators/{name}"), name
