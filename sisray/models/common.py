"""The input convention shared by every model: RGB in [0, 255] in, Caffe-style input to the network.

METHOD.md: BGR channel order, minus the mean (104.00699, 116.66877, 122.67892), no division by std.
This is the only place that knows it.
"""

from __future__ import annotations

import torch

CAFFE_BGR_MEAN = (104.00699, 116.66877, 122.67892)


def caffe_input(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB with values in [0, 255] (uint8 or float) -> BGR minus the Caffe mean, float32."""
    mean = torch.tensor(CAFFE_BGR_MEAN, dtype=torch.float32, device=images.device)[None, :, None, None]
    return images.flip(1).float() - mean
