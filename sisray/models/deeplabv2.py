"""DeepLab-v2 with a ResNet-101 backbone, as used by LSE's and most UDA works' DeepLab experiments.

Output stride 8: layer3 and layer4 keep their resolution and dilate by 2 and 4. BatchNorm is frozen
(affine parameters and statistics), as with batch 1 in the reference. The ASPP classifier `layer5`
sums all four branches (dilations 6/12/18/24) — the reference code returned after two. Names
(conv1, bn1, layer1-4 with downsample.0/1, layer5.conv2d_list.K) match the common PyTorch DeepLab-v2
checkpoints of UDA work; like them, each bottleneck strides in its first 1x1 convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sisray.models.common import LabelSpace, Recipe, caffe_input, fold_torchvision_normalisation

_BLOCKS = (3, 4, 23, 3)  # ResNet-101
_ASPP_DILATIONS = (6, 12, 18, 24)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed affine parameters and statistics (buffers named as nn.BatchNorm2d's)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(out)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                            FrozenBatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return torch.relu(h + (x if self.downsample is None else self.downsample(x)))


class ASPP(nn.Module):
    """DeepLab-v2's classifier: parallel dilated 3x3 convolutions whose scores are summed."""

    def __init__(self, inplanes: int, num_classes: int, dilations=_ASPP_DILATIONS):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(inplanes, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations)
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.conv2d_list)


class DeepLabV2(nn.Module):
    """RGB [0, 255] (N, 3, H, W) -> logits (N, C, H, W): scored at 1/8, upsampled bilinearly."""

    # docs/METHOD.md: SGD momentum 0.9, weight decay 5e-4, the classifier at 10x, poly 0.9 (base 2.5e-4).
    RECIPE = Recipe("sgd", 2.5e-4, momentum=0.9, weight_decay=5e-4, poly=True, head_lr=10.0)

    def __init__(self, num_classes: int = 19, width: float = 1.0):
        super().__init__()
        self.width = width
        self.num_classes = num_classes
        base = max(1, round(64 * width))
        self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(base)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.inplanes = base
        self.layer1 = self._make_layer(base, _BLOCKS[0])
        self.layer2 = self._make_layer(2 * base, _BLOCKS[1], stride=2)
        self.layer3 = self._make_layer(4 * base, _BLOCKS[2], dilation=2)
        self.layer4 = self._make_layer(8 * base, _BLOCKS[3], dilation=4)
        self.layer5 = ASPP(self.inplanes, num_classes)
        self.label_space = LabelSpace(num_classes)
        self._init_backbone()

    def _init_backbone(self) -> None:
        # From scratch (pretrained weights replace this): He initialisation, and each residual branch's
        # last convolution at zero, so that 33 blocks without trainable normalisation start as identities.
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d) and not name.startswith("layer5"):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        for module in self.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.conv3.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self.inplanes, planes, stride, dilation)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes, dilation=dilation) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.layer5.parameters())

    @staticmethod
    def torchvision_weights():
        from torchvision.models import ResNet101_Weights

        return ResNet101_Weights.IMAGENET1K_V1

    def from_torchvision(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our full state dict with torchvision's resnet101 backbone (same names, fc dropped), its
        input normalisation folded into conv1 (Caffe-style input): conv1 has no bias, so the frozen
        bn1 after it absorbs the offset."""
        full = self.state_dict()
        full.update({k: v for k, v in state.items() if k in full and not k.startswith("fc.")})
        full["conv1.weight"], offset = fold_torchvision_normalisation(full["conv1.weight"])
        full["bn1.running_mean"] = full["bn1.running_mean"] - offset
        return full

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.maxpool(torch.relu(self.bn1(self.conv1(caffe_input(images)))))
        logits = self.layer5(self.layer4(self.layer3(self.layer2(self.layer1(h)))))
        return self.label_space(F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False))
