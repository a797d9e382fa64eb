"""VGG16-FCN8s, the "at-once" variant of Shelhamer et al. used by LSE's VGG experiments.

conv1_1 pads by 100 so that every input size survives the five poolings and the 7x7 fc6. The pool4
and pool3 skips are scaled before scoring by the buffer `skip_scales`: (0.01, 1e-4) for the
Caffe-converted checkpoints of the reference, whose state dicts lack that entry and get it on
loading (`complete_state`), and (1, 1) for a model initialised here (randomly or from torchvision's
ImageNet weights), whose skips would otherwise carry ~2% of the logits and leave an FCN-32s; the three upsamplings are transposed
convolutions fixed to bilinear kernels; offsets 5, 9 and 31 crop the skips and the output back into
register with the input. Parameter names follow the common PyTorch FCN8s naming (conv1_1 ... conv5_3,
fc6, fc7, score_fr, score_pool3/4, upscore2/8, upscore_pool4), so published checkpoints load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from sisray.models.common import LabelSpace, Recipe, caffe_input, fold_torchvision_normalisation

# (stage, number of 3x3 convolutions, output channels at width 1)
_VGG16_STAGES = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
_FC_CHANNELS = 4096
CAFFE_SKIP_SCALES = (0.01, 1e-4)  # pool4, pool3: what checkpoints of the at-once Caffe model were trained with


def bilinear_kernel(channels: int, size: int) -> torch.Tensor:
    """Weights of a transposed convolution that upsamples each channel bilinearly by size // 2."""
    factor = (size + 1) // 2
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    grid = torch.arange(size, dtype=torch.float32)
    profile = 1 - torch.abs(grid - centre) / factor
    weight = torch.zeros(channels, channels, size, size)
    weight[range(channels), range(channels)] = profile[:, None] * profile[None, :]
    return weight


def _fixed_upsampler(channels: int, size: int, stride: int) -> nn.ConvTranspose2d:
    layer = nn.ConvTranspose2d(channels, channels, size, stride=stride, bias=False)
    layer.weight.data.copy_(bilinear_kernel(channels, size))
    layer.weight.requires_grad_(False)  # fixed, as in the at-once reference
    return layer


class FCN8s(nn.Module):
    # The reference (docs/METHOD.md): Adam, lr 1e-6 for weights and 2e-6 for biases, betas (0.9, 0.99), constant.
    RECIPE = Recipe("adam", 1e-6, betas=(0.9, 0.99), bias_lr=2.0)

    def __init__(self, num_classes: int = 19, width: float = 1.0):
        super().__init__()
        self.width = width
        self.num_classes = num_classes
        cin = 3
        for stage, convs, channels in _VGG16_STAGES:
            cout = max(1, round(channels * width))
            for i in range(1, convs + 1):
                padding = 100 if (stage, i) == (1, 1) else 1
                setattr(self, f"conv{stage}_{i}", nn.Conv2d(cin, cout, 3, padding=padding))
                cin = cout
        fc = max(1, round(_FC_CHANNELS * width))
        self.fc6 = nn.Conv2d(cin, fc, 7)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.drop = nn.Dropout2d(0.5)
        self.score_fr = nn.Conv2d(fc, num_classes, 1)
        self.score_pool3 = nn.Conv2d(max(1, round(256 * width)), num_classes, 1)
        self.score_pool4 = nn.Conv2d(max(1, round(512 * width)), num_classes, 1)
        self.upscore2 = _fixed_upsampler(num_classes, 4, 2)
        self.upscore_pool4 = _fixed_upsampler(num_classes, 4, 2)
        self.upscore8 = _fixed_upsampler(num_classes, 16, 8)
        self.register_buffer("skip_scales", torch.ones(2))  # saved with the model: a checkpoint keeps its scaling
        self.label_space = LabelSpace(num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He initialisation keeps the activation scale through the 15 ReLU layers when training from
        # scratch (PyTorch's default shrinks it ~6x per layer); pretrained weights replace it anyway.
        for name, layer in self.named_children():
            if isinstance(layer, nn.Conv2d) and not name.startswith("score"):
                nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        # Score layers start at zero (as in the reference), so an untrained head predicts uniformly.
        for layer in (self.score_fr, self.score_pool3, self.score_pool4):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @staticmethod
    def complete_state(state: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
        """A state dict without `skip_scales` comes from the Caffe-converted reference model."""
        if "skip_scales" in state:
            return state
        return {**state, "skip_scales": torch.tensor(CAFFE_SKIP_SCALES)}

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for m in (self.score_fr, self.score_pool3, self.score_pool4) for p in m.parameters()]

    @staticmethod
    def torchvision_weights():
        from torchvision.models import VGG16_Weights

        return VGG16_Weights.IMAGENET1K_V1

    def from_torchvision(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our full state dict with torchvision's vgg16 weights renamed and reshaped (the fully
        connected layers become the fc6 7x7 and fc7 1x1 convolutions), its input normalisation folded
        into conv1_1 (Caffe-style input)."""
        full = self.state_dict()
        for key, value in state.items():
            prefix, _, kind = key.rpartition(".")
            if prefix in TORCHVISION_VGG16:
                name = f"{TORCHVISION_VGG16[prefix]}.{kind}"
                full[name] = value.reshape(full[name].shape)
        full["conv1_1.weight"], offset = fold_torchvision_normalisation(full["conv1_1.weight"])
        full["conv1_1.bias"] = full["conv1_1.bias"] + offset
        return full

    def _stage(self, x: torch.Tensor, stage: int, convs: int) -> torch.Tensor:
        for i in range(1, convs + 1):
            x = torch.relu(getattr(self, f"conv{stage}_{i}")(x))
        return nn.functional.max_pool2d(x, 2, stride=2, ceil_mode=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """RGB [0, 255] (N, 3, H, W) -> logits (N, C, H, W)."""
        height, width = images.shape[-2:]
        pools = {}
        h = caffe_input(images)
        for stage, convs, _ in _VGG16_STAGES:
            h = self._stage(h, stage, convs)
            pools[stage] = h
        h = self.drop(torch.relu(self.fc6(h)))
        h = self.drop(torch.relu(self.fc7(h)))
        up2 = self.upscore2(self.score_fr(h))  # 1/16
        skip4 = self.score_pool4(pools[4] * self.skip_scales[0])[:, :, 5:5 + up2.shape[2], 5:5 + up2.shape[3]]
        up4 = self.upscore_pool4(up2 + skip4)  # 1/8
        skip3 = self.score_pool3(pools[3] * self.skip_scales[1])[:, :, 9:9 + up4.shape[2], 9:9 + up4.shape[3]]
        out = self.upscore8(up4 + skip3)
        return self.label_space(out[:, :, 31:31 + height, 31:31 + width].contiguous())


# torchvision's vgg16 parameter prefixes -> ours, for ImageNet initialisation.
TORCHVISION_VGG16 = {
    "features.0": "conv1_1", "features.2": "conv1_2", "features.5": "conv2_1", "features.7": "conv2_2",
    "features.10": "conv3_1", "features.12": "conv3_2", "features.14": "conv3_3", "features.17": "conv4_1",
    "features.19": "conv4_2", "features.21": "conv4_3", "features.24": "conv5_1", "features.26": "conv5_2",
    "features.28": "conv5_3", "classifier.0": "fc6", "classifier.3": "fc7",
}
