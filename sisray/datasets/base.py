"""What every dataset shares: pairing images with labels, validating them up front, loading a sample.

A dataset subclass states where its files are (`find_images`, `find_labels`, `label_for`), how its
label files are encoded (`label_format`), how to read them (`read_label_ids`) and how their IDs map
to the 19 trainIds (`id_to_trainid`). Everything else lives here, so the checks and messages are the
same for GTA5, SYNTHIA and Cityscapes.
"""

from __future__ import annotations

import logging
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from PIL import Image

from sisray.errors import DatasetError
from sisray.labels import EVAL_SETS, IGNORE, NUM_CLASSES

log = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height)
LabelFormat = Literal["index8", "rgb16"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
_PNG_COLOR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}
_MAX_LISTED_PROBLEMS = 5


@dataclass(frozen=True)
class Sample:
    id: str
    image: str
    label: str | None


@dataclass(frozen=True)
class FileInfo:
    width: int
    height: int
    bit_depth: int
    color_type: int  # PNG colour type, or -1 for other formats


def probe_image_file(path: str | Path) -> FileInfo:
    """Size and encoding of an image file from its header; raises ValueError if unreadable or truncated.

    PNGs are checked by their IHDR header and IEND trailer (two small reads, no decoding), so
    validating a dataset of tens of thousands of files takes seconds.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(33)
        if head[:8] == _PNG_SIGNATURE:
            if len(head) < 33 or head[12:16] != b"IHDR":
                raise ValueError("not a valid PNG (no IHDR header)")
            width, height, bit_depth, color_type = struct.unpack(">IIBB", head[16:26])
            f.seek(0, 2)
            if f.tell() < 45:
                raise ValueError("truncated PNG")
            f.seek(-8, 2)
            if f.read(8) != _PNG_END:
                raise ValueError("truncated PNG (no IEND trailer)")
            return FileInfo(width, height, bit_depth, color_type)
    try:
        with Image.open(path) as im:
            width, height = im.size
            im.verify()  # reads the whole file: catches truncation in other formats
    except Exception as exc:  # PIL raises many types for bad files
        raise ValueError(f"not a readable image ({exc})") from None
    return FileInfo(width, height, 8, -1)


def _label_format_problem(info: FileInfo, expected: LabelFormat) -> str | None:
    kind = _PNG_COLOR_TYPES.get(info.color_type, "non-PNG")
    if expected == "index8":
        if info.color_type not in (0, 3) or info.bit_depth != 8:
            return (f"label is {info.bit_depth}-bit {kind}; expected an 8-bit single-channel "
                    f"(grayscale or palette) PNG of label IDs, not a colour rendering")
    elif info.color_type not in (2, 6) or info.bit_depth != 16:
        return f"label is {info.bit_depth}-bit {kind}; expected a 16-bit RGB PNG (class ID in the red channel)"
    return None


def check_pair(sample: Sample, label_format: LabelFormat) -> tuple[str | None, str | None]:
    """(the first problem of one image/label pair, or None; how its sizes differ, or None)."""
    try:
        image = probe_image_file(sample.image)
    except (OSError, ValueError) as exc:
        return f"{sample.image}: unreadable image: {exc}", None
    if sample.label is None:
        return None, None
    try:
        label = probe_image_file(sample.label)
    except (OSError, ValueError) as exc:
        return f"{sample.label}: unreadable label: {exc}", None
    problem = _label_format_problem(label, label_format)
    if problem:
        return f"{sample.label}: {problem}", None
    if (label.width, label.height) != (image.width, image.height):
        return None, (f"{sample.label}: label is {label.width}x{label.height} but its image "
                      f"{sample.image} is {image.width}x{image.height}")
    return None, None


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path} does not exist or is not a directory")
    return path


class SegmentationDataset(torch.utils.data.Dataset):
    """Image/label pairs at a working size: `ds[i]` is (uint8 RGB image (3, H, W), int64 trainIds (H, W)).

    Images are resized bicubic, labels nearest. Without labels (`with_labels=False`, e.g. the
    unlabelled target) the label tensor is all IGNORE. Bad pairs raise `DatasetError` when the
    dataset is opened, or are reported and skipped with `skip_bad_pairs=True` (see `skipped`).
    """

    name: ClassVar[str]
    splits: ClassVar[tuple[str, ...]]
    label_format: ClassVar[LabelFormat] = "index8"
    id_to_trainid: ClassVar[np.ndarray]
    eval_classes: ClassVar[tuple[int, ...]] = EVAL_SETS[19]  # trainIds this benchmark evaluates
    # a label whose size differs from its image's: a bad pair, or (True) image and label each resized
    # to the working size, and counted in one line (GTA5's release has a few dozen such pairs)
    resize_mismatched: ClassVar[bool] = False

    def __init__(self, root: str | Path, split: str = "train", size: Size = (1024, 512),
                 with_labels: bool = True, skip_bad_pairs: bool = False):
        if split not in self.splits:
            raise DatasetError(f"{self.name}: unknown split {split!r}; expected one of {', '.join(self.splits)}")
        self.root = Path(root)
        self.split = split
        self.size = (int(size[0]), int(size[1]))
        self.with_labels = with_labels
        require_dir(self.root, f"{self.name} root")
        self.samples, self.skipped = self._pair_and_check(skip_bad_pairs)

    # ---- what a subclass states
    def find_images(self) -> dict[str, Path]:
        """Sample id -> image path."""
        raise NotImplementedError

    def find_labels(self) -> dict[str, Path]:
        """Sample id -> label path, for every label file present."""
        raise NotImplementedError

    def read_label_ids(self, path: str) -> np.ndarray:
        """The raw label IDs of one label file, (H, W) integer array."""
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise ValueError(f"label mode is {im.mode}, expected a single-channel index image")
            return np.asarray(im)

    # ---- shared behaviour
    def _pair_and_check(self, skip_bad_pairs: bool) -> tuple[list[Sample], list[tuple[str, str]]]:
        images = self.find_images()
        if not images:
            raise DatasetError(f"{self.name} {self.split}: no images found under {self.root} "
                               f"(expected {self.layout_hint()})")
        labels = self.find_labels() if self.with_labels else {}
        problems: list[tuple[str, str]] = []
        if self.with_labels:
            problems += [(i, f"{images[i]}: image has no label") for i in sorted(images.keys() - labels.keys())]
            problems += [(i, f"{labels[i]}: label has no image") for i in sorted(labels.keys() - images.keys())]
        candidates = [Sample(i, str(images[i]), str(labels[i]) if self.with_labels else None)
                      for i in sorted(images) if not self.with_labels or i in labels]
        with ThreadPoolExecutor(max_workers=8) as pool:  # file headers: I/O-bound
            checks = list(pool.map(lambda s: check_pair(s, self.label_format), candidates))
        problems += [(s.id, p) for s, (p, _) in zip(candidates, checks) if p]
        mismatched = [m for _, m in checks if m]
        if mismatched and self.resize_mismatched:
            log.warning("%s %s at %s: %d image/label pair(s) differ in size, each resized to the working size "
                        "(first: %s)", self.name, self.split, self.root, len(mismatched), mismatched[0])
        elif mismatched:
            problems += [(s.id, m) for s, (_, m) in zip(candidates, checks) if m]
        bad = {i for i, _ in problems}
        samples = [s for s in candidates if s.id not in bad]
        if problems:
            listed = "\n  ".join(p for _, p in problems[:_MAX_LISTED_PROBLEMS])
            more = len(problems) - _MAX_LISTED_PROBLEMS
            summary = (f"{self.name} {self.split} at {self.root}: {len(problems)} bad image/label pair(s):\n  "
                       f"{listed}" + (f"\n  ... and {more} more" if more > 0 else ""))
            if not skip_bad_pairs:
                raise DatasetError(summary + "\nFix them, or set skip_bad_pairs: true for this dataset to skip them.")
            log.warning("%s\nSkipping them (skip_bad_pairs).", summary)
        if not samples:
            raise DatasetError(f"{self.name} {self.split} at {self.root}: no usable samples left")
        return samples, problems

    def layout_hint(self) -> str:
        return "the layout in docs/DATASETS.md"

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> torch.Tensor:
        """uint8 RGB image (3, H, W) at the working size."""
        path = self.samples[index].image
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize(self.size, Image.BICUBIC)
                array = np.asarray(im)
        except Exception as exc:  # PIL raises many types for bad files
            raise DatasetError(f"{path}: cannot decode image: {exc}") from None
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()

    def load_label(self, index: int, native: bool = False) -> torch.Tensor:
        """int64 trainIds (H, W) at the working size, or at the file's own size with `native`
        (evaluation compares at label resolution). All IGNORE without labels."""
        width, height = self.size
        path = self.samples[index].label
        if path is None:
            return torch.full((height, width), IGNORE, dtype=torch.int64)
        try:
            ids = self.read_label_ids(path)
        except Exception as exc:  # decoding errors of PIL / OpenCV
            raise DatasetError(f"{path}: cannot decode label: {exc}") from None
        train_ids = self.id_to_trainid[ids]
        if not native and train_ids.shape != (height, width):
            train_ids = np.asarray(Image.fromarray(train_ids).resize((width, height), Image.NEAREST))
        return torch.from_numpy(train_ids.astype(np.int64))

    def class_counts(self, threads: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """(pixels, images) per trainId, int64 (19,) each: how many labelled pixels of each class the
        label files hold at their own resolution, and in how many images it appears. What a model
        trained on this set can learn to predict is counted here, not declared (`eval_classes`)."""
        histograms = self.label_histograms(threads)
        return histograms.sum(axis=0), (histograms > 0).sum(axis=0)

    def label_histograms(self, threads: int = 8) -> np.ndarray:
        """(N, 19) int64: the labelled pixels of each trainId in each label file, at its own resolution."""
        def count(sample: Sample) -> np.ndarray:
            try:
                ids = self.read_label_ids(sample.label)
            except Exception as exc:  # decoding errors of PIL / OpenCV
                raise DatasetError(f"{sample.label}: cannot decode label: {exc}") from None
            return np.bincount(self.id_to_trainid[ids].ravel(), minlength=256)[:NUM_CLASSES]

        if not self.with_labels:
            raise DatasetError(f"{self.name} {self.split}: opened without labels, so its classes cannot be counted")
        with ThreadPoolExecutor(max_workers=threads) as pool:  # decoding releases the GIL
            return np.stack(list(pool.map(count, self.samples))).astype(np.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.load_image(index), self.load_label(index)
