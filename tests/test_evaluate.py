from __future__ import annotations

from pathlib import Path

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
def test_evaluation_matches_a_hand_computed_confusion_matrix_and_exports(ray_session, tmp_path, monkeypatch):
    truth = make_cityscapes(tmp_path / "cs", split="val", n=3)
    constant_checkpoint(tmp_path / "model.pt", CAR)
    cfg = load_config(None, ["data.target.name=cityscapes", f"data.target.root={tmp_path / 'cs'}",
                             "data.target.size=[32, 16]", "model.name=deeplabv2_r101", "model.width=0.0625",
                             "model.init=random", "resources.num_actors=2", "resources.actor_batch_size=2"])
    monkeypatch.chdir(tmp_path)  # a relative export folder is the caller's, not the actors' working directory
    summary = evaluate(cfg, tmp_path / "model.pt", export="export", figure=tmp_path / "overlay.png")

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
    assert list(summary["class_share"].values()) == pytest.approx(list(p), rel=1e-5)  # the mean prediction

    for sample_id in truth:
        city = sample_id.split("_")[0]
        exported = np.asarray(Image.open(tmp_path / "export" / city / f"{sample_id}{PREDICTION_SUFFIX}"))
        assert exported.shape == (H, W)  # label resolution, not the working size
        assert (exported == TRAINID_TO_CITYSCAPES_ID[CAR]).all()  # label IDs (26), not trainIds
    assert Image.open(tmp_path / "overlay.png").size == (3 * 32, 3 * 16)


def varied_checkpoint(path) -> None:
    """A DeepLab-v2 whose ASPP has large random weights: a prediction that varies from pixel to pixel."""
    torch.manual_seed(0)
    model = build_model("deeplabv2_r101", width=0.0625)
    for conv in model.layer5.conv2d_list:
        torch.nn.init.normal_(conv.weight, std=0.3)
    torch.save(model.state_dict(), path)


def independent_predictions(cfg, checkpoint, shapes, scales=(1.0,), flip=False) -> dict[str, np.ndarray]:
    """The val predictions at label resolution, computed here on the driver without sisray's
    evaluation code: the model on each working-size image (mean over scales and mirror), the softmax
    resized bilinearly to the label's size, argmax."""
    from sisray.datasets import open_target

    model = build_model("deeplabv2_r101", width=0.0625, init=str(checkpoint)).eval()
    dataset = open_target(cfg.data.target, "val", with_labels=False)
    out = {}
    with torch.no_grad():
        for index, sample in enumerate(dataset.samples):
            image = dataset.load_image(index)[None].float()
            total = 0
            for scale in scales:
                view = image if scale == 1 else torch.nn.functional.interpolate(
                    image, scale_factor=scale, mode="bilinear", align_corners=False)
                for mirrored in ((False, True) if flip else (False,)):
                    probs = model(view.flip(-1) if mirrored else view).softmax(1)
                    probs = probs.flip(-1) if mirrored else probs
                    total = total + torch.nn.functional.interpolate(probs, size=image.shape[-2:], mode="bilinear",
                                                                    align_corners=False)
            mean = total / (len(scales) * (2 if flip else 1))  # the mean, not the sum: argmax ties round alike
            full = torch.nn.functional.interpolate(mean, size=shapes[sample.id], mode="bilinear", align_corners=False)
            out[sample.id] = full.argmax(1)[0].numpy()
    return out


def iou_per_class(predictions, truths) -> np.ndarray:
    """IoU of the 19 classes from (prediction, trainId truth) pairs: numpy only."""
    matrix = np.zeros((19, 19), np.int64)
    for prediction, truth in zip(predictions, truths):
        valid = truth != 255
        matrix += np.bincount(19 * truth[valid] + prediction[valid], minlength=19 * 19).reshape(19, 19)
    inter = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - inter
    return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


@pytest.mark.ray
@pytest.mark.parametrize("scales, flip", [((1.0,), False), ((0.75, 1.0, 1.5), True)])
def test_a_varied_prediction_is_scored_as_computed_independently_and_by_the_official_evaluator(
        ray_session, tmp_path, scales, flip):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    truth = make_cityscapes(tmp_path / "cs", split="val", n=3)
    varied_checkpoint(tmp_path / "model.pt")
    cfg = load_config(None, ["data.target.name=cityscapes", f"data.target.root={tmp_path / 'cs'}",
                             "data.target.size=[32, 16]", "model.name=deeplabv2_r101", "model.width=0.0625",
                             "model.init=random", "resources.num_actors=2", "resources.actor_batch_size=2"])
    summary = evaluate(cfg, tmp_path / "model.pt", export=tmp_path / "export", scales=scales, flip=flip)

    truths = {sample_id: expected_train_ids(ids, CITYSCAPES_TO_TRAIN) for sample_id, (_, ids) in truth.items()}
    predictions = independent_predictions(cfg, tmp_path / "model.pt", {k: t.shape for k, t in truths.items()},
                                          scales, flip)
    assert len(np.unique(np.concatenate([p.ravel() for p in predictions.values()]))) >= 4  # not a constant map
    expected = iou_per_class([predictions[k] for k in truths], list(truths.values()))
    ours = np.array([np.nan if v is None else v for v in json_ready(summary)["per_class"].values()], float)
    assert np.allclose(ours, expected, equal_nan=True)
    assert summary["miou19"] == pytest.approx(np.nanmean(expected))

    # the official evaluator on the exported label-ID PNGs against the gtFine files
    official.args.evalInstLevelScore, official.args.JSONOutput, official.args.quiet = False, False, True
    ground = sorted(str(p) for p in (tmp_path / "cs" / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    exported = [str(tmp_path / "export" / Path(g).parent.name / Path(g).name.replace("_gtFine_labelIds.png",
                                                                                     PREDICTION_SUFFIX))
                for g in ground]
    result = official.evaluateImgLists(exported, ground, official.args)
    theirs = np.array([result["classScores"][name] for name in summary["per_class"]], float)
    assert np.allclose(ours, theirs, equal_nan=True)


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


def test_the_label_free_sums_do_not_depend_on_the_order_batches_arrive_in():
    """Ray Data returns an actor pool's batches in any order: the sums are taken in image order, so
    that the same run gives the same figures to the last bit (the sweep's default objective is one)."""
    from sisray.labels import EVAL_SETS, NUM_CLASSES
    from sisray.stages.evaluate import EvaluationSums, Evaluator

    generator = np.random.default_rng(0)
    batches = []
    for first in (0, 3, 6):
        batch = Evaluator.blank(3)
        batch["id"][:] = range(first, first + 3)
        batch["entropy"][:] = generator.random(3) * 1e3
        batch["probs"][:] = generator.random((3, NUM_CLASSES)) * 1e3
        batch["pixels"][:] = 1000
        batches.append(batch)
    class Dataset(list):
        eval_classes = EVAL_SETS[19]

    figures = []
    for order in ((0, 1, 2), (2, 0, 1), (1, 2, 0)):
        sums = EvaluationSums()
        for k in order:
            sums.add(batches[k])
        figures.append(sums.summary(Dataset(range(9)), "model.pt", None))
    for later in figures[1:]:
        assert later["label_free"] == figures[0]["label_free"] and later["class_share"] == figures[0]["class_share"]
