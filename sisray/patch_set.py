"""A round's patch set: one Parquet row per scale-invariant example (RUN/round_XX/patches/*.parquet).

A row says where the example comes from (target image, box), holds its pseudo-label and the
teacher's confidence as compressed uint8 PNGs, and counts its label's pixels per class (and, where
the target has train labels, how many of them agree with the ground truth: a diagnostic only).
The patch pass writes rows (`stages/patch_pass.py`); training rebuilds the examples from them
(`PatchDataset`); the round report sums them (`report`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from sisray import storage
from sisray.errors import SisrayError
from sisray.labels import CLASS_NAMES, IGNORE, NUM_CLASSES
from sisray.lse.patches import Box, crop_and_scale
from sisray.png import png_array, png_bytes

SCHEMA = pa.schema([
    ("index", pa.int64()),  # the target-train image, by index
    ("sample_id", pa.string()),
    ("image", pa.string()),  # its full-resolution file
    ("patch", pa.int64()),  # the example's number within the image
    ("top", pa.float64()), ("left", pa.float64()), ("height", pa.float64()), ("width", pa.float64()),
    ("scale", pa.float64()), ("zoom_out", pa.bool_()),  # the Box, in fractions of the image
    ("label_png", pa.binary()),  # uint8 pseudo-label at the working size, IGNORE where none
    ("confidence_png", pa.binary()),  # uint8 round(255 x the teacher's largest class probability)
    ("class_pixels", pa.list_(pa.int64())),  # (C,) label pixels per class
    ("ignored_pixels", pa.int64()),
    ("truth_pixels", pa.list_(pa.int64())),  # (C,) label pixels with a ground-truth label, per class
    ("correct_pixels", pa.list_(pa.int64())),  # (C,) those that agree with it
])
COLUMNS = tuple(SCHEMA.names)


@dataclass(frozen=True)
class Agreement:
    """Per pseudo-label class: pixels with a ground-truth label, and those where the two agree."""
    truth: np.ndarray
    correct: np.ndarray

    @classmethod
    def none(cls) -> Agreement:
        return cls(np.zeros(NUM_CLASSES, np.int64), np.zeros(NUM_CLASSES, np.int64))


def row(index: int, sample_id: str, image: str, number: int, box: Box, label: torch.Tensor,
        confidence: torch.Tensor, agreement: Agreement) -> dict:
    """One example's row, by column name: label (H, W) int64 with IGNORE, confidence (H, W) float in [0, 1]."""
    pixels = np.bincount(label.numpy().ravel(), minlength=IGNORE + 1)
    return {"index": index, "sample_id": sample_id, "image": image, "patch": number,
            "top": box.top, "left": box.left, "height": box.height, "width": box.width,
            "scale": box.scale, "zoom_out": box.zoom_out,
            "label_png": png_bytes(label.numpy().astype(np.uint8)),
            "confidence_png": png_bytes((confidence * 255).round().clamp(0, 255).numpy().astype(np.uint8)),
            "class_pixels": pixels[:NUM_CLASSES], "ignored_pixels": int(pixels[IGNORE]),
            "truth_pixels": agreement.truth, "correct_pixels": agreement.correct}


def columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows (`row`) as the numpy columns of a Ray Data batch: count vectors as (N, C) arrays."""
    out = {}
    for field in SCHEMA:
        values = [r[field.name] for r in rows]
        if pa.types.is_list(field.type):
            out[field.name] = np.array(values, np.int64).reshape(-1, NUM_CLASSES)
        elif pa.types.is_string(field.type) or pa.types.is_binary(field.type):
            out[field.name] = np.array(values, dtype=object)
        else:
            out[field.name] = np.array(values, dtype=field.type.to_pandas_dtype())
    return out


def table(batch: dict[str, np.ndarray]) -> pa.Table:
    """A batch of columns (`columns`) as an Arrow table of SCHEMA."""
    return pa.Table.from_pydict({f.name: batch[f.name].tolist() for f in SCHEMA}, schema=SCHEMA)


def read_rows(folder: str | Path) -> list[dict]:
    """Every row under `folder` (a path or a URI), ordered by (image index, patch number)."""
    rows = [r for f in storage.list_files(folder, ".parquet")
            for r in pq.read_table(io.BytesIO(storage.read_bytes(f))).to_pylist()]
    return sorted(rows, key=lambda r: (r["index"], r["patch"]))


def count_rows(folder: Path) -> int:
    """The number of rows under `folder`, from the Parquet footers alone."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in Path(folder).glob("*.parquet"))


