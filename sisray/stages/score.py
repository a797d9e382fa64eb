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

import io
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from sisray import storage
from sisray.cluster import stage_errors
from sisray.config import Config, config_to_dict, with_absolute_paths
from sisray.datasets import open_target
from sisray.errors import DatasetError, SisrayError
from sisray.labels import CLASS_NAMES, IGNORE, NUM_CLASSES, colorize
from sisray.lse.entropy import normalise_per_class, pixel_entropy
from sisray.lse.patches import Box, crop_and_scale, crop_and_scale_labels, keep_mask, scale_invariant_examples
from sisray.lse.records import image_records
from sisray.lse.selection import select
from sisray.lse.thresholds import class_thresholds
from sisray.models import checkpoint_file
from sisray.stages.actors import ActorSpec, ModelActor, Progress, png_array, png_bytes, pool_options
from sisray.storage import atomic_write_bytes, atomic_write_json


@dataclass(frozen=True)
class PassSpec(ActorSpec):
    round: int = 0


def image_seed(seed: int, round_: int, index: int) -> int:
    """The patch generator's seed for one image of one round: independent of actors and order."""
    return int(np.random.SeedSequence([seed, round_, index]).generate_state(1)[0])


RECORD_KEYS = ("counts", "scores", "mean_entropy", "histograms")


class Scorer(ModelActor):
    """{"id"} -> per-image records (counts, scores, mean_entropy, histograms) and `error`: empty, or
    why the image was skipped (only with the target's `skip_bad_pairs`; its records stay zero)."""

    def __call__(self, batch: dict) -> dict:
        indices = [int(i) for i in batch["id"]]
        images, errors = self.load_images(indices)
        bins = self.cfg.lse.threshold.bins
        out = {"counts": np.zeros((len(indices), NUM_CLASSES), np.int64),
               "scores": np.zeros((len(indices), NUM_CLASSES), np.float32),
               "mean_entropy": np.zeros((len(indices), NUM_CLASSES), np.float32),
               "histograms": np.zeros((len(indices), NUM_CLASSES, bins), np.int64)}
        rows = [k for k, i in enumerate(indices) if i in images]
        if rows:
            records = image_records(self.predict([images[indices[k]] for k in rows]), bins)
            for key in RECORD_KEYS:
                out[key][rows] = getattr(records, key).cpu().numpy()
        return {"index": np.asarray(indices, np.int64),
                "sample_id": np.array([self.dataset.samples[i].id for i in indices], dtype=object),
                **out, "error": np.array([errors.get(i, "") for i in indices], dtype=object)}


FIGURE_IMAGES = 3
PATCH_COLUMNS = ("index", "sample_id", "image", "patch", "top", "left", "height", "width", "scale", "zoom_out",
                 "label_png", "confidence_png", "class_pixels", "ignored_pixels", "truth_pixels", "correct_pixels")


@dataclass(frozen=True)
class PatchSpec(PassSpec):
    tau: tuple[float, ...] = ()
    diagnose: bool = False  # compare pseudo-labels with the target's train labels (reporting only)
    figure: tuple[int, ...] = ()  # images whose first patch goes into the round's figure


