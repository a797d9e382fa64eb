"""The validation pass (Ray Data): a model's label-free validators (sisray/validators.py) over a seeded
subset of the target-train images, the images a user has without labels. Per image: the softmax, its
mirror's, LSE's zoomed views of the four corner tiles, and a ClassMix of the image with the next image
of the subset under their predicted classes; every draw is a function of (seed, image), so no figure
depends on how images were batched or which actor ran them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sisray.augment import class_mix
from sisray.cluster import stage_errors
from sisray.config import Config, with_absolute_paths
from sisray.datasets import open_target
from sisray.labels import NUM_CLASSES
from sisray.lse.patches import Box, crop_and_scale
from sisray.models import checkpoint_file
from sisray.stages.actors import ActorSpec, ModelActor, image_ids, pool_options
from sisray.validators import ValidationSums, agreement, sample_pixels

SAMPLED_PIXELS = 64  # per image, for BNM and SND: 64 images give a 4096-row matrix


@dataclass(frozen=True)
class ValidationSpec(ActorSpec):
    subset: tuple[int, ...] = ()  # the target-train images validated, in order (the mix partner is the next)
    zoom: bool = True  # the four zoomed corner tiles (scale agreement): 4 of the 7 forward passes per image


SAFEGUARD_IMAGES = 64  # what the safeguard's consistency rule validates each model on when validation.images is 0


def images_validated(cfg: Config) -> int:
    """How many target-train images each evaluated model's validators read: validation.images, or when
    it is 0 and the safeguard judges by consistency (which reads them), SAFEGUARD_IMAGES; 0: none."""
    if cfg.validation.images or not (cfg.lse.safeguard and cfg.lse.safeguard_rule == "consistency"):
        return cfg.validation.images
    return SAFEGUARD_IMAGES


def zoom_validated(cfg: Config) -> bool:
    """Whether the pass zooms (scale agreement, 4 of its 7 forward passes per image): when the user
    asked for every validator (validation.images), not for the safeguard alone, whose consistency rule
    reads flips and the ClassMix probe only."""
    return cfg.validation.images > 0


def validation_subset(cfg: Config, images: int) -> tuple[int, ...]:
    """The seeded subset of `images` target-train images every model of a run (and every trial of a
    sweep with the same seed) is validated on."""
    count = min(images_validated(cfg), images)
    order = torch.randperm(images, generator=torch.Generator().manual_seed(cfg.seed * 7_919 + 17))
    return tuple(sorted(order[:count].tolist()))


def corner_tiles(scale: float) -> list[Box]:
    """LSE's zoom (a 1/scale crop enlarged by scale) at the four corners of the image."""
    side = 1 / scale
    return [Box(top, left, side, side, scale) for top in (0.0, 1 - side) for left in (0.0, 1 - side)]


