from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from layouts import CITYSCAPES_TO_TRAIN, H, W, expected_train_ids, make_cityscapes
from sisray.config import load_config
from sisray.labels import TRAINID_TO_CITYSCAPES_ID
from sisray.models import build_model
from sisray.stages.evaluate import PREDICTION_SUFFIX, evaluate, json_ready, label_free

CAR = 13


def constant_checkpoint(path, class_id: int) -> None:
    """A DeepLab-v2 whose ASPP has zero weights and one positive bias: predicts `class_id` everywhere."""
    model = build_model("deeplabv2_r101", width=0.0625)
    for conv in model.layer5.conv2d_list:
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
        conv.bias.data[class_id] = 1.0
    torch.save(model.state_dict(), path)


@pytest.mark.ray
def test_evaluation_matches_a_hand_computed_confusion_matrix_and_exports(ray_session, tmp_path):
    truth = make_cityscapes(tmp_path / "cs", split="val", n=3)
    constant_checkpoint(tmp_path / "model.pt", CAR)
    cfg = load_config(None, ["data.target.name=cityscapes", f"data.target.root={tmp_path / 'cs'}",
                             "data.target.size=[32, 16]", "model.name=deeplabv2_r101", "model.width=0.0625",
                             "model.init=random", "resources.num_actors=2", "resources.actor_batch_size=2"])
    summary = evaluate(cfg, tmp_path / "model.pt", export=tmp_path / "export", figure=tmp_path / "overlay.png")

    expected = np.zeros((19, 19), np.int64)  # every ground-truth pixel (at label resolution) predicted as car
    for _, ids in truth.values():
        train_ids = expected_train_ids(ids, CITYSCAPES_TO_TRAIN)
        for g in range(19):
            expected[g, CAR] += int((train_ids == g).sum())
    iou = np.where(np.arange(19) == CAR, expected[CAR, CAR] / expected.sum(), 0.0)
    assert summary["per_class"]["car"] == pytest.approx(iou[CAR])
    assert summary["per_class"]["road"] == 0.0
    assert summary["miou19"] == pytest.approx(iou.mean())
    assert summary["images"] == 3
    branches = len(build_model("deeplabv2_r101", width=0.0625).layer5.conv2d_list)
    p = np.full(19, 1.0)  # the same softmax at every pixel: the ASPP branches' biases add up for car
    p[CAR] = np.exp(branches)
    p /= p.sum()
    entropy = -(p * np.log(p)).sum() / np.log(19)
    assert summary["label_free"]["mean_entropy"] == pytest.approx(entropy, rel=1e-5)
    assert summary["label_free"]["class_entropy"] == pytest.approx(entropy, rel=1e-5)
    assert summary["label_free"]["information"] == pytest.approx(0.0, abs=1e-5)  # one answer for every pixel

    for sample_id in truth:
        city = sample_id.split("_")[0]
        exported = np.asarray(Image.open(tmp_path / "export" / city / f"{sample_id}{PREDICTION_SUFFIX}"))
        assert exported.shape == (H, W)  # label resolution, not the working size
        assert (exported == TRAINID_TO_CITYSCAPES_ID[CAR]).all()  # label IDs (26), not trainIds
    assert Image.open(tmp_path / "overlay.png").size == (3 * 32, 3 * 16)


def test_json_ready_turns_nan_into_null():
    assert json_ready({"a": float("nan"), "b": {"c": 1.0}}) == {"a": None, "b": {"c": 1.0}}


def test_label_free_statistics_reward_confident_and_diverse_predictions():
    one_hot = np.eye(19)
    confident_diverse = label_free(0.0, one_hot[0] + one_hot[1], 2)  # two sure pixels, two classes
    assert confident_diverse == pytest.approx({"mean_entropy": 0.0, "class_entropy": np.log(2) / np.log(19),
                                              "information": np.log(2) / np.log(19)}, abs=1e-9)
    collapsed = label_free(0.0, 2 * one_hot[0], 2)  # as sure, but one class: no information
    assert collapsed["mean_entropy"] == 0.0 and collapsed["information"] == pytest.approx(0.0, abs=1e-9)
    uniform = label_free(2 * np.log(19), np.full(19, 2 / 19), 2)
    assert uniform == pytest.approx({"mean_entropy": 1.0, "class_entropy": 1.0, "information": 0.0}, abs=1e-9)
