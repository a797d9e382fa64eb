"""Evaluation on target val, sharded over Ray Data actors.

Each actor loads the model once, predicts at the working size, upsamples the probabilities to the
label resolution before the argmax (docs/METHOD.md), and returns one 19x19 confusion matrix per batch;
the driver sums them, which equals a single pass. Optionally each prediction is exported as a
Cityscapes label-ID PNG for the official evaluator.
"""

from __future__ import annotations

import math
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
        indices = [int(i) for i in batch["id"]]
        images, probs = self.probabilities(indices, self.spec.scales, self.spec.flip)
        counts, overlays = [], []
        entropy = pixel_entropy(probs).sum(dim=(1, 2)).cpu().numpy()  # at the working size: no label involved
        probs_sum = probs.sum(dim=(2, 3)).cpu().numpy()
        for k, index in enumerate(indices):
            label = self.dataset.load_label(index, native=True)
            full = F.interpolate(probs[k:k + 1], size=label.shape, mode="bilinear", align_corners=False)
            prediction = full.argmax(1)[0].cpu()
            matrix = ConfusionMatrix()
            matrix.update(prediction, label)
            counts.append(matrix.counts)
            if self.spec.export:
                export_prediction(self.spec.export, self.dataset.samples[index].id, prediction.numpy().astype(np.uint8))
            overlays.append(png_bytes(overlay(images[k], prediction.numpy(), label.numpy())) if index < OVERLAYS else b"")
        return {"id": batch["id"], "counts": np.stack(counts), "overlay": np.array(overlays, dtype=object),
                "entropy": entropy.astype(np.float64), "probs": probs_sum.astype(np.float64),
                "pixels": np.full(len(indices), probs.shape[2] * probs.shape[3], np.int64)}


def evaluate(cfg: Config, checkpoint: str | Path, export: str | Path | None = None,
             scales: tuple[float, ...] = (1.0,), flip: bool = False, figure: Path | None = None) -> dict:
    """The evaluation block of a checkpoint on target val; optionally writes the overlay figure."""
    cfg = with_absolute_paths(cfg)
    dataset = open_target(cfg.data.target, "val", with_labels=True)  # validated before any actor starts
    checkpoint = str(checkpoint_file(checkpoint))
    actors, options = pool_options(cfg, len(dataset))
    spec = EvalSpec(cfg, checkpoint, actors.threads_each, actors.use_gpu,
                    absolute(export) if export else None, tuple(scales), flip)  # actors have their own cwd
    results = image_ids(range(len(dataset))).map_batches(Evaluator, fn_constructor_kwargs={"spec": spec}, **options)
    total = ConfusionMatrix()
    pictures = {}
    entropy, probs, pixels = 0.0, np.zeros(NUM_CLASSES), 0
    with stage_errors("evaluation"):
        for batch in results.iter_batches(batch_format="numpy", batch_size=None):
            total.counts += batch["counts"].sum(axis=0)
            pictures.update({int(i): png for i, png in zip(batch["id"], batch["overlay"]) if png})
            entropy += float(batch["entropy"].sum())
            probs += batch["probs"].sum(axis=0)
            pixels += int(batch["pixels"].sum())
    summary = total.summary(dataset.eval_classes)
    summary["label_free"] = label_free(entropy, probs, pixels)
    # the mean prediction per class: what share of the target images each class takes (label-free)
    summary["class_share"] = {CLASS_NAMES[c]: float(v) for c, v in enumerate(probs / max(pixels, 1))}
    summary["images"] = len(dataset)
    summary["checkpoint"] = checkpoint
    if figure and pictures:
        rows = [png_array(pictures[i]) for i in sorted(pictures)]
        figure.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(rows, axis=0)).save(figure)
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
                  prior: tuple[np.ndarray, tuple[int, ...]] | None = None) -> dict:
    """Evaluate a checkpoint on target val; writes FOLDER/eval.json and FOLDER/overlay.png. With
    `validation.images` and the source's class shares over the label space (`prior`), the block also
    holds the model's label-free validators on target-train images ("validators")."""
    from sisray.stages.validation import validate_model

    summary = evaluate(cfg, checkpoint, figure=folder.overlay)
    if cfg.validation.images and prior is not None:
        summary["validators"] = validate_model(cfg, checkpoint, *prior)
    summary = json_ready(summary)
    atomic_write_json(folder.eval, summary)
    return summary
