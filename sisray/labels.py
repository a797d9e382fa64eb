"""Class tables: the 19 Cityscapes train classes, label-ID maps, evaluation subsets and palette.

Names, IDs and colours come from the official `cityscapesscripts` table rather than a typed copy,
so our trainIds and exported label-ID PNGs agree with the official evaluator.
"""

from __future__ import annotations

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CITYSCAPES_LABELS

IGNORE = 255
NUM_CLASSES = 19

_TRAIN_LABELS = sorted((lab for lab in _CITYSCAPES_LABELS if 0 <= lab.trainId < IGNORE), key=lambda lab: lab.trainId)
assert [lab.trainId for lab in _TRAIN_LABELS] == list(range(NUM_CLASSES)), "unexpected cityscapesscripts table"

CLASS_NAMES: tuple[str, ...] = tuple(lab.name for lab in _TRAIN_LABELS)
PALETTE = np.array([lab.color for lab in _TRAIN_LABELS], dtype=np.uint8)  # (19, 3) RGB

# Cityscapes label ID -> trainId (255 for every ID outside the 19 classes).
CITYSCAPES_ID_TO_TRAINID = np.full(256, IGNORE, dtype=np.uint8)
for _lab in _TRAIN_LABELS:
    CITYSCAPES_ID_TO_TRAINID[_lab.id] = _lab.trainId
# trainId -> Cityscapes label ID, for exporting predictions to the official evaluator.
TRAINID_TO_CITYSCAPES_ID = np.array([lab.id for lab in _TRAIN_LABELS], dtype=np.uint8)

# SYNTHIA-RAND-CITYSCAPES class ID (red channel of its 16-bit labels) -> trainId.
_SYNTHIA_IDS = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9,
    1: 10, 10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}
SYNTHIA_ID_TO_TRAINID = np.full(65536, IGNORE, dtype=np.uint8)
for _sid, _tid in _SYNTHIA_IDS.items():
    SYNTHIA_ID_TO_TRAINID[_sid] = _tid


def train_id(name: str) -> int:
    """trainId of a class name, e.g. train_id("traffic sign") == 7."""
    try:
        return CLASS_NAMES.index(name)
    except ValueError:
        raise KeyError(f"unknown class {name!r}; the classes are {', '.join(CLASS_NAMES)}") from None


def _without(*names: str) -> tuple[int, ...]:
    dropped = {train_id(n) for n in names}
    return tuple(c for c in range(NUM_CLASSES) if c not in dropped)


# Evaluation class sets (trainIds): 19 for GTA5, 16 for SYNTHIA (no terrain, truck, train),
# 13 also without wall, fence and pole.
EVAL_SETS: dict[int, tuple[int, ...]] = {
    19: tuple(range(NUM_CLASSES)),
    16: _without("terrain", "truck", "train"),
    13: _without("terrain", "truck", "train", "wall", "fence", "pole"),
}


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) trainIds -> (H, W, 3) RGB palette image; ignore is black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:NUM_CLASSES] = PALETTE
    return lut[train_ids]
