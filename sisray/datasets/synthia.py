"""SYNTHIA-RAND-CITYSCAPES (source): ROOT/RGB/NNNNNNN.png with ROOT/GT/LABELS/NNNNNNN.png.

Labels are 16-bit 3-channel PNGs, class ID in the red channel and instance ID in the green one.
PIL cannot read them; OpenCV returns them in BGR order, so the class is channel 2.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from sisray.datasets.base import SegmentationDataset, require_dir
from sisray.labels import EVAL_SETS, SYNTHIA_ID_TO_TRAINID


class SYNTHIA(SegmentationDataset):
    name = "synthia"
    splits = ("train",)
    label_format = "rgb16"
    id_to_trainid = SYNTHIA_ID_TO_TRAINID
    eval_classes = EVAL_SETS[16]  # SYNTHIA has no terrain, truck or train

    def find_images(self) -> dict[str, Path]:
        folder = require_dir(self.root / "RGB", f"{self.name} image folder")
        return {p.stem: p for p in folder.glob("*.png")}

    def find_labels(self) -> dict[str, Path]:
        folder = require_dir(self.root / "GT" / "LABELS", f"{self.name} label folder")
        return {p.stem: p for p in folder.glob("*.png")}

    def read_label_ids(self, path: str) -> np.ndarray:
        raw = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise ValueError("OpenCV cannot read it")
        if raw.ndim != 3 or raw.shape[2] < 3 or raw.dtype != np.uint16:
            raise ValueError(f"expected a 16-bit 3-channel label, got {raw.dtype} with shape {raw.shape}")
        return raw[:, :, 2]

    def layout_hint(self) -> str:
        return "RGB/0000000.png ... with GT/LABELS/0000000.png ..."
