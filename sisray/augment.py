"""Augmentation of training batches, beyond the paper.

- `photometric`: colour jitter and Gaussian blur, per image. A source-only model learns the source's
  exact colours; jittering them (and softening its hard rendered edges) makes it lean on shape and
  context, which carry over to the target. The labels do not change: nothing moves. The strengths
  are DACS / DAFormer's augmentation strengths.
- `class_colours`: each class of a labelled image recoloured on its own (its brightness, saturation
  and hue), drawn per image and class. A synthetic source paints each material in one colour, a real
  target in others (grass that is olive, not green; grey fences, not brown); a global jitter keeps
  the classes' colours apart as the game drew them, this one teaches that a class's colour varies.
- `class_mix`: DACS's ClassMix (Tranheden et al. 2021). Half of the classes of a labelled source
  image are pasted onto a pseudo-labelled target patch, with their true labels: the student sees
  source objects in target context, and target pixels beside exact source labels.
- `fourier_style`: FDA (Yang & Soatto 2020). A labelled source image takes the lowest frequencies of
  a target image's amplitude spectrum and keeps its own phase: the target's colour cast, brightness
  and haze over the source's shapes and labels. In the rounds the BatchNorm statistics are the
  target's (`train.round_bn: frozen`), and source batches in the target's look match them.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import functional as TF

from sisray.labels import IGNORE

JITTER = 0.2  # brightness, contrast and saturation factors drawn from [0.8, 1.2]
HUE = 0.05  # hue shift drawn from [-0.05, 0.05] of the colour wheel
BLUR_CHANCE = 0.5
BLUR_SIGMA = (0.15, 1.15)  # pixels
CLASS_CHANCE = 0.5  # share of an image's classes recoloured; the others keep the colour drawn
CLASS_JITTER = 0.4  # brightness and saturation factors drawn from [0.6, 1.4], per class
CLASS_HUE = 0.1  # hue shift drawn from [-0.1, 0.1] of the colour wheel, per class
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])  # row 0: luma
_RGB = torch.linalg.inv(_YIQ)


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


def class_colours(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N, 3, H, W) RGB [0, 255] and their (N, H, W) labels -> float32 [0, 255]: in each image, each
    labelled class with chance CLASS_CHANCE gets its own brightness and saturation factors and hue
    turn, drawn from `generator` (a CPU generator) in the order of the class IDs; the other pixels,
    ignored ones included, keep theirs. One pass per image: the draws are looked up per pixel by label;
    the hue turns the chroma plane of YIQ."""
    out = []
    for image, label in zip(images.float() / 255, labels):
        table = torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(IGNORE + 1, 1)  # brightness, saturation, turn, drawn
        present = label.unique()
        for c in present[present != IGNORE].tolist():
            draws = torch.rand(4, generator=generator)
            if draws[0] < CLASS_CHANCE:
                table[c] = torch.cat([1 + CLASS_JITTER * (2 * draws[1:3] - 1), CLASS_HUE * (2 * draws[3:] - 1),
                                      torch.ones(1)])
        brightness, saturation, turn, drawn = table.to(image.device)[label.long()].permute(2, 0, 1)
        yiq, rgb = _YIQ.to(image.device), _RGB.to(image.device)
        recoloured = (image * brightness).clamp(0, 1)
        grey = (yiq[:1] @ recoloured.flatten(1)).view_as(brightness)
        recoloured = (grey + saturation * (recoloured - grey)).clamp(0, 1)
        y, i_, q = (yiq @ recoloured.flatten(1)).view(3, *brightness.shape)
        cos, sin = torch.cos(2 * math.pi * turn), torch.sin(2 * math.pi * turn)
        recoloured = (rgb @ torch.stack([y, i_ * cos - q * sin, i_ * sin + q * cos]).flatten(1)).view_as(image)
        out.append(torch.where(drawn.bool(), recoloured, image))
    return torch.stack(out).clamp(0, 1) * 255


def class_mix(source: tuple[torch.Tensor, torch.Tensor], target: tuple[torch.Tensor, ...],
              generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Target batch (images (N, 3, h, w), labels (N, h, w)[, weights (N, h, w)]) with, on image i, the
    pixels of ceil(n/2) of the n classes of source label i, drawn from `generator`: the source image
    and label there (weight 1). Sources larger than the target are cropped at a drawn offset, smaller
    ones resized. Ignored source pixels (255) are never pasted."""
    images, labels = _source_at(source[0].float(), source[1], target[1].shape[-2:], generator)
    pasted = torch.zeros_like(labels, dtype=torch.bool)
    for i, label in enumerate(labels):
        present = label.unique()
        present = present[present != IGNORE]
        chosen = present[torch.randperm(len(present), generator=generator)[:(len(present) + 1) // 2]]
        pasted[i] = torch.isin(label, chosen)
    mixed = [torch.where(pasted[:, None], images, target[0].float()), torch.where(pasted, labels, target[1])]
    if len(target) > 2:
        mixed.append(torch.where(pasted, torch.ones_like(target[2]), target[2]))
    return tuple(mixed)


def _source_at(images: torch.Tensor, labels: torch.Tensor, size: torch.Size,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Source images and labels at the target's (h, w): a drawn crop, or a resize where smaller."""
    (h, w), (sh, sw) = size, labels.shape[-2:]
    if sh < h or sw < w:
        return (torch.nn.functional.interpolate(images, size=(h, w), mode="bilinear", align_corners=False),
                torch.nn.functional.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long())
    top = int(torch.randint(sh - h + 1, (1,), generator=generator))
    left = int(torch.randint(sw - w + 1, (1,), generator=generator))
    return images[..., top:top + h, left:left + w], labels[..., top:top + h, left:left + w]


def fourier_style(images: torch.Tensor, styles: torch.Tensor, beta: float) -> torch.Tensor:
    """(N, 3, H, W) images [0, 255] -> float32: image i with the amplitude spectrum of style
    i mod M (resized to H x W) at the frequencies below b = max(1, floor(beta * min(H, W))) cycles
    per image on both axes (FDA's square; b = 1 swaps the mean colour only), its phase kept."""
    images = images.float()
    h, w = images.shape[-2:]
    styles = torch.nn.functional.interpolate(styles.float(), size=(h, w), mode="bilinear", align_corners=False,
                                             antialias=True)
    styles = styles[torch.arange(len(images)) % len(styles)]
    band = max(1, math.floor(beta * min(h, w)))
    low = ((torch.fft.fftfreq(h, 1 / h).abs() < band)[:, None]
           & (torch.fft.fftfreq(w, 1 / w).abs() < band)[None, :]).to(images.device)
    spectrum, style_spectrum = torch.fft.fft2(images), torch.fft.fft2(styles)
    amplitude = torch.where(low, style_spectrum.abs(), spectrum.abs())
    styled = torch.fft.ifft2(torch.polar(amplitude, spectrum.angle())).real
    return styled.clamp(0, 255)
