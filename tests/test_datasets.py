from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from layouts import (CITYSCAPES_TO_TRAIN, SYNTHIA_TO_TRAIN, H, W, expected_train_ids, make_cityscapes,
                     make_gta5, make_synthia, save_gray_label, save_rgb)
from sisray.config import DomainConfig, TargetConfig
from sisray.datasets import open_source, open_target
from sisray.datasets.cityscapes import Cityscapes
from sisray.datasets.gta5 import GTA5
from sisray.datasets.synthia import SYNTHIA
from sisray.errors import DatasetError
from sisray.labels import EVAL_SETS

MAKERS = {
    "gta5": (GTA5, make_gta5, CITYSCAPES_TO_TRAIN),
    "synthia": (SYNTHIA, make_synthia, SYNTHIA_TO_TRAIN),
    "cityscapes": (Cityscapes, make_cityscapes, CITYSCAPES_TO_TRAIN),
}


@pytest.mark.parametrize("name", MAKERS)
def test_loader_maps_every_label_id_pixel_by_pixel(tmp_path, name):
    cls, make, table = MAKERS[name]
    truth = make(tmp_path)
    ds = cls(tmp_path, "train", size=(W, H))
    assert [s.id for s in ds.samples] == sorted(truth)
    for i, sample in enumerate(ds.samples):
        rgb, ids = truth[sample.id]
        image, label = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, H, W)
        assert np.array_equal(image.permute(1, 2, 0).numpy(), rgb), "image channels or pixels changed"
        assert label.dtype == torch.int64
        assert np.array_equal(label.numpy(), expected_train_ids(ids, table))


@pytest.mark.parametrize("name", MAKERS)
def test_working_size_resizes_images_bicubic_and_labels_nearest(tmp_path, name):
    cls, make, table = MAKERS[name]
    truth = make(tmp_path, n=1)
    ds = cls(tmp_path, "train", size=(20, 12))
    image, label = ds[0]
    assert image.shape == (3, 12, 20) and label.shape == (12, 20)
    rgb, ids = next(iter(truth.values()))
    expected = np.asarray(Image.fromarray(expected_train_ids(ids, table).astype(np.uint8)).resize((20, 12), Image.NEAREST))
    assert np.array_equal(label.numpy(), expected)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), np.asarray(Image.fromarray(rgb).resize((20, 12), Image.BICUBIC)))
    assert ds.load_label(0, native=True).shape == (H, W)


def test_eval_classes_per_dataset():
    assert GTA5.eval_classes == EVAL_SETS[19]
    assert SYNTHIA.eval_classes == EVAL_SETS[16]
    assert 9 not in SYNTHIA.eval_classes  # terrain


def test_cityscapes_without_labels_needs_no_label_folder(tmp_path):
    make_cityscapes(tmp_path)
    import shutil
    shutil.rmtree(tmp_path / "gtFine")
    ds = Cityscapes(tmp_path, "train", size=(W, H), with_labels=False)
    image, label = ds[0]
    assert image.shape == (3, H, W)
    assert bool((label == 255).all())
    with pytest.raises(DatasetError, match="gtFine"):
        Cityscapes(tmp_path, "train", size=(W, H))


def test_registry_opens_by_name_and_uses_val_size(tmp_path):
    make_gta5(tmp_path / "gta")
    make_cityscapes(tmp_path / "cs", split="val")
    src = open_source(DomainConfig(name="gta5", root=str(tmp_path / "gta"), size=(W, H)))
    assert isinstance(src, GTA5)
    tgt = open_target(TargetConfig(name="cityscapes", root=str(tmp_path / "cs"), size=(W, H), val_size=(20, 12)),
                      "val", with_labels=True)
    assert tgt.size == (20, 12)
    with pytest.raises(DatasetError, match="unknown source dataset 'cityscapes'"):
        open_source(DomainConfig(name="cityscapes", root=str(tmp_path / "cs")))


# ------------------------------------------------------------------ bad input

def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match=f"gta5 root not found: {tmp_path / 'nope'}"):
        GTA5(tmp_path / "nope", size=(W, H))


def test_missing_split_folder(tmp_path):
    make_cityscapes(tmp_path, split="train")
    with pytest.raises(DatasetError, match=r"cityscapes val image folder not found: .*leftImg8bit/val"):
        Cityscapes(tmp_path, "val", size=(W, H))


def test_unknown_split(tmp_path):
    make_cityscapes(tmp_path)
    with pytest.raises(DatasetError, match="unknown split 'tarin'"):
        Cityscapes(tmp_path, "tarin", size=(W, H))


def test_no_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(DatasetError, match="no images found under"):
        GTA5(tmp_path, size=(W, H))


def test_image_without_label_and_label_without_image(tmp_path):
    make_gta5(tmp_path, n=4)
    (tmp_path / "labels" / "00002.png").unlink()
    (tmp_path / "images" / "00004.png").unlink()
    with pytest.raises(DatasetError) as err:
        GTA5(tmp_path, size=(W, H))
    message = str(err.value)
    assert "2 bad image/label pair(s)" in message
    assert f"{tmp_path / 'images' / '00002.png'}: image has no label" in message
    assert f"{tmp_path / 'labels' / '00004.png'}: label has no image" in message
    assert "skip_bad_pairs" in message


