"""Tiny dataset trees in the exact real layouts and file formats, written by the tests themselves;
and a hostile file."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# Hand-typed from docs/DATASETS.md, independent of cityscapesscripts: the tests check the package against it.
CITYSCAPES_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                       24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SYNTHIA_TO_TRAIN = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11,
                    17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}
W, H = 40, 24


def expected_train_ids(ids: np.ndarray, table: dict[int, int]) -> np.ndarray:
    out = np.full(ids.shape, 255, np.int64)
    for k, v in table.items():
        out[ids == k] = v
    return out


def rgb_image(rng, w=W, h=H) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def save_palette_label(path: Path, ids: np.ndarray) -> None:
    """GTA5 style: an 8-bit palette PNG whose indices are Cityscapes label IDs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(ids.astype(np.uint8), mode="P")
    im.putpalette([(i * 37) % 256 for i in range(768)])
    im.save(path)


def save_gray_label(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint8), mode="L").save(path)


def save_synthia_label(path: Path, class_ids: np.ndarray, rng) -> None:
    """SYNTHIA style: 16-bit 3-channel PNG, class in R, instance in G (OpenCV writes BGR)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = np.zeros(class_ids.shape + (3,), np.uint16)
    bgr[..., 2] = class_ids
    bgr[..., 1] = rng.integers(0, 5000, class_ids.shape)
    assert cv2.imwrite(str(path), bgr)


def all_ids(rng, values, h=H, w=W) -> np.ndarray:
    """A label map in which every value of `values` occurs, the rest random among them."""
    values = np.asarray(values)
    ids = rng.choice(values, size=h * w)
    ids[: len(values)] = values
    return rng.permutation(ids).reshape(h, w)


def make_gta5(root: Path, n: int = 3, seed: int = 0, label_ids=range(0, 34)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """GTA5 layout; its labels hold every ID of `label_ids` (default: all 34)."""
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(1, n + 1):
        name = f"{i:05d}"
        rgb, ids = rgb_image(rng), all_ids(rng, label_ids)
        save_rgb(root / "images" / f"{name}.png", rgb)
        save_palette_label(root / "labels" / f"{name}.png", ids)
        truth[name] = (rgb, ids)
    return truth


def make_synthia(root: Path, n: int = 3, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        name = f"{i:07d}"
        rgb, ids = rgb_image(rng), all_ids(rng, range(0, 23))
        save_rgb(root / "RGB" / f"{name}.png", rgb)
        save_synthia_label(root / "GT" / "LABELS" / f"{name}.png", ids, rng)
        truth[name] = (rgb, ids)
    return truth


def make_cityscapes(root: Path, split: str = "train", n: int = 3, seed: int = 0,
                    cities=("aachen", "bremen")) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        city = cities[i % len(cities)]
        stem = f"{city}_{i:06d}_000019"
        rgb, ids = rgb_image(rng), all_ids(rng, range(0, 34))
        save_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb)
        save_gray_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids)
        truth[stem] = (rgb, ids)
    return truth


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling runs a command that creates `marker`
        return (os.system, (f"touch {self.marker}",))


def write_pickle_with_code(path: Path, marker: Path) -> None:
    """A file shaped like a state dict whose unpickling would run a command (creating `marker`)."""
    with open(path, "wb") as f:
        pickle.dump({"conv1_1.weight": _Exploit(marker)}, f)
