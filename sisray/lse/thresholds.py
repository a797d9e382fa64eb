"""Dynamic class-specific entropy thresholds tau_c (docs/METHOD.md step 3), on the driver.

A pixel predicted as c is kept as a pseudo-label iff its normalised entropy is below tau_c. Three
estimators:
- `cutoff_image` (the reference): the mean normalised entropy of class c in the first non-selected
  image of class c's ranking;
- `window`: the mean of that value over the `window` images ranked from the cutoff on;
- `quantile`: the quantile q of normalised entropy over the class-c pixels of all selected images,
  from their merged histograms (exact to one bin; linear inside the bin).
A class without the image the estimator needs (no candidate image, nothing after the cutoff, no
selected pixel) gets `fallback`. A class the source never labels (`never`, e.g. SYNTHIA's terrain,
truck, train) gets 0: no pixel is ever kept with it, since a model cannot have learnt it.
"""

from __future__ import annotations

import numpy as np

from sisray.lse.selection import Selection

def _cutoff_image(selection: Selection, mean_entropy: np.ndarray, c: int, window: int) -> float | None:
    ranking, k = selection.rankings.get(c, []), selection.cutoffs.get(c, 0)
    after = ranking[k:k + window]
    return float(mean_entropy[after, c].mean()) if after else None


def histogram_quantile(histogram: np.ndarray, q: float) -> float | None:
    """The q-quantile of values in [0, 1] from their counts in equal bins; None for no values."""
    total = histogram.sum()
    if total == 0:
        return None
    bins = len(histogram)
    cumulative = np.cumsum(histogram)
    target = q * total
    b = int(np.searchsorted(cumulative, target, side="left"))
    before = cumulative[b - 1] if b > 0 else 0
    inside = (target - before) / histogram[b]
    return float((b + inside) / bins)


# `lse.threshold.estimator`: (selection, mean entropy (N, C), histograms of class c in the selected
# images, c, window, quantile) -> tau_c, or None where the estimator has nothing to go on
ESTIMATORS = {
    "cutoff_image": lambda selection, entropy, histograms, c, window, quantile: _cutoff_image(selection, entropy, c, 1),
    "window": lambda selection, entropy, histograms, c, window, quantile: _cutoff_image(selection, entropy, c, window),
    "quantile": lambda selection, entropy, histograms, c, window, quantile:
        histogram_quantile(histograms.sum(axis=0), quantile) if len(histograms) else None,
}


def class_thresholds(selection: Selection, mean_entropy, histograms, estimator: str, window: int = 5,
                     quantile: float = 0.5, fallback: float = 0.5, never: tuple[int, ...] = ()) -> np.ndarray:
    """tau (C,) for every class, by `estimator` (see the module doc)."""
    mean_entropy, histograms = np.asarray(mean_entropy), np.asarray(histograms)
    num_classes = mean_entropy.shape[1]
    tau = np.full(num_classes, fallback, dtype=np.float64)
    tau[list(never)] = 0.0  # normalised entropy is >= 0: kept iff below tau, so never
    selected = np.asarray(selection.selected, dtype=np.int64)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown threshold estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")
    for c in selection.rankings:
        value = ESTIMATORS[estimator](selection, mean_entropy, histograms[selected, c], c, window, quantile)
        if value is not None:
            tau[c] = value
    return tau
