"""A round's fit resumed from a checkpoint ends where the uninterrupted fit ends, bit for bit: the
student, the optimiser and the online teacher that relabels the patches are all restored. In
process, one worker, Ray Train's context stood in for (its checkpoints and reports are what the loop
sees of it); the end-to-end fault tests kill real workers (tests/test_storage.py, tests/test_faults.py)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import ray.train
import ray.train.torch
import torch
from PIL import Image

from scenes import class_coded_scene
from sisray import patch_set
from sisray.config import load_config
from sisray.lse.patches import scale_invariant_examples
from sisray.rundir import MODEL, ONLINE_TEACHER
from sisray.stages.train_loop import TrainSpec, train_loop

REPO = Path(__file__).resolve().parents[1]


class Killed(Exception):
    """The worker dies right after a checkpoint was reported."""


class StandIn:
    """What train_loop uses of ray.train for one worker: every reported checkpoint is kept, by step."""

    def __init__(self, folder: Path, restored: Path | None = None, killed_after: int | None = None):
        self.folder, self.restored, self.killed_after = folder, restored, killed_after

    def checkpoint(self, step: int) -> Path:
        return self.folder / f"step_{step}"

    def get_checkpoint(self):
        if self.restored is None:
            return None
        return SimpleNamespace(as_directory=lambda: contextlib.nullcontext(str(self.restored)))

    def report(self, metrics: dict, checkpoint=None) -> None:
        shutil.copytree(checkpoint.path, self.checkpoint(metrics["step"]))
        if metrics["step"] == self.killed_after:
            raise Killed

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(
            get_world_rank=lambda: 0, get_world_size=lambda: 1))
        monkeypatch.setattr(ray.train, "get_checkpoint", self.get_checkpoint)
        monkeypatch.setattr(ray.train, "report", self.report)
        monkeypatch.setattr(ray.train.Checkpoint, "from_directory", lambda path: SimpleNamespace(path=path))
        monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
        monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model: model)


def _patch_set(folder: Path) -> Path:
    """Eight zoomed examples (scale 2) of a class-coded scene, labelled with its true classes."""
    label, full, probs = class_coded_scene(5)
    image = folder / "scene_leftImg8bit.png"
    Image.fromarray(full.permute(1, 2, 0).numpy()).save(image)
    examples = scale_invariant_examples(full.float(), probs, torch.ones(32, 64, dtype=torch.bool), [2.0], 8,
                                        torch.Generator().manual_seed(0))
    rows = [patch_set.row(0, "scene", str(image), k, e.box, e.label, torch.ones(e.label.shape),
                          patch_set.Agreement.none()) for k, e in enumerate(examples)]
    (folder / "patches").mkdir()
    pq.write_table(patch_set.table(patch_set.columns(rows)), folder / "patches" / "part-00000.parquet")
    return folder / "patches"


@pytest.mark.timeout(300)
def test_a_round_resumed_after_a_kill_ends_as_the_uninterrupted_round(tmp_path, monkeypatch, small_benchmark,
                                                                      fcn_checkpoint):
    cfg = load_config(REPO / "configs" / "synthetic.yaml", [f"data.source.root={small_benchmark}", f"data.target.root={small_benchmark}",
                             "data.source.size=[64, 36]", "data.target.size=[64, 32]", "model.name=fcn8s_vgg16",
                             "model.width=0.0625", "train.batch_size=2", "train.checkpoint_every=3",
                             "model.source_checkpoint=null", "model.init=random", "lse.online_teacher=0.5",
                             "tracking.enabled=false"])
    # a fast teacher (decay 0.5): after 3 steps it labels the patches unlike the source model would
    spec = TrainSpec(config=cfg, stage="round_01", steps=8, init=str(fcn_checkpoint), threads=1, logger=None,
                     round=1, patches=str(_patch_set(tmp_path)), lr=1e-3, online_teacher=0.5)

    def fit(name: str, restored: Path | None = None, killed_after: int | None = None) -> StandIn:
        train = StandIn(tmp_path / name, restored, killed_after)
        train.folder.mkdir()
        train.install(monkeypatch)
        with pytest.raises(Killed) if killed_after else contextlib.nullcontext():
            train_loop({"spec": spec})
        return train

    whole = fit("whole")
    killed = fit("killed", killed_after=3)
    assert not killed.checkpoint(6).exists()
    resumed = fit("resumed", restored=killed.checkpoint(3))
    assert not resumed.checkpoint(3).exists() and resumed.checkpoint(6).exists()  # went on from step 3
    for name in (MODEL, ONLINE_TEACHER):
        ended, expected = (torch.load(t.checkpoint(8) / name, weights_only=True) for t in (resumed, whole))
        assert all(torch.equal(ended[k], expected[k]) for k in expected), name
    # the teacher moved: a resume that restored the student alone would relabel with other weights
    start = torch.load(fcn_checkpoint, weights_only=True)
    teacher = torch.load(whole.checkpoint(3) / ONLINE_TEACHER, weights_only=True)
    assert not all(torch.equal(teacher[k], start[k]) for k in start if k in teacher)


@pytest.mark.timeout(300)
def test_a_round_with_target_statistics_hands_them_over_in_its_final_checkpoint(tmp_path, monkeypatch,
                                                                               small_benchmark):
    """lse.target_bn: the last step's checkpoint holds the published model with BatchNorm statistics
    of the target-train images, as the source model's task computes them from model.pt; a fit resumed
    after its last step hands them over again."""
    from sisray.labels import NUM_CLASSES
    from sisray.models import build_model
    from sisray.rundir import TARGET_BN_MODEL
    from sisray.target_statistics import with_target_statistics

    cfg = load_config(REPO / "configs" / "synthetic.yaml", [f"data.source.root={small_benchmark}", f"data.target.root={small_benchmark}",
                             "data.source.size=[64, 36]", "data.target.size=[64, 32]", "model.name=lraspp_lite0",
                             "train.batch_size=2", "train.checkpoint_every=2",
                             "model.source_checkpoint=null", "model.init=random", "tracking.enabled=false"])
    spec = TrainSpec(config=cfg, stage="round_01", steps=4, init="random", threads=1, logger=None,
                     round=1, patches=str(_patch_set(tmp_path)), lr=1e-3, target_bn=True)
    train = StandIn(tmp_path / "fit")
    train.folder.mkdir()
    train.install(monkeypatch)
    train_loop({"spec": spec})
    assert not (train.checkpoint(2) / TARGET_BN_MODEL).exists()  # the last step's only
    handed = torch.load(train.checkpoint(4) / TARGET_BN_MODEL, weights_only=True)
    trained = build_model("lraspp_lite0", NUM_CLASSES, 1.0, str(train.checkpoint(4) / MODEL))
    expected, seen, skipped = with_target_statistics(cfg, trained, torch.device("cpu"))
    assert seen == 4 and not skipped
    assert handed.keys() == expected.keys() and all(torch.equal(handed[k], expected[k]) for k in expected)
    statistics = [k for k in expected if k.endswith("running_mean")]
    weights = torch.load(train.checkpoint(4) / MODEL, weights_only=True)
    assert statistics and not any(torch.equal(handed[k], weights[k]) for k in statistics)
    assert all(torch.equal(handed[k], weights[k]) for k in weights if "running" not in k and "num_batches" not in k)

    again = StandIn(tmp_path / "again", restored=train.checkpoint(4))
    again.folder.mkdir()
    again.install(monkeypatch)
    train_loop({"spec": spec})
    repeated = torch.load(again.checkpoint(4) / TARGET_BN_MODEL, weights_only=True)
    assert all(torch.equal(repeated[k], expected[k]) for k in expected)
