"""Segmentation metrics: a mergeable 19-class confusion matrix, per-class IoU and mIoU over class sets.

Workers each accumulate a matrix over their share of the images; summing the matrices gives exactly
the matrix of a single pass, so the IoUs do not depend on how evaluation was split.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from sisray.labels import CLASS_NAMES, EVAL_SETS, NUM_CLASSES


# the mean IoUs of an evaluation block: over the benchmark's classes, and over the 19/16/13 sets
MIOU_KEYS = ("miou", "miou19", "miou16", "miou13")


class ConfusionMatrix:
    """Rows: ground truth, columns: prediction. Pixels whose ground truth is IGNORE (255) are not counted."""

    def __init__(self, num_classes: int = NUM_CLASSES, counts: np.ndarray | None = None):
        self.num_classes = num_classes
        self.counts = np.zeros((num_classes, num_classes), np.int64) if counts is None else counts.astype(np.int64)
        if self.counts.shape != (num_classes, num_classes):
            raise ValueError(f"confusion matrix must be {num_classes}x{num_classes}, got {self.counts.shape}")

    def update(self, prediction, target) -> None:
        """Add a batch: integer class maps of the same shape (torch tensors on any device, or numpy).

        Counting happens on the tensors' device; only the n x n result is copied to the host.
        """
        prediction, target = torch.as_tensor(prediction), torch.as_tensor(target)
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
        n = self.num_classes
        target = target.reshape(-1).long()
        prediction = prediction.reshape(-1).long().to(target.device)
        valid = (target >= 0) & (target < n)  # IGNORE (255) and any other non-class value
        prediction, target = prediction[valid], target[valid]
        if len(prediction) and (int(prediction.min()) < 0 or int(prediction.max()) >= n):
            raise ValueError(f"predictions must be class indices in [0, {n})")
        pairs = torch.bincount(target * n + prediction, minlength=n * n)
        self.counts += pairs.cpu().numpy().reshape(n, n)

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return ConfusionMatrix(self.num_classes, self.counts + other.counts)

    @classmethod
    def merge(cls, matrices: Iterable[ConfusionMatrix]) -> ConfusionMatrix:
        total = cls()
        for m in matrices:
            total = total + m
        return total

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN for a class with neither ground truth nor prediction."""
        tp = np.diag(self.counts).astype(np.float64)
        union = self.counts.sum(axis=0) + self.counts.sum(axis=1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def miou(self, classes: Iterable[int] = EVAL_SETS[19]) -> float:
        """Mean IoU over `classes`, leaving out NaN classes; NaN if all are NaN."""
        values = self.iou()[list(classes)]
        values = values[~np.isnan(values)]
        return float(values.mean()) if len(values) else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.counts.sum()
        return float(np.trace(self.counts) / total) if total else float("nan")

    def summary(self, eval_classes: Iterable[int] = EVAL_SETS[19]) -> dict:
        """The evaluation block: mIoU over the dataset's classes and the 19/16/13 sets, IoU by class name."""
        iou = self.iou()
        return {
            "miou": self.miou(eval_classes),
            "miou19": self.miou(EVAL_SETS[19]),
            "miou16": self.miou(EVAL_SETS[16]),
            "miou13": self.miou(EVAL_SETS[13]),
            "pixel_accuracy": self.pixel_accuracy(),
            "per_class": {CLASS_NAMES[c]: float(iou[c]) for c in range(self.num_classes)},
        }


def format_iou_table(columns: dict[str, dict], classes: Iterable[int] = EVAL_SETS[19]) -> str:
    """A per-class IoU table (percent) with one column per evaluation block, mIoU rows at the end."""
    names = list(columns)
    width = max(8, *(len(n) + 2 for n in names))
    lines = [f"{'class':<16}" + "".join(f"{n:>{width}}" for n in names)]

    def cell(value: float) -> str:
        missing = value is None or value != value  # no IoU: NaN, or null once read back from JSON
        return f"{'-':>{width}}" if missing else f"{100 * value:>{width}.1f}"

    for c in classes:
        lines.append(f"{CLASS_NAMES[c]:<16}" + "".join(cell(columns[n]["per_class"][CLASS_NAMES[c]]) for n in names))
    for key in MIOU_KEYS:
        lines.append(f"{key:<16}" + "".join(cell(columns[n][key]) for n in names))
    return "\n".join(lines)


def format_headline(final: dict, source_only: dict, keys: Iterable[str]) -> str:
    """'mIoU16 45.1, +9.8 over source-only (35.3); mIoU13 ...': the figures a paper reports (percent)."""
    return "; ".join(f"{k.replace('miou', 'mIoU')} {100 * final[k]:.1f}, {100 * (final[k] - source_only[k]):+.1f} "
                     f"over source-only ({100 * source_only[k]:.1f})" for k in keys)
