"""Photometric augmentation of labelled batches: colour jitter and Gaussian blur, per image.

A source-only model learns the source's exact colours; jittering them (and softening its hard
rendered edges) makes it lean on shape and context, which carry over to the target. The labels do
not change: nothing moves. The strengths are DACS / DAFormer's augmentation strengths.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import functional as TF

JITTER = 0.2  # brightness, contrast and saturation factors drawn from [0.8, 1.2]
HUE = 0.05  # hue shift drawn from [-0.05, 0.05] of the colour wheel
BLUR_CHANCE = 0.5
BLUR_SIGMA = (0.15, 1.15)  # pixels


def photometric(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N, 3, H, W) RGB [0, 255] -> float32 [0, 255]: each image with its own draws from `generator`
    (a CPU generator; the images may be on any device)."""
    out = []
    for image in images.float() / 255:
        draws = torch.rand(6, generator=generator).tolist()
        image = TF.adjust_brightness(image, 1 + JITTER * (2 * draws[0] - 1))
        image = TF.adjust_contrast(image, 1 + JITTER * (2 * draws[1] - 1))
        image = TF.adjust_saturation(image, 1 + JITTER * (2 * draws[2] - 1))
        image = TF.adjust_hue(image, HUE * (2 * draws[3] - 1))
        if draws[4] < BLUR_CHANCE:
            sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * draws[5]
            size = 2 * math.ceil(3 * sigma) + 1
            image = TF.gaussian_blur(image, [size, size], [sigma, sigma])
        out.append(image)
    return torch.stack(out).clamp(0, 1) * 255
