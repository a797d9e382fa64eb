"""Target BatchNorm statistics (`lse.target_bn`, beyond the paper): a model's BatchNorm running
means and variances re-estimated on the target-train images.

A source model normalises target features with source statistics; recomputing them on the target
(AdaBN, Li et al. 2016) is a label-free correction that costs one forward pass over the target set.
Every BatchNorm layer's statistics are reset and then set to the plain average of the batch
statistics over all target-train images (index order, batches of `train.batch_size`, no gradient;
every other layer in eval mode). A round's retraining does it in its first Ray Train worker after the
last step (sisray/stages/train_loop.py); the source model gets a Ray task (sisray/stages/target_bn.py).
"""

from __future__ import annotations

import torch

from sisray.config import Config
from sisray.errors import DatasetError, ModelError
from sisray.models.common import batchnorm_layers


@torch.no_grad()
def reestimate(model: torch.nn.Module, batches) -> int:
    """Replace every BatchNorm layer's running statistics by their average over `batches` (uint8 or
    float RGB, (N, 3, H, W)); returns the number of images seen. The model is left in eval mode."""
    layers = batchnorm_layers(model)
    if not layers:
        raise ModelError(f"lse.target_bn: {type(model).__name__} has no BatchNorm layer to re-estimate")
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the batches
        layer.train()
    seen = 0
    for images in batches:
        model(images)
        seen += len(images)
    for layer in layers:
        layer.momentum = 0.1
        layer.eval()
    return seen


def with_target_statistics(cfg: Config, model: torch.nn.Module,
                           device: torch.device) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    """The state dict (on the CPU) of `model` with BatchNorm statistics of the target-train images
    (set in place: pass a copy of a model that goes on), the number of images used, and the images
    skipped (with the target's `skip_bad_pairs`; without it an unreadable image fails)."""
    from sisray.datasets import open_target

    dataset = open_target(cfg.data.target, "train", with_labels=False)
    skipped: list[str] = []

    def batches():
        size = cfg.train.batch_size
        for start in range(0, len(dataset), size):
            images = []
            for i in range(start, min(start + size, len(dataset))):
                try:
                    images.append(dataset.load_image(i))
                except DatasetError as exc:
                    if not cfg.data.target.skip_bad_pairs:
                        raise
                    skipped.append(str(exc))
            if images:
                yield torch.stack(images).to(device)

    seen = reestimate(model, batches())
    return {k: v.cpu() for k, v in model.state_dict().items()}, seen, skipped


def report(seen: int, skipped: list[str]) -> None:
    """The driver's lines on a re-estimation."""
    for problem in skipped:
        print(f"warning: target BatchNorm statistics: skipped {problem}", flush=True)
    print(f"target BatchNorm statistics: re-estimated on {seen} target train images", flush=True)
