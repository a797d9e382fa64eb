"""The patch-set format (sisray/patch_set.py): rows written by name, read back, and training examples
rebuilt from them that show what their pseudo-labels say (pure: no Ray)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from scenes import agreement, class_coded_scene
from sisray import patch_set
from sisray.lse.patches import scale_invariant_examples


def _write_patch_set(folder, image_file, examples, boxes=None) -> None:
    rows = [patch_set.row(0, "scene", str(image_file), k, box or e.box, e.label, torch.ones(e.label.shape),
                          patch_set.Agreement.none())
            for k, (e, box) in enumerate(zip(examples, boxes or [None] * len(examples)))]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(patch_set.table(patch_set.columns(rows)), folder / "part-00000.parquet")


def test_training_examples_rebuilt_from_the_rows_show_their_pseudo_labels(tmp_path):
    label, full, probs = class_coded_scene(7)  # working 32 x 64; the file at full resolution 64 x 128
    image_file = tmp_path / "scene_leftImg8bit.png"
    Image.fromarray(full.permute(1, 2, 0).numpy()).save(image_file)
    examples = scale_invariant_examples(torch.zeros(3, 32, 64), probs, torch.ones(32, 64, dtype=torch.bool), [2.0],
                                        4, torch.Generator().manual_seed(0))
    _write_patch_set(tmp_path / "patches", image_file, examples)
    rebuilt = patch_set.PatchDataset(tmp_path / "patches", (64, 32))
    assert len(rebuilt) == 4 and patch_set.count_rows(tmp_path / "patches") == 4
    for k, e in enumerate(examples):
        image, stored = rebuilt[k]
        assert torch.equal(stored, e.label) and image.shape == (3, 32, 64)
        assert agreement(image, stored) >= 0.97

    # the same rows with every box one working pixel lower (or higher, at the bottom): misaligned
    shifted = [dataclasses.replace(e.box, top=e.box.top + (1 if e.box.top + e.box.height < 1 else -1) / 32)
               for e in examples]
    _write_patch_set(tmp_path / "shifted", image_file, examples, shifted)
    off = patch_set.PatchDataset(tmp_path / "shifted", (64, 32))
    assert all(agreement(*off[k]) < 0.97 for k in range(4))
    assert np.array_equal(patch_set.read_rows(tmp_path / "shifted")[0]["class_pixels"],
                          np.bincount(examples[0].label.ravel(), minlength=19))


def test_a_crop_larger_than_the_working_size_is_shrunk_without_aliasing(tmp_path):
    """At scale 1 (plain self-training) the training image is the whole full-resolution image shrunk
    to the working size: like the image that was scored (PIL, antialiased), not a sampling of every
    other pixel. A one-pixel checkerboard is the worst case."""
    from sisray.lse.patches import Box

    board = ((np.indices((64, 128)).sum(axis=0) % 2) * 255).astype(np.uint8)
    image_file = tmp_path / "board.png"
    Image.fromarray(np.stack([board] * 3, axis=-1)).save(image_file)
    label = torch.zeros(32, 64, dtype=torch.long)
    row = patch_set.row(0, "board", str(image_file), 0, Box(0.0, 0.0, 1.0, 1.0, 1.0), label, torch.ones(32, 64),
                        patch_set.Agreement.none())
    (tmp_path / "patches").mkdir()
    pq.write_table(patch_set.table(patch_set.columns([row])), tmp_path / "patches" / "part-00000.parquet")
    image, _ = patch_set.PatchDataset(tmp_path / "patches", (64, 32))[0]
    scored = np.asarray(Image.open(image_file).convert("RGB").resize((64, 32), Image.BICUBIC), np.float32)
    assert image.std() < 10 and abs(image.mean() - 127.5) < 5  # grey, as the eye (and PIL) sees it
    assert np.abs(image.permute(1, 2, 0).numpy() - scored).mean() < 10
