"""Rare-class sampling of the labelled images (`train.rare_class_sampling`; DAFormer, Hoyer et al. 2022).

Each sample of a labelled batch first draws a class of the label space, rare classes far more often,
then one of the images that hold it. Seen in order, once per epoch, a pole or a traffic light comes
by in a few images an epoch and is learnt late and labelled badly in the rounds; drawn this way it
comes by every few steps.

P(c) = softmax((1 - f_c) / T) over the label space, with f_c the class's share of the labelled
pixels and T the temperature (DAFormer: 0.01; larger is closer to every class alike). The draws of a
batch depend only on (seed, step): a resumed stage draws what an uninterrupted one does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sisray.errors import SisrayError
from sisray.labels import CLASS_NAMES


@dataclass(frozen=True)
class RareClassSampler:
    """Decided on the driver: per class of the label space, its probability and the positions (in the
    stage's trained samples) of the images that hold it."""
    probabilities: tuple[float, ...]
    holders: tuple[tuple[int, ...], ...]

    def batch(self, step: int, size: int, seed: int) -> list[int]:
        """The positions of global batch `step`."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        classes = torch.multinomial(torch.tensor(self.probabilities, dtype=torch.float64), size, replacement=True,
                                    generator=generator).tolist()
        return [self.holders[c][int(torch.randint(len(self.holders[c]), (1,), generator=generator))] for c in classes]


def rare_class_sampler(counted: dict, trained: list[int], temperature: float) -> RareClassSampler:
    """The sampler of a stage that trains on the samples `trained` (indices into the labelled set) of
    the label space `counted` (RUN/source/classes.json)."""
    if "image_classes" not in counted:
        raise SisrayError("train.rare_class_sampling needs the classes of each labelled image, which this run's "
                          "source/classes.json (written by an earlier sisray) lacks: delete it to have it counted again")
    position = {sample: k for k, sample in enumerate(trained)}
    holders = {c: [] for c in counted["class_ids"]}
    for sample, classes in enumerate(counted["image_classes"]):
        if sample in position:
            for c in classes:
                holders[c].append(position[sample])
    kept = [c for c in counted["class_ids"] if holders[c]]  # a class only held-out images hold is not drawn
    pixels = np.array([counted["pixels"][CLASS_NAMES[c]] for c in kept], np.float64)
    logits = (1 - pixels / pixels.sum()) / temperature
    probabilities = np.exp(logits - logits.max())
    return RareClassSampler(tuple((probabilities / probabilities.sum()).tolist()), tuple(tuple(holders[c]) for c in kept))
