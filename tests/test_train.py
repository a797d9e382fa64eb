from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from sisray.config import load_config
from sisray.datasets import open_source
from sisray.models import build_model
from sisray.datasets.synthetic import CLASSES
from sisray.lse.losses import cross_entropy
from sisray.optim import make_optimizer
from sisray.rundir import STUDENT
from sisray.stages.train import fit, steps_for, train_source
from sisray.stages.train_loop import TrainSpec, global_batch
from sisray.storage import RunStore


def test_every_sample_once_per_epoch_and_batches_are_seeded():
    n, batch = 10, 4
    stream = [i for step in range(5) for i in global_batch(step, batch, n, seed=3)]  # 2 epochs
    assert Counter(stream[:10]) == Counter(range(10)) and Counter(stream[10:20]) == Counter(range(10))
    assert global_batch(2, batch, n, seed=3) == global_batch(2, batch, n, seed=3)
    assert global_batch(0, batch, n, seed=3) != global_batch(0, batch, n, seed=4)


def test_a_holdout_is_a_seeded_share_of_the_labelled_set_kept_out_of_training():
    from sisray.stages.train_loop import holdout_split

    assert holdout_split(10, 0.0, seed=3) == (list(range(10)), [])  # no share: every sample, in order
    trained, held = holdout_split(10, 0.3, seed=3)
    assert len(held) == 3 and sorted(trained + held) == list(range(10)) and not set(trained) & set(held)
    assert holdout_split(10, 0.3, seed=3) == (trained, held) and holdout_split(10, 0.3, seed=4)[1] != held


def test_length_is_independent_of_batch_size_in_samples():
    assert steps_for(2.0, 600, 8) == 150 and steps_for(2.0, 600, 1) == 1200
    assert steps_for(0.5, 10, 3) == 2 and steps_for(1e-9, 10, 3) == 1


