"""What the models share: the Caffe-style input of the paper's models (and torchvision's weights folded
to take it), the classes a model may predict, the shape of an optimiser preset, the listing of
BatchNorm layers, and the precision they run at.

Caffe-style input (docs/METHOD.md): BGR channel order, minus the mean (104.00699, 116.66877, 122.67892), no
division by std. This is the only place that knows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

CAFFE_BGR_MEAN = (104.00699, 116.66877, 122.67892)
_IMAGENET_RGB_MEAN = (0.485, 0.456, 0.406)  # torchvision's weights expect (rgb / 255 - mean) / std
_IMAGENET_RGB_STD = (0.229, 0.224, 0.225)


def caffe_input(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB with values in [0, 255] (uint8 or float) -> BGR minus the Caffe mean, float32."""
    mean = torch.tensor(CAFFE_BGR_MEAN, dtype=torch.float32, device=images.device)[None, :, None, None]
    return images.flip(1).float() - mean


# Far below any logit, so softmax gives such a class exactly 0; finite (a sum or a product with 0 of
# these logits stays a number, not inf or NaN) and within float16's range for AMP.
EXCLUDED_LOGIT = -1.0e4


class LabelSpace(torch.nn.Module):
    """The classes a model may predict: those its training labels contain. A benchmark with 13 classes
    (or SYNTHIA, without terrain, truck and train) gives its model no example of the others, so their
    logits mean nothing; predicting one scores IoU 0 for a class the target may not even have. The
    mask is a buffer: every checkpoint keeps the label space it was trained with."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.register_buffer("allowed", torch.ones(num_classes, dtype=torch.bool))

    def restrict(self, classes: tuple[int, ...]) -> None:
        self.allowed.zero_()
        self.allowed[list(classes)] = True

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(~self.allowed[None, :, None, None], EXCLUDED_LOGIT)


def fold_torchvision_normalisation(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewrite a first convolution trained on (rgb / 255 - mean) / std to take Caffe-style input
    (bgr - caffe_mean): returns the new weight and the per-output offset to add after it."""
    std = torch.tensor(_IMAGENET_RGB_STD)[None, :, None, None]
    mean = torch.tensor(_IMAGENET_RGB_MEAN)[None, :, None, None]
    caffe_rgb = torch.tensor(CAFFE_BGR_MEAN[::-1])[None, :, None, None]
    scaled = weight / (255 * std)  # per RGB input channel
    offset = (weight * (caffe_rgb / 255 - mean) / std).sum(dim=(1, 2, 3))
    return scaled.flip(1).contiguous(), offset


def batchnorm_layers(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers, whose running statistics target BatchNorm re-estimates."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@dataclass(frozen=True)
class Recipe:
    """A model's optimiser preset: the optimiser, its base rate, and the rate multipliers of the
    head's parameters and of biases. Each model class states its own as `RECIPE`."""
    optimizer: Literal["adam", "adamw", "sgd"]
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    weight_decay: float = 0.0
    poly: bool = False  # rate x (1 - step / steps) ** 0.9 over each stage; else constant
    head_lr: float = 1.0
    bias_lr: float = 1.0


def uses_bf16(precision: str, device_type: str) -> bool:
    """`model.precision` on a device: bf16 with "bf16", or "auto" under CUDA; otherwise fp32."""
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def autocast(precision: str, device: torch.device):
    """The autocast context of `model.precision` on `device` (disabled for fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(precision, device.type))
