"""The online teacher (lse.online_teacher) re-draws a zoomed patch's pseudo-label as LSE draws it."""

from __future__ import annotations

import pytest
import torch

from sisray.config import load_config
from sisray.errors import ConfigError
from sisray.labels import IGNORE
from sisray.lse.online import relabelled


class RedIsOne(torch.nn.Module):
    """Class 1 where the red channel is bright, class 2 elsewhere; remembers the input size."""

    def forward(self, images):
        self.seen = tuple(images.shape[-2:])
        red = (images[:, 0] > 128).float()
        logits = torch.zeros(images.shape[0], 19, *images.shape[-2:])
        logits[:, 1], logits[:, 2] = 10 * red, 10 * (1 - red)
        return logits


def test_the_teacher_sees_the_patch_at_scale_one_and_keeps_the_ignored_pixels():
    images = torch.zeros(2, 3, 16, 32)
    images[:, 0, :, :12] = 255  # red on the left
    labels = torch.full((2, 16, 32), 7)
    labels[:, :4] = IGNORE  # the round's thresholds dropped the top rows
    teacher = RedIsOne()
    out = relabelled(teacher, images, labels, scale=2.0)
    assert teacher.seen == (8, 16)  # the zoomed patch shrunk back by the scale
    assert (out[:, :4] == IGNORE).all()
    assert (out[:, 4:, :10] == 1).all() and (out[:, 4:, 14:] == 2).all()  # away from the edge of the red


def test_the_online_teacher_needs_zoom_in_patches_only():
    with pytest.raises(ConfigError, match="lse.online_teacher re-draws zoomed patches only"):
        load_config(None, ["lse.online_teacher=0.99", "lse.zoom_out=true"])
    assert load_config(None, ["lse.online_teacher=0.99"]).lse.online_teacher == 0.99
