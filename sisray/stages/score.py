"""Pseudo-labelling with Ray Data: the scoring pass, selection and thresholds, the patch pass.

Scoring: an actor pool (one model per actor) turns target-train images into the small per-image
records of `sisray.lse.records`; softmax maps never leave an actor. The driver streams the records
into RUN/round_XX/scores.parquet, keeping only the (N, C) tables that selection needs.
Selection and thresholds run on the driver (`sisray.lse`). The patch pass recomputes the prediction
of each selected image inside an actor, draws its scale-invariant examples with a generator seeded
by (seed, round, image), and writes patch records (image, box, compressed uint8 label) as Parquet
shards. Every result is ordered by image index, so it does not depend on the number of actors, the
batch size or the order in which blocks finish.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from sisray.cluster import stage_errors
from sisray.config import Config, config_to_dict, with_absolute_paths
from sisray.datasets import open_target
from sisray.labels import CLASS_NAMES, IGNORE, NUM_CLASSES
from sisray.lse.entropy import normalise_per_class, pixel_entropy
from sisray.lse.patches import Box, crop_and_scale, keep_mask, scale_invariant_examples
from sisray.lse.records import image_records
from sisray.lse.selection import select
from sisray.lse.thresholds import class_thresholds
from sisray.models import checkpoint_file
from sisray.stages.actors import ActorSpec, ModelActor, png_array, png_bytes, pool_options
from sisray.storage import atomic_write_json


@dataclass(frozen=True)
class PassSpec(ActorSpec):
    round: int = 0
    tau: tuple[float, ...] = ()


def image_seed(seed: int, round_: int, index: int) -> int:
    """The patch generator's seed for one image of one round: independent of actors and order."""
    return int(np.random.SeedSequence([seed, round_, index]).generate_state(1)[0])


class Scorer(ModelActor):
    """{"id"} -> per-image records (counts, scores, mean_entropy, histograms)."""

    def __call__(self, batch: dict) -> dict:
        indices = [int(i) for i in batch["id"]]
        _, probs = self.probabilities(indices)
        records = image_records(probs, self.cfg.lse.threshold.bins)
        return {"index": np.asarray(indices, np.int64),
                "sample_id": np.array([self.dataset.samples[i].id for i in indices], dtype=object),
                "counts": records.counts.cpu().numpy(), "scores": records.scores.cpu().numpy(),
                "mean_entropy": records.mean_entropy.cpu().numpy(), "histograms": records.histograms.cpu().numpy()}


class Patcher(ModelActor):
    """{"id"} of selected images -> one row per scale-invariant example."""

    def __call__(self, batch: dict) -> dict:
        indices = [int(i) for i in batch["id"]]
        images, probs = self.probabilities(indices)
        lse = self.cfg.lse
        tau = torch.tensor(self.spec.tau)
        rows: dict[str, list] = {k: [] for k in ("index", "sample_id", "image", "patch", "top", "left", "height",
                                                 "width", "scale", "zoom_out", "label_png")}
        for k, index in enumerate(indices):
            prediction = probs[k].max(0).indices
            normalised = normalise_per_class(pixel_entropy(probs[k:k + 1]), prediction[None], NUM_CLASSES)[0]
            keep = keep_mask(normalised, prediction, tau)
            generator = torch.Generator().manual_seed(image_seed(self.cfg.seed, self.spec.round, index))
            examples = scale_invariant_examples(images[k].float(), probs[k].cpu(), keep.cpu(), [lse.scale],
                                                lse.patches_per_image, generator)
            sample = self.dataset.samples[index]
            for p, example in enumerate(examples):
                box = example.box
                values = (index, sample.id, sample.image, p, box.top, box.left, box.height, box.width, box.scale,
                          box.zoom_out, png_bytes(example.label.cpu().numpy().astype(np.uint8)))
                for key, value in zip(rows, values):
                    rows[key].append(value)
        return {k: np.array(v, dtype=object if k in ("sample_id", "image", "label_png") else None)
                for k, v in rows.items()}


def score_pass(cfg: Config, checkpoint: str | Path, out: Path) -> dict[str, np.ndarray]:
    """Score every target-train image; writes `out` (Parquet) atomically and returns the (N, C)
    tables ordered by image index: counts, scores, mean_entropy, and the sample ids."""
    import ray

    cfg = with_absolute_paths(cfg)
    dataset = open_target(cfg.data.target, "train", with_labels=False)
    actors, options = pool_options(cfg, len(dataset))
    spec = PassSpec(config_to_dict(cfg), str(checkpoint_file(checkpoint)), actors.threads_each, actors.use_gpu)
    results = ray.data.range(len(dataset)).map_batches(Scorer, fn_constructor_kwargs={"spec": spec}, **options)
    n = len(dataset)
    tables = {"counts": np.zeros((n, NUM_CLASSES), np.int64), "scores": np.zeros((n, NUM_CLASSES), np.float32),
              "mean_entropy": np.zeros((n, NUM_CLASSES), np.float32)}
    sample_ids = np.empty(n, dtype=object)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp")
    writer = None
    seen = 0
    try:
        try:
            with stage_errors("scoring"):
                for batch in results.iter_batches(batch_format="numpy", batch_size=None):
                    index = batch["index"]
                    for key in tables:
                        tables[key][index] = batch[key]
                    sample_ids[index] = batch["sample_id"]
                    seen += len(index)
                    table = pa.table({"index": index, "sample_id": batch["sample_id"].astype(str),
                                      **{k: batch[k].tolist() for k in ("counts", "scores", "mean_entropy", "histograms")}})
                    writer = writer or pq.ParquetWriter(staging, table.schema)
                    writer.write_table(table)
        finally:
            if writer:
                writer.close()
    except BaseException:
        staging.unlink(missing_ok=True)  # never leave half a scores file
        raise
    if seen != n:
        staging.unlink(missing_ok=True)
        raise RuntimeError(f"scoring returned {seen} records for {n} images")
    staging.replace(out)
    tables["sample_id"] = sample_ids
    return tables