def test_skip_bad_pairs_reports_and_skips(tmp_path, caplog):
    make_gta5(tmp_path, n=4)
    (tmp_path / "labels" / "00002.png").unlink()
    ds = GTA5(tmp_path, size=(W, H), skip_bad_pairs=True)
    assert [s.id for s in ds.samples] == ["00001", "00003", "00004"]
    assert [i for i, _ in ds.skipped] == ["00002"]
    assert "00002.png: image has no label" in caplog.text


def test_a_label_whose_size_differs_from_its_image_is_a_bad_pair(tmp_path):
    make_cityscapes(tmp_path, n=2)
    image = sorted((tmp_path / "leftImg8bit").rglob("*_leftImg8bit.png"))[1]
    save_rgb(image, np.zeros((H + 2, W, 3), np.uint8))
    with pytest.raises(DatasetError, match=rf"labelIds.png: label is {W}x{H} but its image .*{image.name} is {W}x{H + 2}"):
        Cityscapes(tmp_path, "train", size=(W, H))


def test_gta5_pairs_that_differ_in_size_are_resized_and_counted_in_one_line(tmp_path, caplog):
    """As the LSE reference does with the release's few dozen such pairs: image and label each at the
    working size."""
    truth = make_gta5(tmp_path, n=3)
    rgb = np.asarray(Image.fromarray(truth["00002"][0]).resize((2 * W, 2 * H), Image.NEAREST))
    save_rgb(tmp_path / "images" / "00002.png", rgb)
    save_rgb(tmp_path / "images" / "00003.png", np.zeros((H + 2, W, 3), np.uint8))
    ds = GTA5(tmp_path, size=(W, H))
    assert [s.id for s in ds.samples] == ["00001", "00002", "00003"] and not ds.skipped
    warnings = [r.getMessage() for r in caplog.records if "differ in size" in r.getMessage()]
    assert len(warnings) == 1 and "2 image/label pair(s) differ in size" in warnings[0]
    assert f"label is {W}x{H} but its image" in warnings[0]
    image, label = ds[1]
    assert image.shape == (3, H, W) and label.shape == (H, W)
    assert np.array_equal(label.numpy(), expected_train_ids(truth["00002"][1], CITYSCAPES_TO_TRAIN))


def test_gta5_ignores_the_trainid_copies_other_codebases_write_beside_its_labels(tmp_path, caplog):
    truth = make_gta5(tmp_path, n=3)
    for name, (_, ids) in truth.items():
        save_gray_label(tmp_path / "labels" / f"{name}_labelTrainIds.png",
                        expected_train_ids(ids, CITYSCAPES_TO_TRAIN).astype(np.uint8))
    ds = GTA5(tmp_path, size=(W, H))
    assert [s.id for s in ds.samples] == ["00001", "00002", "00003"] and not ds.skipped
    assert all(s.label.endswith(f"{s.id}.png") for s in ds.samples) and not caplog.records


def test_truncated_file(tmp_path):
    make_cityscapes(tmp_path, n=2)
    path = next((tmp_path / "leftImg8bit").rglob("*_leftImg8bit.png"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=rf"{path}: unreadable image: truncated PNG"):
        Cityscapes(tmp_path, "train", size=(W, H))


def test_unreadable_file(tmp_path):
    make_gta5(tmp_path, n=2)
    path = tmp_path / "labels" / "00001.png"
    path.write_bytes(b"this is not an image")
    with pytest.raises(DatasetError, match=rf"{path}: unreadable label: not a readable image"):
        GTA5(tmp_path, size=(W, H))


def test_corrupt_data_inside_a_complete_file_fails_at_load_naming_the_path(tmp_path):
    make_gta5(tmp_path, n=1)
    path = tmp_path / "images" / "00001.png"
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start: start + 40] = bytes(40)  # header and trailer intact, pixel data broken
    path.write_bytes(bytes(data))
    ds = GTA5(tmp_path, size=(W, H))
    with pytest.raises(DatasetError, match=rf"{path}: cannot decode image"):
        ds[0]


@pytest.mark.parametrize("name", ["gta5", "cityscapes"])
def test_rgb_label_where_index_label_expected(tmp_path, name):
    cls, make, _ = MAKERS[name]
    make(tmp_path, n=2)
    path = sorted(p for p in tmp_path.rglob("*.png") if "label" in str(p.relative_to(tmp_path)).lower())[0]
    save_rgb(path, np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DatasetError, match=rf"{path}: label is 8-bit RGB; expected an 8-bit single-channel"):
        cls(tmp_path, "train", size=(W, H))


def test_synthia_label_must_be_16_bit(tmp_path):
    make_synthia(tmp_path, n=2)
    path = tmp_path / "GT" / "LABELS" / "0000001.png"
    save_gray_label(path, np.zeros((H, W), np.uint8))
    with pytest.raises(DatasetError, match=rf"{path}: label is 8-bit grayscale; expected a 16-bit RGB PNG"):
        SYNTHIA(tmp_path, size=(W, H))
