"""The teacher's softmax (`lse.fused_teacher`): what the scoring and patch passes' actors read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sisray.config import load_config
from sisray.lse.records import image_records
from sisray.models import build_model
from sisray.models.inference import predict_probs
from sisray.stages.patch_pass import Patcher, PatchSpec
from sisray.stages.score import PassSpec, Scorer


def _spec(root, checkpoint, fused: bool, kind=PassSpec, **extra):
    cfg = load_config(None, ["data.target.name=synthetic", f"data.target.root={root}", "data.target.size=[64, 32]",
                             "model.width=0.0625", "model.init=random", "lse.threshold.bins=16",
                             f"lse.fused_teacher={str(fused).lower()}"])
    return kind(cfg, str(checkpoint), threads=1, use_gpu=False, **extra)


@pytest.mark.parametrize("fused", [False, True])
def test_scoring_reads_the_teachers_softmax(small_benchmark, fcn_checkpoint, fused):
    """Fused: the mean over the image at 1/2, 1 and 2 (lse.scale) and their mirrors; else the plain softmax."""
    scorer = Scorer(_spec(small_benchmark, fcn_checkpoint, fused))
    out = scorer({"id": np.array([0, 1])})
    model = build_model("fcn8s_vgg16", width=0.0625, init=str(fcn_checkpoint)).eval()
    images = torch.stack([scorer.dataset.load_image(i) for i in (0, 1)])
    views = ((0.5, 1.0, 2.0), True) if fused else ((1.0,), False)
    expected = image_records(torch.cat([predict_probs(model, image[None], *views) for image in images]), 16)
    plain = image_records(torch.cat([predict_probs(model, image[None]) for image in images]), 16)
    for key in ("counts", "scores", "mean_entropy", "histograms"):
        assert np.allclose(out[key], getattr(expected, key).numpy(), atol=1e-6), key
    assert fused != np.allclose(out["scores"], plain.scores.numpy(), atol=1e-6)  # the views change the scores


def test_the_patch_pass_labels_from_the_teachers_softmax(small_benchmark, fcn_checkpoint, monkeypatch):
    seen = []

    def views(self):
        seen.append(self.cfg.lse.fused_teacher)
        return Scorer.teacher_views(self)
    monkeypatch.setattr(Patcher, "teacher_views", views)
    patcher = Patcher(_spec(small_benchmark, fcn_checkpoint, True, PatchSpec, tau=(1.0,) * 19, scales=(2.0,)))
    patcher({"id": np.array([0, 1])})
    assert seen == [True]  # once per batch
