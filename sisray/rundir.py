"""The names of a run directory's files, in one place.

    RUN/config.yaml  state.json  summary.json
    RUN/source/classes.json  checkpoint/{model.pt, train_state.pt}  eval.json  overlay.png  [target_bn/]
               [target_scores.parquet]  (a model that may teach; also in round folders)  [safeguard.json]
    RUN/round_XX/scores.parquet  selection.json  thresholds.json  patches/*.parquet
                 pseudo_labels.json  pseudo_labels.png  checkpoint/  [target_bn/]  eval.json  overlay.png
    SWEEP/sweep.json  sweep_summary.json  best_config.yaml  source/  shared_source/<key>/  trials/<trial id>/ (runs)
          tuner/

A folder that holds a model and its evaluation (the source stage, a round, a target-BN variant of
either) is a `ModelDir`; every path is relative to the run directory's local copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.yaml"
STATE = "state.json"  # the record of finished stages: written (and uploaded) last
SUMMARY = "summary.json"
BOOKKEEPING = (CONFIG, STATE, SUMMARY)  # files no stage's record covers

MODEL = "model.pt"  # a plain state dict: usable on its own (evaluate --checkpoint, model.init)
TRAIN_STATE = "train_state.pt"  # optimiser, scheduler, step, seed
SAFEGUARD = "safeguard.json"  # a verdict of the safeguard (lse.safeguard), in the folder of the decision
STUDENT = "student.pt"  # the trained weights, beside their moving average in model.pt (lse.ema_decay)
TARGET_BN_MODEL = "target_bn.pt"  # in a round's final Ray Train checkpoint: the model with target statistics (lse.target_bn)
ONLINE_TEACHER = "online_teacher.pt"  # a round's online teacher (lse.online_teacher), for resuming

SWEEP_STATE = "sweep.json"
SWEEP_SUMMARY = "sweep_summary.json"
BEST_CONFIG = "best_config.yaml"


def round_name(r: int) -> str:
    return f"round_{r:02d}"


@dataclass(frozen=True)
class ModelDir:
    """A stage's model (checkpoint/, or the folder itself) and its evaluation on target val."""
    path: Path
    checkpoint_in_place: bool = False

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoint(self) -> Path:
        return self.path if self.checkpoint_in_place else self.path / "checkpoint"

    @property
    def eval(self) -> Path:
        return self.path / "eval.json"

    @property
    def overlay(self) -> Path:
        return self.path / "overlay.png"

    @property
    def target_scores(self) -> Path:
        """This model's scoring records on the target-train images, written by its evaluation's pass
        when it may teach the next round or the safeguard's prior rule reads them."""
        return self.path / "target_scores.parquet"

    @property
    def safeguard(self) -> Path:
        """The safeguard's verdict on the change this folder's stage proposes (lse.safeguard)."""
        return self.path / SAFEGUARD

    @property
    def target_bn(self) -> ModelDir:
        """The same model with BatchNorm statistics of the target images (lse.target_bn): its
        checkpoint files and its evaluation in one folder."""
        return ModelDir(self.path / "target_bn", checkpoint_in_place=True)


@dataclass(frozen=True)
class RoundDir(ModelDir):
    """One round: its scores, selection, thresholds, patch set and pseudo-label report."""

    @property
    def scores(self) -> Path:
        return self.path / "scores.parquet"

    @property
    def selection(self) -> Path:
        return self.path / "selection.json"

    @property
    def thresholds(self) -> Path:
        return self.path / "thresholds.json"

    @property
    def patches(self) -> Path:
        return self.path / "patches"

    @property
    def pseudo_labels(self) -> Path:
        return self.path / "pseudo_labels.json"

    @property
    def pseudo_label_figure(self) -> Path:
        return self.path / "pseudo_labels.png"


@dataclass(frozen=True)
class RunDir:
    """A run directory (its local copy)."""
    path: Path

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def state(self) -> Path:
        return self.path / STATE

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def source(self) -> ModelDir:
        return ModelDir(self.path / "source")

    @property
    def label_space(self) -> Path:
        """The classes the labelled training set's labels contain, counted once (stages/label_space.py)."""
        return self.path / "source" / "classes.json"

    def round(self, r: int) -> RoundDir:
        return RoundDir(self.path / round_name(r))


@dataclass(frozen=True)
class SweepDir:
    """A sweep directory: its settings, summary, best config, shared source model and trials."""
    path: Path

    @property
    def state(self) -> Path:
        return self.path / SWEEP_STATE

    @property
    def summary(self) -> Path:
        return self.path / SWEEP_SUMMARY

    @property
    def best_config(self) -> Path:
        return self.path / BEST_CONFIG

    @property
    def tuner(self) -> Path:
        return self.path / "tuner"

    @property
    def validator_table(self) -> Path:
        """Every trial's label-free statistics beside its target-val mIoU (CSV)."""
        return self.path / "validators.csv"

    @property
    def validator_figure(self) -> Path:
        """One scatter per statistic: its value against target-val mIoU over the trials (PNG)."""
        return self.path / "validators.png"

    @property
    def shared_source(self) -> Path:
        """The source stages its trials share (sisray/stage_cache.py): one entry per source-side config."""
        return self.path / "shared_source"

    def trial(self, trial_id: str) -> Path:
        return self.path / "trials" / trial_id

    @property
    def best_run(self) -> Path:
        return self.path / "best"