def test_cross_entropy_is_zero_without_valid_pixels():
    logits = torch.randn(2, 19, 4, 4, requires_grad=True)
    loss = cross_entropy(logits, torch.full((2, 4, 4), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_optimiser_presets():
    vgg = build_model("fcn8s_vgg16", width=0.0625)
    adam, _ = make_optimizer(vgg, None, 10)
    assert isinstance(adam, torch.optim.Adam) and [g["lr"] for g in adam.param_groups] == [1e-6, 2e-6]
    assert adam.defaults["betas"] == (0.9, 0.99)
    trained = {id(p) for g in adam.param_groups for p in g["params"]}
    assert id(vgg.upscore8.weight) not in trained  # fixed bilinear upsampling
    deeplab = build_model("deeplabv2_r101", width=0.0625)
    sgd, poly = make_optimizer(deeplab, 1e-3, 10)
    assert [g["lr"] for g in sgd.param_groups] == [1e-3, 1e-2]
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 5e-4
    for _ in range(5):
        sgd.step()
        poly.step()
    assert sgd.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 ** 0.9)


def _config(root: Path, run_dir: Path, *extra: str):
    return load_config(None, [
        "data.source.name=synthetic", f"data.source.root={root}", "data.source.size=[64, 36]",
        "data.target.name=synthetic", f"data.target.root={root}", "data.target.size=[64, 32]",
        "model.init=random", "model.width=0.0625", "train.batch_size=4", "train.num_workers=2", "train.lr=1e-3",
        "train.checkpoint_every=2", f"run_dir={run_dir}", "tracking.enabled=false", *extra])


def _spec(cfg, steps: int, **options) -> TrainSpec:
    return TrainSpec(cfg, "source", steps, cfg.model.init, threads=1, logger=None, lr=cfg.train.lr,
                     **options)


# With a moving average of the weights (lse.ema_decay), which a resumed run must continue, not
# restart, and the label space of the source's classes; 2 of the 6 source images held out.
OPTIONS = {"ema_decay": 0.5, "classes": CLASSES}
HOLDOUT = "train.holdout=0.34"


@pytest.fixture(scope="module")
def uninterrupted(ray_session, small_benchmark, tmp_path_factory):
    """4 steps on 2 workers, uninterrupted: the reference of the resumed and the restarted runs."""
    folder = tmp_path_factory.mktemp("whole")
    whole = _config(small_benchmark, folder, HOLDOUT)
    return fit(whole, _spec(whole, 4, **OPTIONS), RunStore(folder), "source")


@pytest.mark.ray
def test_two_workers_lower_the_loss_and_a_resumed_run_equals_an_uninterrupted_one(uninterrupted, small_benchmark,
                                                                                  tmp_path):
    folder = Path(uninterrupted.checkpoint.path)
    final = torch.load(folder / "model.pt", weights_only=True)  # a plain state dict: the moving average
    student = torch.load(folder / STUDENT, weights_only=True)  # the trained weights
    assert torch.load(folder / "train_state.pt", weights_only=True)["step"] == 4
    assert uninterrupted.metrics["resumed_from"] == 0
    assert final["label_space.allowed"].nonzero().flatten().tolist() == list(CLASSES)
    assert not torch.allclose(final["score_fr.weight"], student["score_fr.weight"])

    source = open_source(_config(small_benchmark, tmp_path).data.source)
    images = torch.stack([source[i][0] for i in range(len(source))])
    labels = torch.stack([source[i][1] for i in range(len(source))])
    model = build_model("fcn8s_vgg16", width=0.0625).eval()
    with torch.no_grad():
        before = cross_entropy(model(images), labels).item()
        model.load_state_dict(final)
        after = cross_entropy(model(images), labels).item()
    assert before == pytest.approx(math.log(19), abs=1e-4)  # zero-initialised scores: uniform prediction
    assert after < before - 0.05

    # the held-out images' loss at each checkpoint (steps 2 and 4): the last is the final model's
    from sisray.stages.train_loop import holdout_split

    curve = torch.load(folder / "train_state.pt", weights_only=True)["holdout_loss"]
    assert [step for step, _ in curve] == [2, 4] and uninterrupted.metrics["holdout_loss"] == curve[-1][1]
    _, held_out = holdout_split(len(source), 0.34, seed=0)
    assert len(held_out) == 2
    with torch.no_grad():
        assert curve[-1][1] == pytest.approx(cross_entropy(model(images[held_out]), labels[held_out]).item(), rel=1e-4)

    # Interrupted after step 2, then the same command again: continues from the saved step. These two
    # load their batches ahead on threads (train.prefetch): the seeded batches must be the same.
    part = _config(small_benchmark, tmp_path / "part", HOLDOUT)
    fit(part, _spec(part, 2, prefetch=2, **OPTIONS), RunStore(tmp_path / "part"), "source")
    resumed = fit(part, _spec(part, 4, prefetch=2, **OPTIONS), RunStore(tmp_path / "part"), "source")
    assert resumed.metrics["resumed_from"] == 2 and resumed.metrics["step"] == 4
    for name, weights in (("model.pt", final), (STUDENT, student)):
        again = torch.load(Path(resumed.checkpoint.path) / name, weights_only=True)
        for key in weights:
            assert torch.allclose(weights[key].float(), again[key].float(), atol=1e-6), (name, key)
    resumed_curve = torch.load(Path(resumed.checkpoint.path) / "train_state.pt", weights_only=True)["holdout_loss"]
    assert [s for s, _ in resumed_curve] == [2, 4]  # the curve carries over the interruption
    assert [v for _, v in resumed_curve] == pytest.approx([v for _, v in curve], abs=1e-5)


DYING = {"marker": "", "run_dir": ""}  # read inside the Train workers: this module is pickled by value


def _first_checkpoint_registered(run_dir: Path, timeout: float = 60.0) -> None:
    """Wait until Ray Train's controller has recorded a checkpoint in its snapshot file: a worker's
    report reaches the controller only at its next poll, so a worker dying right after reporting can
    take the report with it (then the restart rightly begins from step 0, and the test means nothing)."""
    import json
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for snapshot in run_dir.rglob("checkpoint_manager_snapshot.json"):
            try:
                if json.loads(snapshot.read_text())["checkpoint_results"]:
                    return
            except (ValueError, KeyError, OSError):
                pass  # being written
        time.sleep(0.1)
    raise TimeoutError(f"no checkpoint recorded under {run_dir} within {timeout} s")


def dying_loop(loop_config):
    """train_loop, but the rank-1 worker kills its own process when it comes to report its second
    checkpoint, once the first is recorded by the controller; once: a marker file remembers it across
    the restart."""
    import os

    import ray.train

    from sisray.stages import train_loop as module

    marker = Path(DYING["marker"])
    if ray.train.get_context().get_world_rank() == 1 and not marker.exists():
        report, reports = module._report, []

        def die_at_the_second_report(*args, **kwargs):
            reports.append(1)
            if len(reports) == 2:
                _first_checkpoint_registered(Path(DYING["run_dir"]))
                marker.touch()
                os._exit(1)
            report(*args, **kwargs)
        module._report = die_at_the_second_report
    module.train_loop(loop_config)


@pytest.mark.ray
@pytest.mark.timeout(600, method="thread")
def test_a_train_worker_killed_mid_run_is_restarted_from_the_last_checkpoint(uninterrupted, small_benchmark, tmp_path):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    DYING.update(marker=str(tmp_path / "died"), run_dir=str(tmp_path / "hit"))
    final = torch.load(Path(uninterrupted.checkpoint.path) / "model.pt", weights_only=True)
    hit = _config(small_benchmark, tmp_path / "hit", HOLDOUT)
    result = fit(hit, _spec(hit, 4, **OPTIONS), RunStore(tmp_path / "hit"), "source", loop=dying_loop)
    assert (tmp_path / "died").exists()  # the worker did die, at step 4, after the step-2 checkpoint
    assert result.metrics["step"] == 4 and result.metrics["resumed_from"] == 2
    again = torch.load(Path(result.checkpoint.path) / "model.pt", weights_only=True)
    for key in final:
        assert torch.allclose(final[key], again[key], atol=1e-6), key


# A GTA5-layout source whose labels hold 4 of the 19 classes (road, building, sky, car), though the
# GTA5 loader declares all 19: the label space is what the labels contain.
GTA5_IDS = (0, 7, 11, 23, 26)  # unlabelled, road, building, sky, car
GTA5_CLASSES = (0, 2, 10, 13)


@pytest.fixture(scope="module")
def gta5_lacking_classes(tmp_path_factory) -> Path:
    from layouts import make_gta5

    root = tmp_path_factory.mktemp("gta5")
    make_gta5(root, n=6, label_ids=GTA5_IDS)
    return root


@pytest.mark.ray
def test_a_source_lacking_classes_trains_a_model_that_never_predicts_them(ray_session, small_benchmark,
                                                                        gta5_lacking_classes, tmp_path):
    from sisray.datasets import open_target

    cfg = _config(small_benchmark, tmp_path / "run", "train.source_epochs=0.5",  # 6 images, batch 4: 1 step
                  "data.source.name=gta5", f"data.source.root={gta5_lacking_classes}",
                  "train.rare_class_sampling=0.01")  # the workers draw by class (tests/test_sampling.py)
    out = train_source(cfg, RunStore(tmp_path / "run"), None)
    assert out == tmp_path / "run" / "source" / "checkpoint"
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "train_state.pt"]
    counted = json.loads((tmp_path / "run" / "source" / "classes.json").read_text())
    assert counted["classes"] == ["road", "building", "sky", "car"] and counted["labels"] == 6
    model = build_model("fcn8s_vgg16", width=0.0625, init=str(out)).eval()
    assert model.label_space.allowed.nonzero().flatten().tolist() == list(GTA5_CLASSES)
    target = open_target(cfg.data.target, "val", with_labels=False)
    with torch.no_grad():
        predicted = model(torch.stack([target.load_image(i) for i in range(len(target))])).argmax(1)
    assert set(predicted.unique().tolist()) <= set(GTA5_CLASSES)
    stamp = (out / "model.pt").stat().st_mtime_ns
    assert train_source(cfg, RunStore(tmp_path / "run"), None) == out  # finished: not trained again
    assert (out / "model.pt").stat().st_mtime_ns == stamp