class Validator(ModelActor):
    """{"id": positions in the subset} -> per image: "entropy", "probs" (C,), "pixels", "samples"
    (k, C), and [same, compared] pixel counts "flip", "scale", "mix"."""

    def __call__(self, batch: dict) -> dict:
        return self.rows([int(p) for p in batch["id"]])

    @staticmethod
    def blank(n: int) -> dict:
        """n rows that add nothing to the sums."""
        return {"id": np.zeros(n, np.int64), "entropy": np.zeros(n), "probs": np.zeros((n, NUM_CLASSES)),
                "pixels": np.zeros(n, np.int64), "samples": np.zeros((n, SAMPLED_PIXELS, NUM_CLASSES), np.float32),
                **{key: np.zeros((n, 2), np.int64) for key in ("flip", "scale", "mix")}}

    def rows(self, positions: list[int]) -> dict:
        """The sums of the subset's images at `positions`, each with the next image as its mix partner
        (whose prediction is its own row's when the partner is in the batch: 3 forward passes per image,
        not 4)."""
        subset, out = self.spec.subset, self.blank(len(positions))
        out["id"][:] = positions
        views, draws = {}, {}  # position -> (image, predicted classes); its generator, past the pixels' draws
        for k, position in enumerate(positions):
            sums, views[position], draws[position] = self.validate_alone(subset[position])
            out["entropy"][k], out["probs"][k], out["pixels"][k] = sums.entropy, sums.probs, sums.pixels
            out["samples"][k] = sums.samples[subset[position]]
            out["flip"][k], out["scale"][k] = sums.flip, sums.scale
        for k, position in enumerate(positions):
            partner = (position + 1) % len(subset)
            if partner not in views:
                image = self.dataset.load_image(subset[partner])
                views[partner] = (image, self.predict(image[None])[0].argmax(0))
            out["mix"][k] = self.mix_agreement(views[position], views[partner], draws[position])
        return out

    def validate_alone(self, index: int) -> tuple[ValidationSums, tuple[torch.Tensor, torch.Tensor], torch.Generator]:
        """Image `index`'s sums but the ClassMix probe's, (the image, its predicted classes), and the
        image's generator for its ClassMix. Its draws (the sampled pixels, then the mix) are seeded by
        (seed, image): the same in any batch."""
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + index)
        image = self.dataset.load_image(index)
        probs = self.predict(image[None])
        prediction = probs[0].argmax(0)
        sums = ValidationSums(NUM_CLASSES)
        sums.add_probabilities(probs)
        sums.samples[index] = sample_pixels(probs[0], SAMPLED_PIXELS, generator)
        mirrored = self.predict(image.flip(-1)[None])[0].flip(-1).argmax(0)
        sums.flip = list(agreement(prediction, mirrored))
        if self.spec.zoom:
            sums.scale = self.zoom_agreement(image, prediction)
        return sums, (image, prediction), generator

    def mix_agreement(self, view: tuple[torch.Tensor, torch.Tensor], partner: tuple[torch.Tensor, torch.Tensor],
                      generator: torch.Generator) -> list[int]:
        """[same, compared]: half of the partner's predicted classes pasted onto the image (`view`), the
        model's classes on the mix against the mixed predicted classes."""
        (image, prediction), (other, other_prediction) = view, partner
        mixed_image, mixed_label = class_mix((other[None].float(), other_prediction[None].cpu()),
                                             (image[None].float(), prediction[None].cpu()), generator)
        return list(agreement(self.predict(mixed_image.round().to(torch.uint8)).argmax(1).cpu(), mixed_label))

    def zoom_agreement(self, image: torch.Tensor, prediction: torch.Tensor) -> list[int]:
        """[same, compared] over the corner tiles: the class of each tile pixel at scale 1 against
        the class the zoomed tile gives it (its softmax shrunk back onto the tile)."""
        height, width = image.shape[-2:]
        same = compared = 0
        for box in corner_tiles(self.cfg.lse.scale):
            zoomed = crop_and_scale(image.float(), box, (height, width)).round().clamp(0, 255).to(torch.uint8)
            top, left, h, w = box.pixels(height, width)
            back = F.interpolate(self.predict(zoomed[None]), size=(h, w), mode="bilinear", align_corners=True,
                                 antialias=True)[0].argmax(0)
            agree, count = agreement(prediction[top:top + h, left:left + w], back)
            same, compared = same + agree, compared + count
        return [same, compared]


def batch_sums(batch: dict[str, np.ndarray]) -> ValidationSums:
    """The sums of a batch of `Validator` rows."""
    return ValidationSums(NUM_CLASSES, int(batch["pixels"].sum()), float(batch["entropy"].sum()),
                          batch["probs"].sum(axis=0), dict(zip(batch["id"].tolist(), batch["samples"])),
                          batch["flip"].sum(axis=0).tolist(),
                          batch["scale"].sum(axis=0).tolist(), batch["mix"].sum(axis=0).tolist())


def merged(batches: list[dict[str, np.ndarray]]) -> ValidationSums:
    """The sums of a pass's `Validator` batches, added up in image order whatever order Ray Data
    returned them in (float sums move in the last bits with the order: the same run gives the same
    figures)."""
    total = ValidationSums(NUM_CLASSES)
    for batch in sorted((b for b in batches if len(b["id"])), key=lambda b: int(b["id"].min())):
        total.merge(batch_sums(batch))
    return total


def views_per_image(zoom: bool) -> int:
    """Forward passes per validated image: the image, its mirror, the mix (+ 4 tiles); the mix partner's
    prediction is its own row's (one more per batch whose last partner is in another batch)."""
    return 7 if zoom else 3


def validate_model(cfg: Config, checkpoint: str | Path, source_share: np.ndarray,
                   label_space: tuple[int, ...]) -> dict[str, float]:
    """Every validator of `checkpoint` on the run's validation subset of target-train images, in a pass
    of its own (an evaluation computes them in its pass: `stages/evaluate.evaluate`); scale agreement
    NaN when the pass does not zoom."""
    cfg = with_absolute_paths(cfg)
    subset = validation_subset(cfg, len(open_target(cfg.data.target, "train", with_labels=False)))
    actors, options = pool_options(cfg, len(subset))
    spec = ValidationSpec(cfg, str(checkpoint_file(checkpoint)), actors.threads_each, actors.use_gpu, subset,
                          zoom_validated(cfg))
    results = image_ids(range(len(subset))).map_batches(Validator, fn_constructor_kwargs={"spec": spec}, **options)
    with stage_errors("validation"):
        batches = list(results.iter_batches(batch_format="numpy", batch_size=None))
    return merged(batches).figures(source_share, label_space)
