"""Cityscapes (target): leftImg8bit/SPLIT/CITY/*_leftImg8bit.png with gtFine/SPLIT/CITY/*_gtFine_labelIds.png."""

from __future__ import annotations

from pathlib import Path

from sisray.datasets.base import SegmentationDataset, require_dir
from sisray.labels import CITYSCAPES_ID_TO_TRAINID, EVAL_SETS

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


class Cityscapes(SegmentationDataset):
    name = "cityscapes"
    splits = ("train", "val", "test")
    label_format = "index8"
    id_to_trainid = CITYSCAPES_ID_TO_TRAINID
    eval_classes = EVAL_SETS[19]

    def find_images(self) -> dict[str, Path]:
        folder = require_dir(self.root / "leftImg8bit" / self.split, f"{self.name} {self.split} image folder")
        return {p.name[: -len(IMAGE_SUFFIX)]: p for p in folder.glob(f"*/*{IMAGE_SUFFIX}")}

    def find_labels(self) -> dict[str, Path]:
        folder = require_dir(self.root / "gtFine" / self.split, f"{self.name} {self.split} label folder")
        return {p.name[: -len(LABEL_SUFFIX)]: p for p in folder.glob(f"*/*{LABEL_SUFFIX}")}

    def layout_hint(self) -> str:
        return f"leftImg8bit/{self.split}/<city>/<city>_<seq>_<frame>{IMAGE_SUFFIX} with gtFine/{self.split}/<city>/..{LABEL_SUFFIX}"
