"""Class probabilities of a batch, optionally averaged over scales and horizontal flips."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def predict_probs(model: torch.nn.Module, images: torch.Tensor, scales: Sequence[float] = (1.0,),
                  flip: bool = False) -> torch.Tensor:
    """Softmax (N, C, H, W) at the input size: the mean over `scales` (input resized bilinearly, output
    resized back) and, with `flip`, over mirrored inputs."""
    height, width = images.shape[-2:]
    images = images.float()
    total = None
    for scale in scales:
        scaled = images if scale == 1.0 else F.interpolate(
            images, scale_factor=scale, mode="bilinear", align_corners=False)
        views = [scaled, scaled.flip(-1)] if flip else [scaled]
        for k, view in enumerate(views):
            probs = model(view).float().softmax(1)
            if k == 1:
                probs = probs.flip(-1)
            if probs.shape[-2:] != (height, width):
                probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
            total = probs if total is None else total + probs
    return total / (len(scales) * (2 if flip else 1))