def test_oracle_trains_on_the_target_train_labels(small_benchmark, tmp_path):
    from sisray.datasets.synthetic import SyntheticSource, SyntheticTarget
    from sisray.stages.train_loop import training_set

    assert isinstance(training_set(_config(small_benchmark, tmp_path)), SyntheticSource)
    oracle = training_set(_config(small_benchmark, tmp_path, "train.oracle=true"))
    assert isinstance(oracle, SyntheticTarget) and oracle.split == "train" and oracle.with_labels
    assert not bool((oracle.load_label(0) == 255).all())


def test_the_label_space_is_counted_from_the_labels_once_and_kept_with_the_run(gta5_lacking_classes, small_benchmark,
                                                                                tmp_path, monkeypatch):
    from sisray.datasets.base import SegmentationDataset
    from sisray.datasets.gta5 import GTA5
    from sisray.stages.label_space import label_space, unlabelled

    assert GTA5.eval_classes == tuple(range(19))  # what the loader declares: not what decides
    gta5 = _config(small_benchmark, tmp_path / "run", "data.source.name=gta5",
                   f"data.source.root={gta5_lacking_classes}")
    assert label_space(gta5, RunStore(tmp_path / "run")) == GTA5_CLASSES
    assert unlabelled(GTA5_CLASSES) == tuple(c for c in range(19) if c not in GTA5_CLASSES)
    counted = json.loads((tmp_path / "run" / "source" / "classes.json").read_text())
    assert counted["pixels"]["road"] > 0 and set(counted["images"].values()) == {6}  # every label holds all 4
    assert counted["image_classes"] == [list(GTA5_CLASSES)] * 6  # per image: what rare-class sampling draws from

    def not_again(self, threads=8):
        raise AssertionError("counted twice")
    monkeypatch.setattr(SegmentationDataset, "label_histograms", not_again)
    assert label_space(gta5, RunStore(tmp_path / "run")) == GTA5_CLASSES  # read back, not counted
    # the oracle's label space: the target train labels' classes (the benchmark's 13)
    oracle = _config(small_benchmark, tmp_path / "oracle", "train.oracle=true")
    monkeypatch.undo()
    assert label_space(oracle, RunStore(tmp_path / "oracle")) == CLASSES


