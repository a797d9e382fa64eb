"""What the Ray Data stages share: a model-holding actor, the actor-pool options and the Arrow table
of a batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch

from sisray.cluster import Actors, inference_actors
from sisray.config import Config
from sisray.datasets import open_target
from sisray.errors import DatasetError
from sisray.labels import NUM_CLASSES
from sisray.models import build_model
from sisray.models.common import autocast
from sisray.models.inference import predict_probs


@dataclass(frozen=True)
class ActorSpec:
    """What every model actor needs, decided on the driver (a typed config with absolute paths);
    stages extend it."""
    config: Config
    checkpoint: str
    threads: int
    use_gpu: bool


class ModelActor:
    """Loads the model and one target split once per actor; predicts image by image."""
    split: ClassVar[str] = "train"
    with_labels: ClassVar[bool] = False

    def __init__(self, spec: ActorSpec, model: torch.nn.Module | None = None):
        """`model`: another actor's, on this actor's device (two jobs of one pass share it)."""
        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.cfg = spec.config
        self.device = torch.device("cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu")
        self.dataset = open_target(self.cfg.data.target, self.split, with_labels=self.with_labels)
        if model is None:
            model = build_model(self.cfg.model.name, NUM_CLASSES, self.cfg.model.width, spec.checkpoint)
        self.model = model.to(self.device).eval()

    def load_images(self, indices: list[int]) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
        """uint8 images at the working size by index. With the target's `skip_bad_pairs`, an image
        that cannot be decoded is left out and its error returned; otherwise it fails the stage."""
        images, errors = {}, {}
        for i in indices:
            try:
                images[i] = self.dataset.load_image(i)
            except DatasetError as exc:
                if not self.cfg.data.target.skip_bad_pairs:
                    raise
                errors[i] = str(exc)
        return images, errors

    def predict(self, images: list[torch.Tensor] | torch.Tensor, scales=(1.0,), flip: bool = False) -> torch.Tensor:
        """Float softmax at the input size. One forward per image: batched convolutions round
        differently with the batch size, and no result may depend on how images were batched."""
        with autocast(self.cfg.model.precision, self.device):  # the softmax itself is fp32 (predict_probs)
            probs = torch.cat([predict_probs(self.model, image[None].to(self.device), scales, flip)
                               for image in images])
        return probs.float()

    def teacher_views(self) -> tuple[tuple[float, ...], bool]:
        """(scales, flip) of the softmax that scores and pseudo-labels: the plain prediction, or with
        `lse.fused_teacher` the mean over a zoom-out (1/scale), the image, LSE's zoomed view (scale)
        and their mirrors."""
        scale = self.cfg.lse.scale
        return ((1 / scale, 1.0, scale), True) if self.cfg.lse.fused_teacher else ((1.0,), False)

    def teacher(self, images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        return self.predict(images, *self.teacher_views())

    def teacher_probabilities(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images, the teacher's softmax) at the working size."""
        return self.probabilities(indices, *self.teacher_views())

    def probabilities(self, indices: list[int], scales=(1.0,), flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images, float softmax) at the working size."""
        images = torch.stack([self.dataset.load_image(i) for i in indices])
        return images, self.predict(images, scales, flip)


def image_ids(ids: Sequence[int], splits: Sequence[int] | None = None):
    """A pass's input, the indices of its images (and the split of each, when a pass reads two),
    made on the driver. (`ray.data.range` reads them in tasks of one whole CPU each: on a cluster
    whose CPUs the actor pools of this and other jobs hold, such a task never runs, and two jobs side
    by side on 2 CPUs waited for each other for ever.)"""
    import ray

    if splits is None:
        return ray.data.from_items([{"id": int(i)} for i in ids])
    return ray.data.from_items([{"id": int(i), "split": int(s)} for i, s in zip(ids, splits)])


def pool_options(cfg: Config, items: int, work_each: int = 1) -> tuple[Actors, dict]:
    """The actor sizing and the `map_batches` arguments of a pool over `items` inputs, each about
    `work_each` images of work (`cluster.inference_actors`)."""
    import ray

    actors = inference_actors(cfg, items, work_each)
    options = dict(compute=ray.data.ActorPoolStrategy(size=actors.count), batch_size=actors.batch_size,
                   **actors.resources)
    return actors, options


def arrow_table(batch: dict[str, np.ndarray]) -> pa.Table:
    """A numpy batch as a plain Arrow table (2-D columns as lists), readable without Ray."""
    return pa.table({k: pa.array(v.tolist() if v.ndim > 1 or v.dtype == object else v) for k, v in batch.items()})
