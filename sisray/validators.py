"""Label-free validators: figures of a model's predictions on unlabelled target images by which a sweep
can rank its trials (which of them tracks target mIoU is what bench/selection.py measures). Pure
functions on tensors; the pass that computes their inputs over target-train images is
`stages/validation.py`.

Each figure lies in [0, 1]; `HIGHER_IS_BETTER` says its direction:
- mean_entropy: the mean pixel entropy / log C (confident models score low);
- information: H(mean p) - mean H(p), over log C: confident and diverse (information maximisation);
- bnm: the nuclear norm of the sampled pixels' prediction matrix, normalised (BNM: discriminable and
  diverse);
- snd: soft neighbourhood density of the sampled pixels' normalised predictions (SND, Saito et al.
  2021), the entropy of each pixel's softmax over its similarities to the others at temperature
  0.05, / log(M - 1);
- flip_agreement, scale_agreement: the share of pixels whose class stays when the image is mirrored,
  or zoomed as LSE zooms (tiles enlarged by `lse.scale`), and the prediction mapped back;
- prior_distance: the mean |log ratio| of the predicted class shares to the source labels' shares
  (sisray/safeguard.py), squashed to d / (1 + d);
- mix_accuracy: the share of pixels of a ClassMix of two target images (half of one image's predicted
  classes pasted onto the other) predicted as the mixed pseudo-label says (a probe in MixVal's manner).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from sisray.lse.entropy import pixel_entropy
from sisray.safeguard import prior_distance

HIGHER_IS_BETTER = {"mean_entropy": False, "information": True, "bnm": True, "snd": True, "flip_agreement": True,
                    "scale_agreement": True, "prior_distance": False, "mix_accuracy": True}
SND_TEMPERATURE = 0.05


def label_free(entropy: float, probs: np.ndarray, pixels: int) -> dict:
    """Statistics of the softmax on target images that read no label, for choosing hyperparameters
    without target labels, in [0, 1] (entropies divided by log C):
    - mean_entropy: the mean pixel entropy H(p) (lower: more confident);
    - class_entropy: the entropy of the mean prediction H(mean p) (lower: fewer classes predicted);
    - information: class_entropy - mean_entropy, the input-prediction mutual information of
      information-maximisation objectives (higher: confident *and* diverse; a model that collapses
      onto a few confident classes scores low, which plain entropy would reward)."""
    scale = math.log(len(probs))
    mean = probs / max(pixels, 1)
    class_entropy = float(-(mean * np.log(mean + 1e-12)).sum()) / scale
    mean_entropy = entropy / max(pixels, 1) / scale
    return {"mean_entropy": mean_entropy, "class_entropy": class_entropy, "information": class_entropy - mean_entropy}


def bnm(samples: torch.Tensor) -> float:
    """Batch nuclear-norm of an (M, C) matrix of probability rows, ||P||_* / sqrt(M min(M, C)): 1 for
    one-hot rows spread evenly over the classes, 1 / sqrt(C) for identical one-hot rows, lower still
    for uncertain rows."""
    m, c = samples.shape
    return float(torch.linalg.svdvals(samples.double()).sum() / math.sqrt(m * min(m, c)))


def snd(samples: torch.Tensor, temperature: float = SND_TEMPERATURE) -> float:
    """Soft neighbourhood density of (M, C) probability rows, in [0, 1]: high when each row has many
    close neighbours (dense clusters), low when the rows scatter."""
    m = samples.shape[0]
    unit = torch.nn.functional.normalize(samples.double(), dim=1)
    similarity = unit @ unit.T / temperature
    similarity.fill_diagonal_(-math.inf)
    neighbours = similarity.softmax(dim=1)
    entropy = -(neighbours * torch.log(neighbours.clamp_min(1e-300))).sum(dim=1)
    return float(entropy.mean() / math.log(m - 1))


def agreement(first: torch.Tensor, second: torch.Tensor, covered: torch.Tensor | None = None) -> tuple[int, int]:
    """(pixels of the same class, pixels compared) of two class maps, over the `covered` mask if given."""
    same = first == second
    if covered is not None:
        return int(same[covered].sum()), int(covered.sum())
    return int(same.sum()), same.numel()


@dataclass
class ValidationSums:
    """What a validation pass adds up over images and batches; `figures` turns it into the validators."""
    classes: int
    pixels: int = 0
    entropy: float = 0.0  # sum of pixel entropies (nats)
    probs: np.ndarray | None = None  # (C,) sum of the softmax
    # image -> (k, C) sampled pixel probabilities; stacked in image order, whatever order batches arrive in
    # (BNM's singular values and SND move in the last bits with the row order)
    samples: dict[int, np.ndarray] = field(default_factory=dict)
    flip: list[int] = field(default_factory=lambda: [0, 0])  # [same, compared]
    scale: list[int] = field(default_factory=lambda: [0, 0])
    mix: list[int] = field(default_factory=lambda: [0, 0])

    def add_probabilities(self, probs: torch.Tensor) -> None:
        """A batch of softmax maps (N, C, H, W)."""
        total = probs.double().sum(dim=(0, 2, 3)).cpu().numpy()
        self.probs = total if self.probs is None else self.probs + total
        self.entropy += float(pixel_entropy(probs).double().sum())
        self.pixels += probs.shape[0] * probs.shape[2] * probs.shape[3]

    def merge(self, other: "ValidationSums") -> None:
        if other.probs is not None:
            self.probs = other.probs if self.probs is None else self.probs + other.probs
        self.pixels += other.pixels
        self.entropy += other.entropy
        self.samples.update(other.samples)
        for mine, theirs in ((self.flip, other.flip), (self.scale, other.scale), (self.mix, other.mix)):
            mine[0] += theirs[0]
            mine[1] += theirs[1]

    def figures(self, source_share: np.ndarray, label_space: tuple[int, ...]) -> dict[str, float]:
        """Every validator, from the sums and the source labels' class shares over `label_space`."""
        entropies = label_free(self.entropy, self.probs, self.pixels)
        mean = self.probs / max(self.pixels, 1)
        samples = (torch.from_numpy(np.concatenate([self.samples[i] for i in sorted(self.samples)])) if self.samples
                   else torch.zeros(0, self.classes))
        share = mean[list(label_space)] / max(mean[list(label_space)].sum(), 1e-12)
        distance = prior_distance(share, source_share)
        return {"mean_entropy": entropies["mean_entropy"], "information": entropies["information"],
                "bnm": bnm(samples) if len(samples) > 1 else float("nan"),
                "snd": snd(samples) if len(samples) > 2 else float("nan"),
                "flip_agreement": _share(self.flip), "scale_agreement": _share(self.scale),
                "prior_distance": distance / (1 + distance), "mix_accuracy": _share(self.mix)}


def _share(counts: list[int]) -> float:
    return counts[0] / counts[1] if counts[1] else float("nan")


def sample_pixels(probs: torch.Tensor, count: int, generator: torch.Generator) -> np.ndarray:
    """`count` pixels of one softmax map (C, H, W), drawn with `generator`: their (count, C) probabilities."""
    c, h, w = probs.shape
    chosen = torch.randperm(h * w, generator=generator)[:count].to(probs.device)
    return probs.reshape(c, h * w)[:, chosen].T.float().cpu().numpy()
