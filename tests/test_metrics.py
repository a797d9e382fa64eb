from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sisray.config import load_config
from sisray.labels import CLASS_NAMES, EVAL_SETS
from sisray.metrics import ConfusionMatrix, format_iou_table


def test_hand_computed_confusion_matrix_and_iou():
    target = np.array([[0, 0, 1, 1],
                       [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1],
                     [2, 0, 5, 1]])
    cm = ConfusionMatrix()
    cm.update(pred, target)
    expected = np.zeros((19, 19), np.int64)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 1] = 3
    expected[2, 2] = 1
    expected[2, 0] = 1
    assert np.array_equal(cm.counts, expected)  # the ignored pixel (predicted 5) is not counted
    iou = cm.iou()
    assert iou[0] == pytest.approx(1 / 3)  # tp 1, fn 1, fp 1
    assert iou[1] == pytest.approx(3 / 4)  # tp 3, fp 1
    assert iou[2] == pytest.approx(1 / 2)  # tp 1, fn 1
    assert all(math.isnan(iou[c]) for c in range(3, 19))
    assert cm.miou() == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert cm.pixel_accuracy() == pytest.approx(5 / 7)


def test_predicted_but_absent_class_counts_as_zero_not_nan():
    cm = ConfusionMatrix()
    cm.update(np.array([3, 0]), np.array([0, 0]))
    assert cm.iou()[3] == 0.0
    assert cm.miou() == pytest.approx((0.5 + 0.0) / 2)


def test_class_sets_16_and_13():
    cm = ConfusionMatrix()
    target = np.arange(19)
    pred = target.copy()
    pred[9] = 14  # terrain taken for truck: both in 19, neither in 16 or 13
    pred[3] = 4  # wall taken for fence: both in 19 and 16, neither in 13
    cm.update(pred, target)
    iou = cm.iou()
    assert cm.miou(EVAL_SETS[19]) == pytest.approx(np.mean(iou))
    assert cm.miou(EVAL_SETS[16]) == pytest.approx(np.mean(iou[list(EVAL_SETS[16])]))
    assert cm.miou(EVAL_SETS[13]) == pytest.approx(1.0)
    assert cm.miou(EVAL_SETS[16]) < 1.0


def test_merge_equals_single_pass():
    rng = np.random.default_rng(0)
    targets = [rng.integers(0, 19, (8, 16)) for _ in range(6)]
    preds = [rng.integers(0, 19, (8, 16)) for _ in range(6)]
    for t in targets:
        t[rng.random(t.shape) < 0.1] = 255
    single = ConfusionMatrix()
    for p, t in zip(preds, targets):
        single.update(p, t)
    parts = [ConfusionMatrix(), ConfusionMatrix(), ConfusionMatrix()]
    for i, (p, t) in enumerate(zip(preds, targets)):
        parts[i % 3].update(torch.from_numpy(p), torch.from_numpy(t))  # torch and numpy inputs agree
    merged = ConfusionMatrix.merge(parts)
    assert np.array_equal(merged.counts, single.counts)
    assert np.allclose(merged.iou(), single.iou(), equal_nan=True)


def test_all_nan_mean_is_nan_and_summary_names_classes():
    cm = ConfusionMatrix()
    assert math.isnan(cm.miou())
    summary = cm.summary(eval_classes=(0, 1))
    assert set(summary) >= {"miou", "miou19", "miou16", "miou13", "per_class"}
    assert list(summary["per_class"]) == list(CLASS_NAMES)
    table = format_iou_table({"source-only": summary})
    assert "road" in table and "miou19" in table


def test_bad_inputs():
    cm = ConfusionMatrix()
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"class indices in \[0, 19\)"):
        cm.update(np.array([19]), np.array([0]))


def test_the_headline_names_each_figure_with_its_gain_over_source_only():
    from sisray.datasets import headline_metrics
    from sisray.metrics import format_headline

    final, source = {"miou16": 0.451, "miou13": 0.502, "miou": 0.4}, {"miou16": 0.353, "miou13": 0.41, "miou": 0.3}
    synthia = load_config(None, ["data.source.name=synthia"])
    assert format_headline(final, source, headline_metrics(synthia)) == (
        "mIoU16 45.1, +9.8 over source-only (35.3); mIoU13 50.2, +9.2 over source-only (41.0)")
    assert format_headline(final, source, headline_metrics(load_config(None, []))) == (
        "mIoU 40.0, +10.0 over source-only (30.0)")
