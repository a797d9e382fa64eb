"""An online teacher inside a round (beyond the paper; `lse.online_teacher`): a moving average of the
student's weights re-draws each zoomed patch's pseudo-label as LSE draws it, while the round trains,
instead of keeping the labels of the round's patch pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sisray.labels import IGNORE


@torch.no_grad()
def relabelled(teacher: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """(N, H, W) pseudo-labels of zoomed patches (N, 3, H, W) from `teacher`: its prediction on each patch
    seen at scale 1 (shrunk by `scale`, antialiased), enlarged back (bilinear, aligned corners, the label
    transfer's geometry), argmax. Pixels the round's entropy thresholds ignored stay ignored."""
    height, width = images.shape[-2:]
    small = F.interpolate(images.float(), size=(max(1, round(height / scale)), max(1, round(width / scale))),
                          mode="bilinear", align_corners=False, antialias=True)
    was_training = teacher.training
    teacher.eval()
    probs = teacher(small).float().softmax(1)
    teacher.train(was_training)
    back = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=True)
    return torch.where(labels == IGNORE, labels, back.argmax(1))