class Patcher(ModelActor):
    """{"id"} of selected images -> one row per scale-invariant example: where it comes from, its
    compressed uint8 label, and its label's pixels per class (and, with `diagnose`, how many of
    them agree with the ground truth)."""

    def __init__(self, spec: PatchSpec):
        super().__init__(spec)
        self.truth = open_target(self.cfg.data.target, "train", with_labels=True) if spec.diagnose else None
        self.truth_index = {s.id: k for k, s in enumerate(self.truth.samples)} if self.truth else {}

    def examples(self, index: int, image: torch.Tensor, probs: torch.Tensor) -> list:
        lse = self.cfg.lse
        prediction = probs.max(0).indices
        normalised = normalise_per_class(pixel_entropy(probs[None]), prediction[None], NUM_CLASSES)[0]
        keep = keep_mask(normalised, prediction, torch.tensor(self.spec.tau)).cpu()
        generator = torch.Generator().manual_seed(image_seed(self.cfg.seed, self.spec.round, index))
        predict = None if lse.entropy_gap is None else (lambda patches: self.predict(patches).cpu())
        return [example for zoom_out in ((False, True) if lse.zoom_out else (False,))
                for example in scale_invariant_examples(image.float(), probs.cpu(), keep, [lse.scale],
                                                        lse.patches_per_image, generator, zoom_out, predict,
                                                        lse.entropy_gap or 0.0)]

    def agreement(self, sample_id: str, box: Box, label: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Per pseudo-label class: pixels with a ground-truth label, and those where the two agree."""
        truth = crop_and_scale_labels(self.truth.load_label(self.truth_index[sample_id], native=True), box,
                                      tuple(label.shape))
        checked = (label != IGNORE) & (truth != IGNORE)
        return (np.bincount(label[checked].numpy(), minlength=NUM_CLASSES),
                np.bincount(label[checked & (label == truth)].numpy(), minlength=NUM_CLASSES))

    def figure_row(self, example) -> bytes:
        """patch | the model's own prediction on it | its pseudo-label, in the Cityscapes palette (PNG)."""
        own = self.predict(example.image[None]).argmax(1)[0].cpu().numpy().astype(np.uint8)
        image = example.image.permute(1, 2, 0).clamp(0, 255).byte().cpu().numpy()
        label = example.label.cpu().numpy().astype(np.uint8)
        return png_bytes(np.concatenate([image, colorize(own), colorize(label)], axis=1))

    def __call__(self, batch: dict) -> dict:
        indices = [int(i) for i in batch["id"]]
        images, probs = self.probabilities(indices)
        rows: dict[str, list] = {k: [] for k in (*PATCH_COLUMNS, "figure_png")}
        for k, index in enumerate(indices):
            sample = self.dataset.samples[index]
            top = probs[k].max(0).values[None].cpu()  # the teacher's confidence, resampled like the label
            for number, example in enumerate(self.examples(index, images[k], probs[k])):
                box, label = example.box, example.label.cpu()
                pixels = np.bincount(label.numpy().ravel(), minlength=IGNORE + 1)
                confidence = crop_and_scale(top, box, tuple(label.shape))[0]
                values = [index, sample.id, sample.image, number, box.top, box.left, box.height, box.width,
                          box.scale, box.zoom_out, png_bytes(label.numpy().astype(np.uint8)),
                          png_bytes((confidence * 255).round().clamp(0, 255).numpy().astype(np.uint8)),
                          pixels[:NUM_CLASSES], pixels[IGNORE]]
                if self.truth is not None and sample.id in self.truth_index:
                    values += self.agreement(sample.id, box, label)
                else:
                    values += [np.zeros(NUM_CLASSES, np.int64)] * 2
                values.append(self.figure_row(example) if number == 0 and index in self.spec.figure else b"")
                for key, value in zip(rows, values):
                    rows[key].append(value)
        out = {k: np.array(v, dtype=object if k in ("sample_id", "image", "label_png", "confidence_png",
                                                    "figure_png") else None)
               for k, v in rows.items()}
        for key in ("class_pixels", "truth_pixels", "correct_pixels"):
            out[key] = out[key].reshape(-1, NUM_CLASSES).astype(np.int64)
        return out


def arrow_table(batch: dict[str, np.ndarray]) -> pa.Table:
    """A numpy batch as a plain Arrow table (2-D columns as lists), readable without Ray."""
    return pa.table({k: pa.array(v.tolist() if v.ndim > 1 or v.dtype == object else v) for k, v in batch.items()})


def score_pass(cfg: Config, checkpoint: str | Path, out: Path) -> dict:
    """Score every target-train image; writes `out` (Parquet) atomically and returns its tables
    (`read_scores`)."""
    import ray

    cfg = with_absolute_paths(cfg)
    dataset = open_target(cfg.data.target, "train", with_labels=False)
    actors, options = pool_options(cfg, len(dataset))
    spec = PassSpec(config_to_dict(cfg), str(checkpoint_file(checkpoint)), actors.threads_each, actors.use_gpu)
    results = ray.data.range(len(dataset)).map_batches(Scorer, fn_constructor_kwargs={"spec": spec}, **options)
    n = len(dataset)
    seen = np.zeros(n, bool)
    progress = Progress("scoring", n)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp")
    writer = None
    try:
        try:
            with stage_errors("scoring"):
                for batch in results.iter_batches(batch_format="numpy", batch_size=None):
                    index = batch["index"]
                    if seen[index].any():  # a retried actor must not count an image twice
                        raise SisrayError(f"scoring returned image {int(index[seen[index]][0])} twice")
                    seen[index] = True
                    table = arrow_table(batch)
                    writer = writer or pq.ParquetWriter(staging, table.schema)
                    writer.write_table(table)
                    progress.advance(len(index))
        finally:
            if writer:
                writer.close()
        if not seen.all():
            raise SisrayError(f"scoring returned no record for {int((~seen).sum())} of {n} images")
    except BaseException:
        staging.unlink(missing_ok=True)  # never leave half a scores file
        raise
    staging.replace(out)
    tables = read_scores(out)
    if tables["skipped"]:
        print(f"scoring: skipped {len(tables['skipped'])} unreadable image(s) (skip_bad_pairs), e.g. "
              f"{next(iter(tables['skipped'].values()))}", flush=True)
    return tables


def read_scores(scores_file: Path) -> dict:
    """The (N, C) tables of a scores file ordered by image index (counts, scores, mean_entropy), the
    sample ids, and `skipped` ({sample id: error} of images skipped with `skip_bad_pairs`)."""
    table = pq.read_table(scores_file, columns=["index", "sample_id", "counts", "scores", "mean_entropy", "error"])
    order = np.argsort(table.column("index").to_numpy())
    tables = {key: np.asarray(table.column(key).to_pylist(), dtype)[order]
              for key, dtype in (("counts", np.int64), ("scores", np.float32), ("mean_entropy", np.float32))}
    tables["sample_id"] = np.asarray(table.column("sample_id").to_pylist(), dtype=object)[order]
    errors = np.asarray(table.column("error").to_pylist(), dtype=object)[order]
    tables["skipped"] = {str(i): str(e) for i, e in zip(tables["sample_id"], errors) if e}
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
    selection = select(tables["counts"], tables["scores"], p, cfg.lse.selection, skip, cfg.lse.min_per_class)
    if not selection.selected:
        warn_nothing_selected(cfg, tables, p)
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


def warn_nothing_selected(cfg: Config, tables: dict, p: float) -> None:
    """Say why a round has no pseudo-labels: the reference's class-wise quota floor(N_c p / 19) is 0 for
    every class below 19 / p candidate images."""
    largest = int((np.asarray(tables["counts"]) > 0).sum(axis=0).max(initial=0))
    if cfg.lse.selection == "classwise":
        why = (f"class-wise selection takes floor(N_c x {p:g} / {NUM_CLASSES}) images per class and the most "
               f"frequent class is predicted in {largest} image(s) (needs {math.ceil(NUM_CLASSES / p)})")
    else:
        why = f"global selection takes {p:g} of {len(tables['counts'])} scored image(s)"
    print(f"warning: the round with p = {p:g} selected no image, so it has no pseudo-labels to train on: {why}. "
          "Use more target images, a larger lse.p0, lse.min_per_class, or lse.selection: global", flush=True)


def read_selection(folder: Path) -> tuple[list[int], np.ndarray]:
    """The selected image indices and tau of a round, from its selection.json and thresholds.json."""
    selected = json.loads((folder / "selection.json").read_text())["selected_index"]
    tau = json.loads((folder / "thresholds.json").read_text())["tau"]
    return selected, np.array([tau[name] for name in CLASS_NAMES], np.float64)


def has_train_labels(cfg: Config) -> bool:
    """Whether the target's train split has labels (then the patch pass reports pseudo-label accuracy)."""
    try:
        open_target(cfg.data.target, "train", with_labels=True)
    except DatasetError:
        return False
    return True


def patch_pass(cfg: Config, checkpoint: str | Path, selected: list[int], tau: np.ndarray, round_: int,
               out: Path, figure: Path | None = None) -> int:
    """Write the patch records of the selected images as Parquet shards under `out`; returns the count.
    With `figure`, also a PNG of the first patch of the first FIGURE_IMAGES selected images: patch |
    the model's own prediction on it | its pseudo-label."""
    import ray

    cfg = with_absolute_paths(cfg)
    actors, options = pool_options(cfg, max(1, len(selected)))
    spec = PatchSpec(config_to_dict(cfg), str(checkpoint_file(checkpoint)), actors.threads_each, actors.use_gpu,
                     round_, tuple(float(t) for t in tau), has_train_labels(cfg),
                     tuple(selected[:FIGURE_IMAGES]) if figure else ())
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    count = 0
    rows: dict[int, bytes] = {}  # figure rows by image
    staging.mkdir(parents=True)
    if selected:
        patches = ray.data.from_items([{"id": i} for i in selected]).map_batches(
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
                        pq.write_table(arrow_table(batch), staging / f"part-{shard:05d}.parquet")
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


def read_patches(folder: str | Path) -> list[dict]:
    """Every patch record under `folder` (a path or a URI), ordered by (image index, patch number)."""
    rows = [row for f in storage.list_files(folder, ".parquet")
            for row in pq.read_table(io.BytesIO(storage.read_bytes(f))).to_pylist()]
    return sorted(rows, key=lambda r: (r["index"], r["patch"]))


def count_patches(folder: Path) -> int:
    """The number of patch records under `folder`, from the Parquet footers alone."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in Path(folder).glob("*.parquet"))


class PatchDataset(torch.utils.data.Dataset):
    """Training examples rebuilt from the full-resolution target images and the patch records:
    (float image (3, H, W) in [0, 255], int64 pseudo-label (H, W)) at the working size, and with
    `confidence` the teacher's confidence in each label (float (H, W) in [0, 1])."""

    def __init__(self, folder: str | Path, size: tuple[int, int], confidence: bool = False):
        self.rows = read_patches(folder)
        self.size = (size[1], size[0])  # (H, W)
        self.confidence = confidence
        if confidence and self.rows and "confidence_png" not in self.rows[0]:
            raise SisrayError(f"{folder}: this patch set has no confidence maps (made by an earlier sisray); "
                              "delete it to have the round's patch pass redo it, or set lse.confidence_weight=false")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.rows[i]
        with Image.open(row["image"]) as im:
            full = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        box = Box(row["top"], row["left"], row["height"], row["width"], row["scale"], row["zoom_out"])
        image = crop_and_scale(full, box, self.size)
        label = torch.from_numpy(png_array(row["label_png"]).astype(np.int64))
        if not self.confidence:
            return image, label
        return image, label, torch.from_numpy(png_array(row["confidence_png"]).astype(np.float32) / 255)


def summary(tables: dict, selected: list[int], patches: Path, tau: np.ndarray) -> dict:
    """Per round: images scored (and skipped), selected, patches written, pseudo-label coverage per
    class; and, where the target's train labels exist, pseudo-label accuracy per class — a
    diagnostic for the reader, never used for any decision."""
    files = sorted(Path(patches).glob("*.parquet"))
    columns = ["class_pixels", "ignored_pixels", "truth_pixels", "correct_pixels"]
    pixels, truth, correct = (np.zeros(NUM_CLASSES, np.int64) for _ in range(3))
    ignored = 0
    patches = 0
    for f in files:
        table = pq.read_table(f, columns=columns)
        patches += table.num_rows
        pixels += np.asarray(table.column("class_pixels").to_pylist(), np.int64).sum(axis=0)
        ignored += int(table.column("ignored_pixels").to_numpy().sum())
        truth += np.asarray(table.column("truth_pixels").to_pylist(), np.int64).sum(axis=0)
        correct += np.asarray(table.column("correct_pixels").to_pylist(), np.int64).sum(axis=0)
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

