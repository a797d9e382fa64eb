"""Evaluation on target val, sharded over Ray Data actors.

Each actor loads the model once, predicts at the working size, upsamples the probabilities to the
label resolution before the argmax (docs/METHOD.md), and returns one 19x19 confusion matrix per batch;
the driver sums them, which equals a single pass. Optionally each prediction is exported as a
Cityscapes label-ID PNG for the official evaluator.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sisray.cluster import stage_errors
from sisray.config import Config, with_absolute_paths
from sisray.datasets import open_target
from sisray.labels import CLASS_NAMES, NUM_CLASSES, TRAINID_TO_CITYSCAPES_ID, colorize
from sisray.lse.entropy import pixel_entropy
from sisray.metrics import ConfusionMatrix
from sisray.models import checkpoint_file
from sisray.png import png_array, png_bytes
from sisray.rundir import ModelDir
from sisray.stages.actors import ActorSpec, ModelActor, image_ids, pool_options
from sisray.stages.score import Scorer, ScoresWriter, scores_written
from sisray.stages.validation import (ValidationSpec, Validator, images_validated, merged, validation_subset,
                                      views_per_image, zoom_validated)
from sisray.storage import absolute, atomic_write_json
from sisray.validators import label_free

OVERLAYS = 3  # val images shown in the overlay figure
PREDICTION_SUFFIX = "_pred_labelIds.png"  # the official evaluator matches <city>_<seq>_<frame>*.png


@dataclass(frozen=True)
class EvalSpec(ActorSpec):
    export: str | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False


def export_prediction(folder: str | Path, sample_id: str, prediction: np.ndarray) -> Path:
    """OUT/<city>/<city>_<seq>_<frame>_pred_labelIds.png holding Cityscapes label IDs."""
    city = sample_id.split("_")[0]
    path = Path(folder) / city / f"{sample_id}{PREDICTION_SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(TRAINID_TO_CITYSCAPES_ID[prediction]).save(path)
    return path


def overlay(image: torch.Tensor, prediction: np.ndarray, label: np.ndarray) -> np.ndarray:
    """image | prediction over image | ground truth over image, at the working size (H, 3W, 3)."""
    rgb = image.permute(1, 2, 0).numpy().astype(np.float32)
    size = (rgb.shape[1], rgb.shape[0])

    def blend(classes: np.ndarray) -> np.ndarray:
        small = np.asarray(Image.fromarray(classes.astype(np.uint8)).resize(size, Image.NEAREST))
        colours = colorize(small).astype(np.float32)
        alpha = np.where(small[..., None] == 255, 0.0, 0.6)
        return rgb * (1 - alpha) + colours * alpha

    return np.concatenate([rgb, blend(prediction), blend(label)], axis=1).astype(np.uint8)


class Evaluator(ModelActor):
    """Ray Data actor: {"id": indices} -> {"id", "counts": (n, 19, 19), "overlay": PNG bytes or b"",
    and the label-free sums of `label_free`: "entropy" (n,), "probs" (n, 19), "pixels" (n,)}."""
    split = "val"
    with_labels = True

    def __call__(self, batch: dict) -> dict:
        return self.rows([int(i) for i in batch["id"]])

    @staticmethod
    def blank(n: int) -> dict:
        """n rows that add nothing to the sums."""
        return {"id": np.zeros(n, np.int64), "counts": np.zeros((n, NUM_CLASSES, NUM_CLASSES), np.int64),
                "overlay": np.full(n, b"", object), "entropy": np.zeros(n), "probs": np.zeros((n, NUM_CLASSES)),
                "pixels": np.zeros(n, np.int64)}

    def rows(self, indices: list[int]) -> dict:
        """The sums of the target-val images `indices`, in that order."""
        images, probs = self.probabilities(indices, self.spec.scales, self.spec.flip)
        out = self.blank(len(indices))
        out["id"][:] = indices
        out["entropy"][:] = pixel_entropy(probs).sum(dim=(1, 2)).cpu().numpy()  # at the working size: no label involved
        out["probs"][:] = probs.sum(dim=(2, 3)).cpu().numpy()
        out["pixels"][:] = probs.shape[2] * probs.shape[3]
        for k, index in enumerate(indices):
            label = self.dataset.load_label(index, native=True)
            full = F.interpolate(probs[k:k + 1], size=label.shape, mode="bilinear", align_corners=False)
            prediction = full.argmax(1)[0].cpu()
            matrix = ConfusionMatrix()
            matrix.update(prediction, label)
            out["counts"][k] = matrix.counts
            if self.spec.export:
                export_prediction(self.spec.export, self.dataset.samples[index].id, prediction.numpy().astype(np.uint8))
            if index < OVERLAYS:
                out["overlay"][k] = png_bytes(overlay(images[k], prediction.numpy(), label.numpy()))
        return out


VAL, TRAIN, VALIDATE = 0, 1, 2  # the split of a row of a pass that evaluates and scores or validates


class EvaluationPass:
    """Ray Data actor of a pass that evaluates a model on target val and, with the same model, scores
    target train (for a model that may teach the next round) and/or validates it on the run's subset of
    target-train images (the label-free validators): {"id", "split"} rows of every split, mixed in a
    batch as Ray Data forms them -> {"split", "eval.<Evaluator's columns>", "score.<Scorer's columns>",
    "validate.<Validator's columns>"}, the columns of the other splits blank."""

    def __init__(self, spec: EvalSpec, scoring: bool, validation: ValidationSpec | None):
        evaluator = Evaluator(spec)
        self.jobs = [(VAL, "eval.", evaluator)]
        if scoring:
            self.jobs.append((TRAIN, "score.", Scorer(spec, model=evaluator.model)))
        if validation is not None:
            self.jobs.append((VALIDATE, "validate.", Validator(validation, model=evaluator.model)))

    def __call__(self, batch: dict) -> dict:
        out = {"split": batch["split"]}
        for split, prefix, actor in self.jobs:
            rows = np.flatnonzero(batch["split"] == split)
            columns = actor.blank(len(batch["split"]))
            if len(rows):
                for key, values in actor.rows([int(i) for i in batch["id"][rows]]).items():
                    columns[key][rows] = values
            out.update({prefix + key: values for key, values in columns.items()})
        return out


def rows_of(batch: dict[str, np.ndarray], split: int, prefix: str) -> dict[str, np.ndarray]:
    """One split's rows and columns of an `EvaluationPass` batch, without the prefix."""
    rows = batch["split"] == split
    return {key.removeprefix(prefix): values[rows] for key, values in batch.items() if key.startswith(prefix)}


