"""Class-coded scenes: images whose colour says each pixel's class, so a test can read back which
class a training image shows where, and compare it with the pseudo-label it is trained with."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sisray.labels import IGNORE, NUM_CLASSES, PALETTE


def class_coded_scene(seed: int, height: int = 32, width: int = 64, block: int = 4, zoom: int = 2):
    """A working-size label of block x block squares of random classes; the full-resolution image
    (zoom x the working size) painted in the classes' palette colours; the ideal (one-hot) prediction."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, NUM_CLASSES, (height // block, width // block), generator=g)
    label = label.repeat_interleave(block, 0).repeat_interleave(block, 1)
    full = label.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1)
    image = torch.from_numpy(np.asarray(PALETTE, np.uint8)[full.numpy()]).permute(2, 0, 1).contiguous()
    return label, image, F.one_hot(label, NUM_CLASSES).permute(2, 0, 1).float()


def decoded_classes(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) image -> (H, W) the class of the nearest palette colour."""
    palette = torch.tensor(np.asarray(PALETTE, np.float32))
    distance = ((image.permute(1, 2, 0).float()[..., None, :] - palette) ** 2).sum(-1)
    return distance.argmin(-1)


def agreement(image: torch.Tensor, label: torch.Tensor) -> float:
    """The share of labelled pixels where the image shows the label's class."""
    labelled = label != IGNORE
    return float((decoded_classes(image)[labelled] == label[labelled]).float().mean())
