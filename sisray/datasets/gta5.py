"""GTA5 (source): ROOT/images/NNNNN.png with ROOT/labels/NNNNN.png, palette PNGs of Cityscapes label IDs.

Two quirks of real copies: the release has a few dozen pairs whose label and image differ in size,
used here resized (as the LSE reference does: docs/DATASETS.md); and roots converted by other
codebases hold NNNNN_labelTrainIds.png beside each label, which are not labels of this layout."""

from __future__ import annotations

from pathlib import Path

from sisray.datasets.base import SegmentationDataset, require_dir
from sisray.labels import CITYSCAPES_ID_TO_TRAINID, EVAL_SETS


class GTA5(SegmentationDataset):
    name = "gta5"
    splits = ("train",)  # the whole release is source training data
    label_format = "index8"  # palette PNG: the index is the label ID, the colour is ignored
    id_to_trainid = CITYSCAPES_ID_TO_TRAINID
    eval_classes = EVAL_SETS[19]
    resize_mismatched = True
    converted_suffix = "_labelTrainIds"  # a trainId copy written by another codebase's conversion script

    def find_images(self) -> dict[str, Path]:
        folder = require_dir(self.root / "images", f"{self.name} image folder")
        return {p.stem: p for p in folder.glob("*.png")}

    def find_labels(self) -> dict[str, Path]:
        folder = require_dir(self.root / "labels", f"{self.name} label folder")
        return {p.stem: p for p in folder.glob("*.png") if not p.stem.endswith(self.converted_suffix)}

    def layout_hint(self) -> str:
        return "images/00001.png ... with labels/00001.png ..."