class EvaluationSums:
    """The sums of `Evaluator` batches: confusion matrix, overlays, label-free sums."""

    def __init__(self):
        self.total = ConfusionMatrix()
        self.pictures: dict[int, bytes] = {}
        # image -> its label-free sums, added up in image order whatever order the batches arrive in
        # (float sums move in the last bits with the order: the same run gives the same figures)
        self.entropy: dict[int, float] = {}
        self.probs: dict[int, np.ndarray] = {}
        self.pixels = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        self.total.counts += batch["counts"].sum(axis=0)
        ids = batch["id"].tolist()
        self.pictures.update({i: png for i, png in zip(ids, batch["overlay"]) if png})
        self.entropy.update(zip(ids, batch["entropy"].tolist()))
        self.probs.update(zip(ids, batch["probs"]))
        self.pixels += int(batch["pixels"].sum())

    def summary(self, dataset, checkpoint: str, figure: Path | None) -> dict:
        """The evaluation block; writes the overlay figure if asked."""
        summary = self.total.summary(dataset.eval_classes)
        order = sorted(self.probs)
        entropy = float(np.sum([self.entropy[i] for i in order]))
        probs = np.sum([self.probs[i] for i in order], axis=0) if order else np.zeros(NUM_CLASSES)
        summary["label_free"] = label_free(entropy, probs, self.pixels)
        # the mean prediction per class: what share of the target images each class takes (label-free)
        summary["class_share"] = {CLASS_NAMES[c]: float(v) for c, v in enumerate(probs / max(self.pixels, 1))}
        summary["images"] = len(dataset)
        summary["checkpoint"] = checkpoint
        if figure and self.pictures:
            rows = [png_array(self.pictures[i]) for i in sorted(self.pictures)]
            figure.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.concatenate(rows, axis=0)).save(figure)
        return summary


