"""The patch pass (docs/METHOD.md step 4) on Ray Data: the scale-invariant examples of the selected
images, written as the round's patch set (`sisray.patch_set`).

Each actor recomputes the prediction of a selected image, keeps its confident pixels (the round's
thresholds), draws its examples with a generator seeded by (seed, round, image) and returns one row
per example. Shards are ordered by image index: nothing depends on the number of actors, the batch
size or the order in which blocks finish.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from sisray import patch_set
from sisray.cluster import Actors, stage_errors
from sisray.config import Config, with_absolute_paths
from sisray.datasets import open_target
from sisray.errors import DatasetError, SisrayError
from sisray.labels import IGNORE, NUM_CLASSES, colorize
from sisray.lse.patches import Box, crop_and_scale, pseudo_label_mask, scale_invariant_examples, transfer_ground_truth
from sisray.models import checkpoint_file
from sisray.png import png_array, png_bytes
from sisray.progress import Progress
from sisray.stages.actors import ModelActor, image_ids, pool_options
from sisray.stages.score import PassSpec
from sisray.storage import atomic_write_bytes

FIGURE_IMAGES = 3


def image_seed(seed: int, round_: int, index: int) -> int:
    """The patch generator's seed for one image of one round: independent of actors and order."""
    return int(np.random.SeedSequence([seed, round_, index]).generate_state(1)[0])


@dataclass(frozen=True)
class PatchSpec(PassSpec):
    tau: tuple[float, ...] = ()
    scales: tuple[float, ...] = ()  # patch scales (lse.scale): boxes of (H/scale, W/scale), upsampled by scale
    diagnose: bool = False  # compare pseudo-labels with the target's train labels (reporting only)
    figure: tuple[int, ...] = ()  # images whose first patch goes into the round's figure


class Patcher(ModelActor):
    """{"id"} of selected images -> one `patch_set.row` per scale-invariant example, and a figure
    row (PNG) for the images in `spec.figure`."""

    def __init__(self, spec: PatchSpec):
        super().__init__(spec)
        self.truth = open_target(self.cfg.data.target, "train", with_labels=True) if spec.diagnose else None
        self.truth_index = {s.id: k for k, s in enumerate(self.truth.samples)} if self.truth else {}

    def examples(self, index: int, image: torch.Tensor, probs: torch.Tensor) -> list:
        lse = self.cfg.lse
        keep = pseudo_label_mask(probs, torch.tensor(self.spec.tau, device=probs.device)).cpu()
        generator = torch.Generator().manual_seed(image_seed(self.cfg.seed, self.spec.round, index))
        predict = None if lse.entropy_gap is None else (lambda patches: self.predict(patches).cpu())
        full = patch_set.read_full_image(self.dataset.samples[index].image)  # as training cuts its examples
        return [example for zoom_out in ((False, True) if lse.zoom_out else (False,))
                for example in scale_invariant_examples(image.float(), probs.cpu(), keep, self.spec.scales,
                                                        lse.patches_per_image, generator, zoom_out, predict,
                                                        lse.entropy_gap or 0.0, full)]

    def agreement(self, sample_id: str, box: Box, label: torch.Tensor) -> patch_set.Agreement:
        """With `diagnose`: the pseudo-label against the ground truth at the working size, resampled
        with the same box exactly as the pseudo-label was."""
        if self.truth is None or sample_id not in self.truth_index:
            return patch_set.Agreement.none()
        truth = transfer_ground_truth(self.truth.load_label(self.truth_index[sample_id]), box, tuple(label.shape),
                                      NUM_CLASSES)
        checked = (label != IGNORE) & (truth != IGNORE)
        return patch_set.Agreement(np.bincount(label[checked].numpy(), minlength=NUM_CLASSES),
                                   np.bincount(label[checked & (label == truth)].numpy(), minlength=NUM_CLASSES))

    def figure_row(self, example) -> bytes:
        """patch | the model's own prediction on it | its pseudo-label, in the Cityscapes palette (PNG)."""
        own = self.predict(example.image[None]).argmax(1)[0].cpu().numpy().astype(np.uint8)
        image = example.image.permute(1, 2, 0).clamp(0, 255).byte().cpu().numpy()
        label = example.label.cpu().numpy().astype(np.uint8)
        return png_bytes(np.concatenate([image, colorize(own), colorize(label)], axis=1))

    def __call__(self, batch: dict) -> dict:
        indices = [int(i) for i in batch["id"]]
        images, probs = self.teacher_probabilities(indices)
        rows, figures = [], []
        for k, index in enumerate(indices):
            sample = self.dataset.samples[index]
            confidence = probs[k].max(0).values[None].cpu()  # the teacher's, resampled like the label
            for number, example in enumerate(self.examples(index, images[k], probs[k])):
                box, label = example.box, example.label.cpu()
                rows.append(patch_set.row(index, sample.id, str(sample.image), number, box, label,
                                          crop_and_scale(confidence, box, tuple(label.shape))[0],
                                          self.agreement(sample.id, box, label)))
                figures.append(self.figure_row(example) if number == 0 and index in self.spec.figure else b"")
        return {**patch_set.columns(rows), "figure_png": np.array(figures, dtype=object)}


