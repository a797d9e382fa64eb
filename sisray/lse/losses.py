"""Losses of the retraining step: per-pixel focal loss and the LSE target loss CE + beta * FL."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sisray.labels import IGNORE


def _valid_mean(per_pixel: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    valid = labels != IGNORE
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1)


def pixel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) logits, (N, H, W) labels -> (N, H, W) CE, 0 at ignored pixels."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")


def focal_from_ce(ce: torch.Tensor, gamma: float) -> torch.Tensor:
    """Focal loss per pixel from per-pixel CE: (1 - exp(-CE))^gamma * CE (p_t = exp(-CE))."""
    return (1 - torch.exp(-ce)).pow(gamma) * ce


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean per-pixel focal loss over non-ignored pixels; 0 when there are none."""
    return _valid_mean(focal_from_ce(pixel_cross_entropy(logits, labels), gamma), labels)


def lse_target_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float, gamma: float,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """CE + beta * FL on pseudo-labelled patches, both means over the same valid pixels (docs/METHOD.md step 5).
    With `weights` (N, H, W) in [0, 1] (the teacher's confidence), each pixel's term is scaled by its
    weight; the mean stays over the valid pixels, so unsure labels pull less instead of others more."""
    ce = pixel_cross_entropy(logits, labels)
    per_pixel = ce + beta * focal_from_ce(ce, gamma)
    return _valid_mean(per_pixel if weights is None else per_pixel * weights, labels)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over non-ignored pixels; 0 (not NaN) when a batch has none."""
    return _valid_mean(pixel_cross_entropy(logits, labels), labels)