def read_full_image(path: str | Path) -> torch.Tensor:
    """A target image at its own (full) resolution, uint8 (3, H, W): what examples are cut from."""
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


class PatchDataset(torch.utils.data.Dataset):
    """Training examples rebuilt from the full-resolution target images and the rows:
    (float image (3, H, W) in [0, 255], int64 pseudo-label (H, W)) at the working size, and with
    `confidence` the teacher's confidence in each label (float (H, W) in [0, 1])."""

    def __init__(self, folder: str | Path, size: tuple[int, int], confidence: bool = False):
        self.rows = read_rows(folder)
        self.size = (size[1], size[0])  # (H, W)
        self.confidence = confidence
        if confidence and self.rows and "confidence_png" not in self.rows[0]:
            raise SisrayError(f"{folder}: this patch set has no confidence maps (made by an earlier sisray); "
                              "delete it to have the round's patch pass redo it, or set lse.confidence_weight=false")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        r = self.rows[i]
        box = Box(r["top"], r["left"], r["height"], r["width"], r["scale"], r["zoom_out"])
        image = crop_and_scale(read_full_image(r["image"]), box, self.size)
        label = torch.from_numpy(png_array(r["label_png"]).astype(np.int64))
        if not self.confidence:
            return image, label
        return image, label, torch.from_numpy(png_array(r["confidence_png"]).astype(np.float32) / 255)


def report(tables: dict, selected: list[int], folder: Path, tau: np.ndarray) -> dict:
    """A round's pseudo-label report: images scored (and skipped), selected, patches written,
    pseudo-label coverage per class; and, where the target's train labels exist, pseudo-label
    accuracy per class — a diagnostic for the reader, never used for any decision."""
    files = sorted(Path(folder).glob("*.parquet"))
    columns = ["class_pixels", "ignored_pixels", "truth_pixels", "correct_pixels"]
    pixels, truth, correct = (np.zeros(NUM_CLASSES, np.int64) for _ in range(3))
    ignored = 0
    patches = 0
    def per_class(part: pa.Table, column: str) -> np.ndarray:
        return np.asarray(part.column(column).to_pylist(), np.int64).reshape(-1, NUM_CLASSES).sum(axis=0)

    for f in files:
        part = pq.read_table(f, columns=columns)
        patches += part.num_rows
        pixels += per_class(part, "class_pixels")
        ignored += int(part.column("ignored_pixels").to_numpy().sum())
        truth += per_class(part, "truth_pixels")
        correct += per_class(part, "correct_pixels")
    total = max(int(pixels.sum()) + ignored, 1)
    block = {"images_scored": int(len(tables["counts"])), "images_skipped": len(tables.get("skipped", {})),
             "selected_images": len(selected), "patches": patches, "ignored_share": ignored / total,
             "coverage": {CLASS_NAMES[c]: float(pixels[c] / total) for c in range(NUM_CLASSES)},
             "tau": {CLASS_NAMES[c]: float(tau[c]) for c in range(NUM_CLASSES)}}
    if truth.sum() > 0:
        block["pseudo_label_accuracy"] = {
            "overall": float(correct.sum() / truth.sum()),
            "per_class": {CLASS_NAMES[c]: (float(correct[c] / truth[c]) if truth[c] else None)
                          for c in range(NUM_CLASSES)}}
    return block
