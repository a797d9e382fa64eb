"""DeepLab-v2 as the LSE lineage (AdaptSegNet, LSE) builds and runs it, written here from its published
structure for the tests: what sisray must reproduce when it loads such a checkpoint.

- ResNet-101 bottlenecks striding in their first 1x1 convolution, layer3/layer4 dilated by 2 and 4,
  plain BatchNorm layers (their affine parameters excluded from training);
- the ASPP classifier's forward returns after adding the second branch: only dilations 6 and 12 count;
- logits upsampled to the input size, bilinear with aligned corners; Caffe-style input (BGR minus mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CAFFE_BGR_MEAN = (104.00699, 116.66877, 122.67892)


def _bn(channels: int) -> nn.BatchNorm2d:
    layer = nn.BatchNorm2d(channels)
    for p in layer.parameters():
        p.requires_grad = False
    return layer


class LineageBlock(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int, dilation: int, project: bool):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, stride, bias=False), _bn(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = _bn(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, 4 * mid, 1, bias=False), _bn(4 * mid)
        self.downsample = nn.Sequential(nn.Conv2d(cin, 4 * mid, 1, stride, bias=False), _bn(4 * mid)) if project else None

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class LineageClassifier(nn.Module):
    def __init__(self, cin: int, classes: int):
        super().__init__()
        self.conv2d_list = nn.ModuleList(nn.Conv2d(cin, classes, 3, padding=d, dilation=d) for d in (6, 12, 18, 24))
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0, 0.01)

    def forward(self, x):
        out = self.conv2d_list[0](x)
        return out + self.conv2d_list[1](x)  # the lineage's loop returns on its first pass


class LineageDeepLab(nn.Module):
    def __init__(self, classes: int = 19, base: int = 64):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, base, 7, 2, 3, bias=False), _bn(base)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        cin = base
        layers = []
        for mid, blocks, stride, dilation in ((base, 3, 1, 1), (2 * base, 4, 2, 1), (4 * base, 23, 1, 2),
                                              (8 * base, 3, 1, 4)):
            stage = [LineageBlock(cin, mid, stride, dilation, project=True)]
            stage += [LineageBlock(4 * mid, mid, 1, dilation, project=False) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
            cin = 4 * mid
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.layer5 = LineageClassifier(cin, classes)

    def forward(self, rgb):
        x = rgb.flip(1).float() - torch.tensor(CAFFE_BGR_MEAN)[None, :, None, None]
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer5(self.layer4(self.layer3(self.layer2(self.layer1(x)))))
        return F.interpolate(x, size=rgb.shape[-2:], mode="bilinear", align_corners=True)


def trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics of a trained network's scale, branches 6 and 12 of the
    classifier trained (large), 18 and 24 at their N(0, 0.01) start."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d) and not name.startswith("layer5"):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
        for conv in model.layer5.conv2d_list[:2]:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 3 / fan_in ** 0.5)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator))
    return model.eval()
