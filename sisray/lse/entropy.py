"""Pixel entropy of softmax maps and its normalisation per image and predicted class."""

from __future__ import annotations

import torch

EPS = 1e-12


def pixel_entropy(probs: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) softmax -> (N, H, W) entropy, natural log: -sum_k p_k log(p_k + 1e-12)."""
    return -(probs * torch.log(probs + EPS)).sum(dim=1)


def normalise_per_class(entropy: torch.Tensor, prediction: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Min-max normalise entropy to [0, 1] within each (image, predicted class) group.

    A group whose pixels all have the same entropy becomes 0 (never NaN).
    """
    n = entropy.shape[0]
    group = (torch.arange(n, device=entropy.device)[:, None, None] * num_classes + prediction).reshape(-1)
    flat = entropy.reshape(-1).float()
    size = n * num_classes
    low = torch.full((size,), float("inf"), device=flat.device).scatter_reduce(0, group, flat, "amin")
    high = torch.full((size,), float("-inf"), device=flat.device).scatter_reduce(0, group, flat, "amax")
    span = (high - low)[group]
    normalised = torch.where(span > 0, (flat - low[group]) / span.clamp(min=torch.finfo(flat.dtype).tiny), 0.0)
    return normalised.clamp(0, 1).reshape(entropy.shape)
