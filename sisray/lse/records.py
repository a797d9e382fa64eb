"""The per-image record of the scoring pass: small, mergeable statistics per predicted class.

For image i and class c (over the pixels predicted as c): pixel count, confidence score (mean
max-probability), mean normalised entropy, and a histogram of normalised entropy in `bins` equal
bins of [0, 1]. A class absent from the prediction has count 0, score 0 and entropy 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sisray.lse.entropy import normalise_per_class, pixel_entropy


@dataclass
class Records:
    """Batch-first: counts (N, C) int64, scores (N, C), mean_entropy (N, C), histograms (N, C, bins) int64."""
    counts: torch.Tensor
    scores: torch.Tensor
    mean_entropy: torch.Tensor
    histograms: torch.Tensor


def entropy_bin(normalised: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin index of normalised entropy values: [k / bins, (k + 1) / bins), with 1.0 in the last bin."""
    return (normalised * bins).long().clamp(0, bins - 1)


def image_records(probs: torch.Tensor, bins: int) -> Records:
    """Records of a batch of softmax maps (N, C, H, W), computed without per-pixel loops."""
    n, c = probs.shape[:2]
    confidence, prediction = probs.max(dim=1)
    normalised = normalise_per_class(pixel_entropy(probs), prediction, c)
    group = (torch.arange(n, device=probs.device)[:, None, None] * c + prediction).reshape(-1)

    def per_group(values: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(n * c, dtype=torch.float64, device=probs.device)
        return total.index_add_(0, group, values.reshape(-1).double()).reshape(n, c)

    counts = torch.bincount(group, minlength=n * c).reshape(n, c)
    safe = counts.clamp(min=1).double()
    scores = (per_group(confidence) / safe).float()
    mean_entropy = (per_group(normalised) / safe).float()
    cells = group * bins + entropy_bin(normalised, bins).reshape(-1)
    histograms = torch.bincount(cells, minlength=n * c * bins).reshape(n, c, bins)
    return Records(counts, scores, mean_entropy, histograms)
