"""DeepLab-v2 with a ResNet-101 backbone, as used by LSE's and most UDA works' DeepLab experiments.

Output stride 8: layer3 and layer4 keep their resolution and dilate by 2 and 4. Names (conv1, bn1,
layer1-4 with downsample.0/1, layer5.conv2d_list.K) match the lineage's checkpoints (AdaptSegNet,
LSE), so they load as they are. What the lineage's code does, and sisray with it (docs/METHOD.md):
- BatchNorm: affine parameters fixed; in training mode the layers normalise with the batch's
  statistics and update their running ones (momentum 0.1), in eval mode they use the running ones.
  `train.round_bn: frozen` keeps the running statistics during the rounds instead.
- The ASPP classifier `layer5`: the lineage's forward returns inside its loop, so its models sum only
  the dilation-6 and -12 branches (18 and 24 keep their N(0, 0.01) initialisation). How many branches
  a model sums is part of its state (`layer5.branches`): 2 for a checkpoint in the lineage's format,
  4 for a model built here.
- layer2's first bottleneck strides in its first 1x1 convolution (Caffe's ResNet), unless the model
  starts from torchvision's ImageNet weights, which were trained striding in the 3x3 (`strides_in_3x3`,
  also part of the state).
- Logits are upsampled to the input size bilinearly with aligned corners.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from sisray.models.common import LabelSpace, Recipe, caffe_input, fold_torchvision_normalisation

log = logging.getLogger(__name__)

_BLOCKS = (3, 4, 23, 3)  # ResNet-101
_ASPP_DILATIONS = (6, 12, 18, 24)
LINEAGE_BRANCHES = 2  # the dilation-6 and -12 branches: what the lineage's forward sums
_LINEAGE_INIT_PREFIX = "Scale."  # DeepLab_resnet_pretrained_init-f81d91e8.pth, the lineage's initial weights


def _fixed_affine_batchnorm(channels: int) -> nn.BatchNorm2d:
    layer = nn.BatchNorm2d(channels)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    return layer


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = _fixed_affine_batchnorm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = _fixed_affine_batchnorm(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = _fixed_affine_batchnorm(out)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                            _fixed_affine_batchnorm(out))

    def stride_in_3x3(self, yes: bool) -> None:
        stride = max(self.conv1.stride + self.conv2.stride)
        self.conv1.stride, self.conv2.stride = ((1, 1), (stride, stride)) if yes else ((stride, stride), (1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return torch.relu(h + (x if self.downsample is None else self.downsample(x)))


class ASPP(nn.Module):
    """DeepLab-v2's classifier: parallel dilated 3x3 convolutions whose scores are summed (the first
    `branches` of them)."""

    def __init__(self, inplanes: int, num_classes: int, dilations=_ASPP_DILATIONS):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(inplanes, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations)
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0, 0.01)
            nn.init.zeros_(conv.bias)
        self.register_buffer("branches", torch.tensor(len(dilations)))
        self.active = len(dilations)  # the buffer's value, read once per load, not per forward (a GPU sync)

    def use_branches(self, count: int) -> None:
        """Sum the first `count` branches; the others take no part, so they get no gradient."""
        self.branches.fill_(count)
        self.active = count
        for k, conv in enumerate(self.conv2d_list):
            conv.requires_grad_(k < count)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.conv2d_list[:self.active])


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
        self.bn1 = _fixed_affine_batchnorm(base)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.inplanes = base
        self.layer1 = self._make_layer(base, _BLOCKS[0])
        self.layer2 = self._make_layer(2 * base, _BLOCKS[1], stride=2)
        self.layer3 = self._make_layer(4 * base, _BLOCKS[2], dilation=2)
        self.layer4 = self._make_layer(8 * base, _BLOCKS[3], dilation=4)
        self.layer5 = ASPP(self.inplanes, num_classes)
        self.register_buffer("strides_in_3x3", torch.tensor(False))
        self.label_space = LabelSpace(num_classes)
        self._init_backbone()
        self.register_load_state_dict_post_hook(DeepLabV2._apply_geometry)

    def _init_backbone(self) -> None:
        # From scratch (pretrained weights replace this): He initialisation, and each residual branch's
        # last convolution at zero, so that 33 blocks start as identities.
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

    @staticmethod
    def _apply_geometry(model: "DeepLabV2", _incompatible) -> None:
        """After a state is loaded: the branch count and the stride placement it records."""
        model.layer5.use_branches(int(model.layer5.branches))
        model.layer2[0].stride_in_3x3(bool(model.strides_in_3x3))

    def complete_state(self, state: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
        """A checkpoint of the lineage (no `layer5.branches`, no label space) sums two ASPP branches; the
        lineage's initial weights (keys prefixed `Scale.`) bring no classifier for our classes; a
        checkpoint saved before these entries existed keeps sisray's four branches."""
        if any(k.startswith(_LINEAGE_INIT_PREFIX) for k in state):
            state = {k.removeprefix(_LINEAGE_INIT_PREFIX): v for k, v in state.items()}
            head = {k: v for k, v in self.state_dict().items() if k.startswith("layer5.")}
            log.warning("%s: the lineage's initial weights (keys prefixed %r): the classifier of another "
                        "task is not loaded, ours starts from N(0, 0.01)", origin, _LINEAGE_INIT_PREFIX)
            state = {**{k: v for k, v in state.items() if not k.startswith("layer5.")}, **head}
        missing = {}
        if "layer5.branches" not in state:
            lineage = "label_space.allowed" not in state
            missing["layer5.branches"] = torch.tensor(LINEAGE_BRANCHES if lineage else len(_ASPP_DILATIONS))
            if lineage:
                log.warning("%s: a DeepLab-v2 checkpoint in the lineage's format: its classifier was trained "
                            "summing only the dilation-6 and -12 ASPP branches (the lineage's forward returns "
                            "inside its loop), and so it is run here; branches 18 and 24 stay unused", origin)
        if "strides_in_3x3" not in state:
            missing["strides_in_3x3"] = torch.tensor(False)
        for key, value in self.state_dict().items():  # checkpoints saved without BatchNorm's counters
            if key.endswith("num_batches_tracked") and key not in state:
                missing[key] = torch.zeros_like(value)
        return {**state, **missing}

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.layer5.parameters())

    @staticmethod
    def torchvision_weights():
        from torchvision.models import ResNet101_Weights

        return ResNet101_Weights.IMAGENET1K_V1

    def from_torchvision(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our full state dict with torchvision's resnet101 backbone (same names, fc dropped), its
        input normalisation folded into conv1 (Caffe-style input): conv1 has no bias, so the fixed
        bn1 after it absorbs the offset. Torchvision's ResNet strides in the 3x3 convolution, and so
        does the model that takes its weights."""
        full = self.state_dict()
        full.update({k: v for k, v in state.items() if k in full and not k.startswith("fc.")})
        full["conv1.weight"], offset = fold_torchvision_normalisation(full["conv1.weight"])
        full["bn1.running_mean"] = full["bn1.running_mean"] - offset
        full["strides_in_3x3"] = torch.tensor(True)
        return full

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.maxpool(torch.relu(self.bn1(self.conv1(caffe_input(images)))))
        logits = self.layer5(self.layer4(self.layer3(self.layer2(self.layer1(h)))))
        return self.label_space(F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=True))
