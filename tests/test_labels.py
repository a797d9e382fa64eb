from __future__ import annotations

import numpy as np
import pytest

from layouts import CITYSCAPES_TO_TRAIN, SYNTHIA_TO_TRAIN
from sisray.labels import (CITYSCAPES_ID_TO_TRAINID, CLASS_NAMES, EVAL_SETS, PALETTE, SYNTHIA_ID_TO_TRAINID,
                           TRAINID_TO_CITYSCAPES_ID, colorize, train_id)


def test_nineteen_classes_in_trainid_order():
    assert CLASS_NAMES == ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                           "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
                           "bus", "train", "motorcycle", "bicycle")
    assert PALETTE.shape == (19, 3) and tuple(PALETTE[0]) == (128, 64, 128) and tuple(PALETTE[10]) == (70, 130, 180)


def test_cityscapes_id_map_matches_datasets_md_for_every_byte():
    expected = np.full(256, 255)
    for k, v in CITYSCAPES_TO_TRAIN.items():
        expected[k] = v
    assert np.array_equal(CITYSCAPES_ID_TO_TRAINID, expected)
    assert np.array_equal(CITYSCAPES_ID_TO_TRAINID[TRAINID_TO_CITYSCAPES_ID], np.arange(19))


def test_synthia_id_map_matches_datasets_md():
    expected = np.full(65536, 255)
    for k, v in SYNTHIA_TO_TRAIN.items():
        expected[k] = v
    assert np.array_equal(SYNTHIA_ID_TO_TRAINID, expected)
    for void in (0, 13, 14, 22):  # void, parking slot, road work, lane marking
        assert SYNTHIA_ID_TO_TRAINID[void] == 255


def test_eval_sets():
    names = lambda ids: {CLASS_NAMES[i] for i in ids}  # noqa: E731
    assert len(EVAL_SETS[19]) == 19
    assert set(CLASS_NAMES) - names(EVAL_SETS[16]) == {"terrain", "truck", "train"}
    assert set(CLASS_NAMES) - names(EVAL_SETS[13]) == {"terrain", "truck", "train", "wall", "fence", "pole"}


def test_train_id_and_colorize():
    assert train_id("traffic sign") == 7
    with pytest.raises(KeyError, match="unknown class 'lamp'"):
        train_id("lamp")
    rgb = colorize(np.array([[0, 255]], np.uint8))
    assert tuple(rgb[0, 0]) == (128, 64, 128) and tuple(rgb[0, 1]) == (0, 0, 0)