def evaluate(cfg: Config, checkpoint: str | Path, export: str | Path | None = None,
             scales: tuple[float, ...] = (1.0,), flip: bool = False, figure: Path | None = None,
             scores: Path | None = None, prior: tuple[np.ndarray, tuple[int, ...]] | None = None) -> dict:
    """The evaluation block of a checkpoint on target val; optionally writes the overlay figure. In
    the same pass: with `scores`, every target-train image scored into that file (`score_pass`); with
    the source labels' class shares over the label space (`prior`) and `images_validated`, the model's
    label-free validators on the run's subset of target-train images ("validators", `validate_model`)."""
    cfg = with_absolute_paths(cfg)
    dataset = open_target(cfg.data.target, "val", with_labels=True)  # validated before any actor starts
    validates = prior is not None and images_validated(cfg) > 0
    train = len(open_target(cfg.data.target, "train", with_labels=False)) if scores or validates else 0
    checkpoint = str(checkpoint_file(checkpoint))
    subset, zoom = validation_subset(cfg, train) if validates else (), zoom_validated(cfg)
    rows = [*((i, VAL) for i in range(len(dataset))), *((i, TRAIN) for i in range(train if scores else 0)),
            *((p, VALIDATE) for p in range(len(subset)))]
    actors, options = pool_options(cfg, len(rows) + len(subset) * (views_per_image(zoom) - 1))  # images of work
    spec = EvalSpec(cfg, checkpoint, actors.threads_each, actors.use_gpu,
                    absolute(export) if export else None, tuple(scales), flip)  # actors have their own cwd
    validation = ValidationSpec(cfg, checkpoint, actors.threads_each, actors.use_gpu, subset, zoom) if subset else None
    sums, validated = EvaluationSums(), []
    if not (scores or validation):
        results = image_ids(range(len(dataset))).map_batches(Evaluator, fn_constructor_kwargs={"spec": spec}, **options)
        with stage_errors("evaluation"):
            for batch in results.iter_batches(batch_format="numpy", batch_size=None):
                sums.add(batch)
        return sums.summary(dataset, checkpoint, figure)
    results = image_ids(*zip(*rows)).map_batches(
        EvaluationPass, fn_constructor_kwargs={"spec": spec, "scoring": bool(scores), "validation": validation},
        **options)
    with ExitStack() as stack:
        writer = stack.enter_context(ScoresWriter(scores, train)) if scores else None
        stack.enter_context(stage_errors("evaluation" + (" and scoring" if scores else "") +
                                         (" and validation" if validation else "")))
        for batch in results.iter_batches(batch_format="numpy", batch_size=None):
            sums.add(rows_of(batch, VAL, "eval."))
            if writer:
                writer.add(rows_of(batch, TRAIN, "score."))
            if validation:
                validated.append(rows_of(batch, VALIDATE, "validate."))
    if scores:
        scores_written(scores)
    summary = sums.summary(dataset, checkpoint, figure)
    if validation:
        summary["validators"] = merged(validated).figures(*prior)
    return summary


def json_ready(summary: dict) -> dict:
    """NaN (no IoU) becomes null, as JSON has no NaN."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, float) and math.isnan(value):
            return None
        return value
    return clean(summary)


def evaluate_into(cfg: Config, checkpoint: str | Path, folder: ModelDir,
                  prior: tuple[np.ndarray, tuple[int, ...]] | None = None, scores: Path | None = None) -> dict:
    """Evaluate a checkpoint on target val; writes FOLDER/eval.json and FOLDER/overlay.png, and from
    the same pass the model's scores of the target-train images into `scores` (for a model that may
    teach the next round or that the safeguard's prior rule judges). With `validation.images` (or the
    safeguard's consistency rule) and the source's class shares over the label space (`prior`), the
    block also holds the model's label-free validators on target-train images ("validators")."""
    summary = json_ready(evaluate(cfg, checkpoint, figure=folder.overlay, scores=scores, prior=prior))
    atomic_write_json(folder.eval, summary)
    return summary
