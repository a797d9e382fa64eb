"""Selecting the confident target images of a round (docs/METHOD.md step 2), on the driver.

Input is the table of per-image records: `counts` (N, C) and `scores` (N, C) (mean max-probability
over the pixels predicted as each class). Rankings break ties by image index, so a selection is a
pure function of the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sisray.labels import NUM_CLASSES

_ROUNDING = 1e-9  # floor(N * p / C) must not lose an image to floating-point error (e.g. 0.3 * 190)


@dataclass
class Selection:
    """Selected rows of the records table (sorted), and per class the ranking of its candidate images
    (best first) and the cutoff: the rank of the first image of that ranking that was not selected."""
    selected: list[int]
    rankings: dict[int, list[int]] = field(default_factory=dict)
    cutoffs: dict[int, int] = field(default_factory=dict)


def class_ranking(counts: np.ndarray, scores: np.ndarray, c: int) -> np.ndarray:
    """Images that contain class c, by descending class-c score (ties: lower index first)."""
    candidates = np.flatnonzero(counts[:, c] > 0)
    return candidates[np.lexsort((candidates, -scores[candidates, c]))]


def classwise(counts, scores, p: float, divisor: int = NUM_CLASSES, skip: tuple[int, ...] = (),
              min_per_class: int = 0) -> Selection:
    """Per class c, the top floor(N_c * p / divisor) of its N_c candidates, but at least
    `min_per_class` of them (as many as there are); the selection is the union. The reference's quota
    alone is 0 for every class with fewer than divisor / p candidates, so a small target set gets no
    selection without the minimum.

    Classes in `skip` (those the source never labels, e.g. SYNTHIA's terrain, truck, train) neither
    select images nor get a ranking.
    """
    counts, scores = np.asarray(counts), np.asarray(scores)
    selection = Selection(selected=[])
    chosen: set[int] = set()
    for c in range(counts.shape[1]):
        if c in skip:
            continue
        ranking = class_ranking(counts, scores, c)
        k = max(math.floor(len(ranking) * p / divisor + _ROUNDING), min(min_per_class, len(ranking)))
        chosen.update(int(i) for i in ranking[:k])
        selection.rankings[c] = [int(i) for i in ranking]
        selection.cutoffs[c] = k
    selection.selected = sorted(chosen)
    return selection


def image_scores(counts, scores) -> np.ndarray:
    """Mean max-probability over all pixels of each image, from its per-class records."""
    counts, scores = np.asarray(counts, np.float64), np.asarray(scores, np.float64)
    return (counts * scores).sum(axis=1) / np.maximum(counts.sum(axis=1), 1)


def global_(counts, scores, p: float, skip: tuple[int, ...] = ()) -> Selection:
    """The top floor(N * p) of the N scored images by their mean max-probability. Each class's cutoff
    is the first image of its ranking that was not selected, so thresholds work as with class-wise
    selection."""
    counts, scores = np.asarray(counts), np.asarray(scores)
    scored = np.flatnonzero(counts.sum(axis=1) > 0)  # an image skipped as unreadable has no pixels
    overall = image_scores(counts, scores)
    order = scored[np.lexsort((scored, -overall[scored]))]
    chosen = {int(i) for i in order[:math.floor(len(scored) * p + _ROUNDING)]}
    selection = Selection(selected=sorted(chosen))
    for c in range(counts.shape[1]):
        if c in skip:
            continue
        ranking = [int(i) for i in class_ranking(counts, scores, c)]
        selection.rankings[c] = ranking
        selection.cutoffs[c] = next((r for r, i in enumerate(ranking) if i not in chosen), len(ranking))
    return selection


# `lse.selection`: (counts, scores, p, skip, min_per_class) -> Selection
SELECTIONS = {
    "classwise": lambda counts, scores, p, skip, min_per_class:  # the reference (with lse.min_per_class)
        classwise(counts, scores, p, skip=skip, min_per_class=min_per_class),
    "global": lambda counts, scores, p, skip, min_per_class: global_(counts, scores, p, skip=skip),
}


def select(counts, scores, p: float, method: str, skip: tuple[int, ...] = (), min_per_class: int = 0) -> Selection:
    """Selection by `lse.selection` (a name of SELECTIONS)."""
    if method not in SELECTIONS:
        raise ValueError(f"unknown selection {method!r}; expected one of {', '.join(SELECTIONS)}")
    return SELECTIONS[method](counts, scores, p, skip, min_per_class)
