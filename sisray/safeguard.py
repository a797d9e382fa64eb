"""The label-free safeguard (beyond the paper): before a run adopts a risky change of its model
(target BatchNorm statistics for the source model, or a round's retrained model), it compares the
candidate with the model it would replace on the target-train images, without a target label, and
keeps the incumbent when the candidate looks worse. Two rules (lse.safeguard_rule):

- "consistency" (the default): a model that fits the target agrees with itself. The figures are two
  validators of sisray/validators.py, computed by the models' evaluations on the same target-train
  images: flip agreement (the share of pixels whose class stays when the image is mirrored) and the
  ClassMix probe (the share predicted as the model's own pseudo-labels say, once half of another
  image's predicted classes are pasted on: MixVal's idea). The candidate is rejected only when both
  fall. On the suite, target BatchNorm statistics that lost 7 points (country roads nearly in the
  source's look: the statistics follow the other class proportions, not a change of look) lowered
  both, and every change that helped raised at least one (bench/decisions.py, the README).
  A collapsed model is consistent too: on dusk the source model labels nearly everything as a few
  classes, the same way mirrored or mixed, and target BN (+24 points) agreed a little less with
  itself. So a candidate whose predictions spread over the classes (H(mean p) / log C rises by more
  than lse.safeguard_spread; at most +0.03 on every other decision of the suite, +0.25 on dusk) is
  accepted whatever its probes say: it undoes a collapse.
- "prior": street scenes hold the classes in similar proportions; a model that absorbs a minority
  class into a majority one, or collapses onto a few classes, predicts proportions far from the
  source labels'. The distance is the mean over the label space of |log(predicted share / source
  share)|, so that a rare class counts as much as the road; the candidate is rejected when it moves
  further than the incumbent by more than `tolerance` (lse.safeguard_tolerance). It reads the
  scoring pass's class counts. Where the target holds other proportions (country roads: a quarter of
  the building pixels, three times the vegetation) it rejects good rounds; it guards against collapse,
  it does not rank good models.

Pure functions on numpy tables and figures; the stage that judges and records is in
sisray/stages/safeguard.py.
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
    rule: str  # lse.safeguard_rule
    candidate: dict  # the figures the rule read, of each model
    incumbent: dict
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def judge(decision: str, candidate_counts: np.ndarray, incumbent_counts: np.ndarray, prior: np.ndarray,
          classes: tuple[int, ...], tolerance: float, candidate: str, incumbent: str) -> Verdict:
    """The "prior" rule: accept the candidate unless its predicted class proportions on the target are
    further from the source's than the incumbent's by more than `tolerance`."""
    new = prior_distance(predicted_share(candidate_counts, classes), prior)
    old = prior_distance(predicted_share(incumbent_counts, classes), prior)
    accepted = new <= old + tolerance
    verb = "accepted" if accepted else "rejected, keeping " + incumbent
    reason = (f"{candidate} {verb}: the distance of its predicted class proportions from the source's is "
              f"{new:.3f} against {old:.3f} for {incumbent} (tolerance {tolerance:g})")
    return Verdict(decision, accepted, "prior", {"prior_distance": round(new, 4)}, {"prior_distance": round(old, 4)},
                   reason)


# The "consistency" rule's probes (sisray/validators.py): how often a model keeps its own answer when the
# image is mirrored, and when half of another target image's predicted classes are pasted onto it.
CONSISTENCY = ("flip_agreement", "mix_accuracy")


def class_entropy(figures: dict) -> float:
    """H(mean p) / log C, how evenly a model's predictions spread over the classes, from the validators'
    information (H(mean p) - mean H(p)) and mean entropy (mean H(p)), both over log C."""
    return float(figures["information"]) + float(figures["mean_entropy"])


def judge_consistency(decision: str, candidate_figures: dict, incumbent_figures: dict, candidate: str,
                      incumbent: str, spread: float | None) -> Verdict:
    """The "consistency" rule: accept the candidate unless it agrees less with itself than the incumbent
    on every probe of CONSISTENCY (the figures of sisray/validators.py, on the same target-train images)
    and, when `spread` is set, its class entropy rises by at most `spread` (it does not undo a collapse)."""
    new = {name: round(float(candidate_figures[name]), 4) for name in CONSISTENCY}
    old = {name: round(float(incumbent_figures[name]), 4) for name in CONSISTENCY}
    new["class_entropy"] = round(class_entropy(candidate_figures), 4)
    old["class_entropy"] = round(class_entropy(incumbent_figures), 4)
    consistent = any(new[name] >= old[name] for name in CONSISTENCY)
    spreads = spread is not None and new["class_entropy"] > old["class_entropy"] + spread
    accepted = consistent or spreads
    verb = "accepted" if accepted else "rejected, keeping " + incumbent
    figures = ", ".join(f"{name.replace('_', ' ')} {new[name]:.3f} against {old[name]:.3f}"
                        for name in (*CONSISTENCY, "class_entropy"))
    why = " (its predictions spread over the classes: it undoes a collapse)" if spreads and not consistent else ""
    return Verdict(decision, accepted, "consistency", new, old,
                   f"{candidate} {verb}{why}: {figures} for {incumbent}")
