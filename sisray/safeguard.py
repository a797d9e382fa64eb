"""The label-free safeguard (beyond the paper): before a run adopts a risky change of its model
(target BatchNorm statistics for the source model, or a round's retrained model), it compares the
candidate with the model it would replace on the target-train images, without a target label, and
keeps the incumbent when the candidate looks worse.

What it reads is what the scoring pass computes anyway (sisray/lse/records.py): how many pixels of
each class a model predicts on the target-train images. Street scenes of different cities, cameras,
light and weather hold the classes in similar proportions; a model that absorbs a minority class into
a majority one (the confirmation bias of self-training) or collapses onto a few classes (a source
model far from its domain) predicts proportions far from those of the source's labels. The distance
is the mean over the label space of |log(predicted share / source share)|, so that a rare class
(traffic light, 0.1% of the pixels) counts as much as the road. A candidate is accepted unless it
moves the prediction further from the source's proportions than the incumbent, by more than
`tolerance` (lse.safeguard_tolerance).

What it can and cannot see (measured on the suite, target-val predictions): target BatchNorm
statistics that helped (+5 to +20 mIoU) brought the proportions 0.5 to 1.6 closer to the source's;
rounds that helped moved them up to 0.1 further away, because a target camera with a longer focal
length shows more car and person pixels and the rounds learn that. The source's proportions are a
prior, not the truth: the check guards against collapse, it does not rank good models.

Pure functions on numpy tables; the stages that score and record are in sisray/stages/safeguard.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from sisray.labels import CLASS_NAMES

_FLOOR = 1e-4  # shares below a hundredth of a percent count as that: a class never predicted is far, not infinitely


def predicted_share(counts: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """The share of the predicted pixels of each class of the label space, from the scores' (N, 19) counts."""
    totals = np.asarray(counts, np.float64).sum(axis=0)[list(classes)]
    return totals / max(totals.sum(), 1.0)


def source_share(pixels: dict[str, int], classes: tuple[int, ...]) -> np.ndarray:
    """The share of each class of the label space in the source's labels (RUN/source/classes.json)."""
    totals = np.array([pixels.get(CLASS_NAMES[c], 0) for c in classes], np.float64)
    return totals / max(totals.sum(), 1.0)


def prior_distance(share: np.ndarray, prior: np.ndarray) -> float:
    """Mean over classes of |log(share / prior)|, both floored at 1e-4: 0 when the proportions agree."""
    return float(np.mean(np.abs(np.log(np.maximum(share, _FLOOR) / np.maximum(prior, _FLOOR)))))


@dataclass(frozen=True)
class Verdict:
    """Whether a candidate model replaces the incumbent, the figures that decided, and why, in words."""
    decision: str  # the folder of the decision: "source" (target BN statistics) or "round_XX"
    accepted: bool
    candidate_distance: float
    incumbent_distance: float
    tolerance: float
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def judge(decision: str, candidate_counts: np.ndarray, incumbent_counts: np.ndarray, prior: np.ndarray,
          classes: tuple[int, ...], tolerance: float, candidate: str, incumbent: str) -> Verdict:
    """Accept the candidate unless its predicted class proportions on the target are further from the
    source's than the incumbent's by more than `tolerance`."""
    new = prior_distance(predicted_share(candidate_counts, classes), prior)
    old = prior_distance(predicted_share(incumbent_counts, classes), prior)
    accepted = new <= old + tolerance
    verb = "accepted" if accepted else "rejected, keeping " + incumbent
    reason = (f"{candidate} {verb}: the distance of its predicted class proportions from the source's is "
              f"{new:.3f} against {old:.3f} for {incumbent} (tolerance {tolerance:g})")
    return Verdict(decision, accepted, round(new, 4), round(old, 4), tolerance, reason)
