"""Reading the benchmark through the real GTA5 and Cityscapes loaders, and its statistics."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from sisray.datasets.cityscapes import Cityscapes
from sisray.datasets.gta5 import GTA5
from sisray.datasets.synthetic.scene import CLASSES
from sisray.datasets.synthetic.write import MANIFEST, PARTIAL_MARKER
from sisray.errors import DatasetError
from sisray.labels import train_id

def require_complete(root: str | Path) -> Path:
    """ROOT if it holds a complete benchmark, else a DatasetError saying how to make one."""
    root = Path(root)
    if not (root / MANIFEST).is_file():
        state = "is half-written" if (root / PARTIAL_MARKER).exists() else "holds no synthetic benchmark"
        raise DatasetError(f"{root} {state} (no {MANIFEST}); generate it with: "
                           f"python jobs/make_synthetic.py --out {root}")
    return root


class SyntheticSource(GTA5):
    """The benchmark's source domain, read by the real GTA5 loader from ROOT/source."""
    name = "synthetic"
    eval_classes = CLASSES

    def __init__(self, root, *args, **kwargs):
        super().__init__(require_complete(root) / "source", *args, **kwargs)


class SyntheticTarget(Cityscapes):
    """The benchmark's target domain, read by the real Cityscapes loader from ROOT/target."""
    name = "synthetic"
    splits = ("train", "val")
    eval_classes = CLASSES

    def __init__(self, root, *args, **kwargs):
        super().__init__(require_complete(root) / "target", *args, **kwargs)


def _object_heights(label: np.ndarray, class_id: int, min_area: int = 6) -> list[int]:
    """Heights in pixels of the connected regions of one class (a proxy for apparent object size)."""
    count, _, stats, _ = cv2.connectedComponentsWithStats((label == class_id).astype(np.uint8), connectivity=8)
    return [int(h) for h, a in zip(stats[1:, cv2.CC_STAT_HEIGHT], stats[1:, cv2.CC_STAT_AREA]) if a >= min_area]


def describe(dataset, limit: int = 100) -> dict:
    """Class pixel shares, colour statistics and apparent object sizes of (up to `limit`) samples,
    read through the dataset's own loader at its working size."""
    n = min(limit, len(dataset))
    pixels = np.zeros(256, np.int64)
    heights = {"person": [], "car": []}
    rgb_sum, rgb_sq = np.zeros(3), np.zeros(3)
    for i in range(n):
        image, label = dataset[i]
        label = label.numpy()
        pixels += np.bincount(label.ravel(), minlength=256)
        x = image.numpy().reshape(3, -1).astype(np.float64)
        rgb_sum += x.mean(axis=1)
        rgb_sq += (x ** 2).mean(axis=1)
        for name in heights:
            heights[name] += _object_heights(label, train_id(name))
    share = pixels[:19] / max(pixels.sum(), 1)
    mean = rgb_sum / n
    return {
        "images": len(dataset),
        "described": n,
        "size": list(dataset.size),
        "class_share": {c: float(share[c]) for c in CLASSES},
        "ignored_share": float(pixels[255] / max(pixels.sum(), 1)),
        "rgb_mean": [round(float(v), 1) for v in mean],
        "rgb_std": [round(float(v), 1) for v in np.sqrt(np.maximum(rgb_sq / n - mean ** 2, 0))],
        "median_height_px": {k: float(np.median(v)) if v else float("nan") for k, v in heights.items()},
    }