def test_a_given_source_model_is_narrowed_to_the_label_space(fcn_checkpoint, gta5_lacking_classes, small_benchmark,
                                                             tmp_path):
    from sisray.stages.label_space import narrowed_source

    cfg = _config(small_benchmark, tmp_path / "run", f"model.source_checkpoint={fcn_checkpoint}")
    store = RunStore(tmp_path / "run")
    narrowed = narrowed_source(cfg, store, GTA5_CLASSES)  # the checkpoint predicts all 19
    assert narrowed == str(tmp_path / "run" / "source" / "checkpoint")
    given = torch.load(fcn_checkpoint, weights_only=True)
    kept = torch.load(Path(narrowed) / "model.pt", weights_only=True)
    assert kept["label_space.allowed"].nonzero().flatten().tolist() == list(GTA5_CLASSES)
    assert all(torch.equal(given[k], kept[k]) for k in given if k != "label_space.allowed")
    model = build_model("fcn8s_vgg16", width=0.0625, init=narrowed).eval()
    with torch.no_grad():
        predicted = model(torch.rand(2, 3, 32, 64) * 255).argmax(1)
    assert set(predicted.unique().tolist()) <= set(GTA5_CLASSES)
    # a checkpoint within the label space is used as it is
    assert narrowed_source(_config(small_benchmark, tmp_path / "other", f"model.source_checkpoint={narrowed}"),
                           RunStore(tmp_path / "other"), GTA5_CLASSES + (5,)) == narrowed