def read_histograms(scores_file: Path, rows: list[int], bins: int) -> np.ndarray:
    """(N, C, bins) histograms with only `rows` filled (the selected images), read from the scores file."""
    table = pq.read_table(scores_file, columns=["index", "histograms"])
    index = table.column("index").to_numpy()
    wanted = np.isin(index, rows)
    out = np.zeros((int(index.max()) + 1, NUM_CLASSES, bins), np.int64)
    for i, hist in zip(index[wanted], table.column("histograms").filter(pa.array(wanted)).to_pylist()):
        out[i] = np.asarray(hist, np.int64)
    return out


def select_and_threshold(cfg: Config, tables: dict, p: float, scores_file: Path, folder: Path,
                         skip: tuple[int, ...] = ()) -> tuple[list[int], np.ndarray]:
    """Selection and thresholds of one round; writes selection.json and thresholds.json."""
    threshold = cfg.lse.threshold
    selection = select(tables["counts"], tables["scores"], p, cfg.lse.selection, skip)
    histograms = read_histograms(scores_file, selection.selected, threshold.bins) if selection.selected else \
        np.zeros((len(tables["counts"]), NUM_CLASSES, threshold.bins), np.int64)
    tau = class_thresholds(selection, tables["mean_entropy"], histograms, threshold.estimator, threshold.window,
                           threshold.quantile, threshold.fallback)
    atomic_write_json(folder / "selection.json", {
        "p": p, "method": cfg.lse.selection, "selected": [str(tables["sample_id"][i]) for i in selection.selected],
        "selected_index": selection.selected,
        "cutoffs": {CLASS_NAMES[c]: k for c, k in selection.cutoffs.items()}})
    atomic_write_json(folder / "thresholds.json", {
        "estimator": threshold.estimator, "window": threshold.window, "quantile": threshold.quantile,
        "fallback": threshold.fallback, "tau": {CLASS_NAMES[c]: float(tau[c]) for c in range(NUM_CLASSES)}})
    return selection.selected, tau


def patch_pass(cfg: Config, checkpoint: str | Path, selected: list[int], tau: np.ndarray, round_: int,
               out: Path) -> int:
    """Write the patch records of the selected images as Parquet shards under `out`; returns the count."""
    import ray

    cfg = with_absolute_paths(cfg)
    actors, options = pool_options(cfg, max(1, len(selected)))
    spec = PassSpec(config_to_dict(cfg), str(checkpoint_file(checkpoint)), actors.threads_each, actors.use_gpu,
                    round_, tuple(float(t) for t in tau))
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    count = 0
    staging.mkdir(parents=True)
    if selected:
        patches = ray.data.from_items([{"id": i} for i in selected]).map_batches(
            Patcher, fn_constructor_kwargs={"spec": spec}, **options)
        try:
            with stage_errors("patch pass"):
                for shard, batch in enumerate(patches.iter_batches(batch_format="pyarrow", batch_size=None)):
                    pq.write_table(batch, staging / f"part-{shard:05d}.parquet")
                    count += batch.num_rows
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # never leave half a patch set
            raise
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return count


def read_patches(folder: Path) -> list[dict]:
    """Every patch record under `folder`, ordered by (image index, patch number)."""
    rows = [row for f in sorted(folder.glob("*.parquet")) for row in pq.read_table(f).to_pylist()]
    return sorted(rows, key=lambda r: (r["index"], r["patch"]))


class PatchDataset(torch.utils.data.Dataset):
    """Training examples rebuilt from the full-resolution target images and the patch records:
    (float image (3, H, W) in [0, 255], int64 pseudo-label (H, W)) at the working size."""

    def __init__(self, folder: Path, size: tuple[int, int]):
        self.rows = read_patches(Path(folder))
        self.size = (size[1], size[0])  # (H, W)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.rows[i]
        with Image.open(row["image"]) as im:
            full = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        box = Box(row["top"], row["left"], row["height"], row["width"], row["scale"], row["zoom_out"])
        image = crop_and_scale(full, box, self.size)
        label = torch.from_numpy(png_array(row["label_png"]).astype(np.int64))
        return image, label


def summary(tables: dict, selected: list[int], patches: Path, tau: np.ndarray) -> dict:
    """Per round: images scored, selected, patches written, pseudo-label coverage per class."""
    rows = read_patches(patches)
    pixels = np.zeros(256, np.int64)
    for row in rows:
        pixels += np.bincount(png_array(row["label_png"]).ravel(), minlength=256)
    total = max(int(pixels.sum()), 1)
    return {"images_scored": int(len(tables["counts"])), "selected_images": len(selected), "patches": len(rows),
            "ignored_share": float(pixels[IGNORE] / total),
            "coverage": {CLASS_NAMES[c]: float(pixels[c] / total) for c in range(NUM_CLASSES)},
            "tau": {CLASS_NAMES[c]: float(tau[c]) for c in range(NUM_CLASSES)}}
