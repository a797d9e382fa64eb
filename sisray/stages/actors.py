"""What the Ray Data stages share: a model-holding actor, the actor-pool options, PNG bytes."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from sisray.cluster import Actors, inference_actors
from sisray.config import Config, config_from_dict
from sisray.datasets import open_target
from sisray.labels import NUM_CLASSES
from sisray.models import build_model
from sisray.models.inference import predict_probs


@dataclass(frozen=True)
class ActorSpec:
    """What every model actor needs (picklable); stages extend it."""
    config: dict
    checkpoint: str
    threads: int
    use_gpu: bool


class ModelActor:
    """Loads the model and one target split once per actor; predicts image by image."""
    split: ClassVar[str] = "train"
    with_labels: ClassVar[bool] = False

    def __init__(self, spec: ActorSpec):
        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.cfg = config_from_dict(spec.config)
        self.device = torch.device("cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu")
        self.dataset = open_target(self.cfg.data.target, self.split, with_labels=self.with_labels)
        self.model = build_model(self.cfg.model.name, NUM_CLASSES, self.cfg.model.width, spec.checkpoint)
        self.model = self.model.to(self.device).eval()

    def probabilities(self, indices: list[int], scales=(1.0,), flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images, float softmax) at the working size. One forward per image: batched
        convolutions round differently with the batch size, and no result may depend on how
        images were grouped into batches."""
        images = torch.stack([self.dataset.load_image(i) for i in indices])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            probs = torch.cat([predict_probs(self.model, image[None].to(self.device), scales, flip)
                               for image in images])
        return images, probs.float()


def pool_options(cfg: Config, items: int) -> tuple[Actors, dict]:
    """The actor sizing and the `map_batches` arguments of a pool over `items` inputs."""
    import ray

    actors = inference_actors(cfg, items)
    options = dict(compute=ray.data.ActorPoolStrategy(size=actors.count), batch_size=actors.batch_size,
                   **actors.resources)
    return actors, options


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_array(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)