def patch_spec(cfg: Config, checkpoint: str | Path, actors: Actors, selected: list[int], tau: np.ndarray,
               round_: int, figure: bool) -> PatchSpec:
    """What the patch pass's actors run, every value resolved here (paths absolute, thresholds, scales)."""
    cfg = with_absolute_paths(cfg)
    return PatchSpec(cfg, str(checkpoint_file(checkpoint)), actors.threads_each, actors.use_gpu, round_,
                     tuple(float(t) for t in tau), (float(cfg.lse.scale),), has_train_labels(cfg),
                     tuple(selected[:FIGURE_IMAGES]) if figure else ())


def has_train_labels(cfg: Config) -> bool:
    """Whether the target's train split has labels (then the patch pass reports pseudo-label accuracy)."""
    try:
        open_target(cfg.data.target, "train", with_labels=True)
    except DatasetError:
        return False
    return True


def patch_pass(cfg: Config, checkpoint: str | Path, selected: list[int], tau: np.ndarray, round_: int,
               out: Path, figure: Path | None = None) -> int:
    """Write the patch set of the selected images as Parquet shards under `out`; returns the row count.
    With `figure`, also a PNG of the first patch of the first FIGURE_IMAGES selected images: patch |
    the model's own prediction on it | its pseudo-label."""
    # an image is predicted, then its patches are cut, encoded and written: about 1 + patches of work
    actors, options = pool_options(cfg, max(1, len(selected)), 1 + cfg.lse.patches_per_image)
    spec = patch_spec(cfg, checkpoint, actors, selected, tau, round_, figure is not None)
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    count = 0
    rows: dict[int, bytes] = {}  # figure rows by image
    staging.mkdir(parents=True)
    if selected:
        patches = image_ids(selected).map_batches(
            Patcher, fn_constructor_kwargs={"spec": spec}, **options)
        progress = Progress("patch pass", len(selected))
        done: set[int] = set()
        try:
            with stage_errors("patch pass"):
                for shard, batch in enumerate(patches.iter_batches(batch_format="numpy", batch_size=None)):
                    images = set(batch["index"].tolist())
                    if images & done:
                        raise SisrayError(f"patch pass returned image {min(images & done)} twice")
                    done |= images
                    rows.update((int(i), png) for i, png in zip(batch["index"], batch.pop("figure_png")) if png)
                    if len(batch["index"]):
                        pq.write_table(patch_set.table(batch), staging / f"part-{shard:05d}.parquet")
                    count += len(batch["index"])
                    progress.advance(len(images))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # never leave half a patch set
            raise
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    if figure and rows:
        buffer = io.BytesIO()
        Image.fromarray(np.concatenate([png_array(rows[i]) for i in sorted(rows)], axis=0)).save(buffer, "PNG")
        atomic_write_bytes(figure, buffer.getvalue())
    return count
