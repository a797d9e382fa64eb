"""Selection and thresholds of a round (docs/METHOD.md steps 2-3) on the driver, from the scores
file: no Ray, no model. Writes RUN/round_XX/selection.json and thresholds.json.
"""

from __future__ import annotations

import json
import math
import numpy as np

from sisray.config import Config
from sisray.labels import CLASS_NAMES, NUM_CLASSES
from sisray.lse.selection import select
from sisray.lse.thresholds import class_thresholds
from sisray.rundir import RoundDir
from sisray.stages.score import read_histograms
from sisray.storage import atomic_write_json


def select_and_threshold(cfg: Config, tables: dict, p: float, folder: RoundDir,
                         skip: tuple[int, ...] = ()) -> tuple[list[int], np.ndarray]:
    """Selection and thresholds of one round; writes selection.json and thresholds.json."""
    threshold = cfg.lse.threshold
    selection = select(tables["counts"], tables["scores"], p, cfg.lse.selection, skip, cfg.lse.min_per_class)
    if not selection.selected:
        warn_nothing_selected(cfg, tables, p)
    histograms = read_histograms(folder.scores, selection.selected, threshold.bins) if selection.selected else \
        np.zeros((len(tables["counts"]), NUM_CLASSES, threshold.bins), np.int64)
    tau = class_thresholds(selection, tables["mean_entropy"], histograms, threshold.estimator, threshold.window,
                           threshold.quantile, threshold.fallback, never=skip)
    atomic_write_json(folder.selection, {
        "p": p, "method": cfg.lse.selection, "selected": [str(tables["sample_id"][i]) for i in selection.selected],
        "selected_index": selection.selected,
        "cutoffs": {CLASS_NAMES[c]: k for c, k in selection.cutoffs.items()}})
    atomic_write_json(folder.thresholds, {
        "estimator": threshold.estimator, "window": threshold.window, "quantile": threshold.quantile,
        "fallback": threshold.fallback, "tau": {CLASS_NAMES[c]: float(tau[c]) for c in range(NUM_CLASSES)}})
    return selection.selected, tau


def warn_nothing_selected(cfg: Config, tables: dict, p: float) -> None:
    """Say why a round has no pseudo-labels: the reference's class-wise quota floor(N_c p / 19) is 0 for
    every class below 19 / p candidate images."""
    largest = int((np.asarray(tables["counts"]) > 0).sum(axis=0).max(initial=0))
    if cfg.lse.selection == "classwise":
        why = (f"class-wise selection takes floor(N_c x {p:g} / {NUM_CLASSES}) images per class and the most "
               f"frequent class is predicted in {largest} image(s) (needs {math.ceil(NUM_CLASSES / p)})")
    else:
        why = f"global selection takes {p:g} of {len(tables['counts'])} scored image(s)"
    print(f"warning: the round with p = {p:g} selected no image, so it has no pseudo-labels to train on: {why}. "
          "Use more target images, a larger lse.p0, lse.min_per_class, or lse.selection: global", flush=True)


def read_selection(folder: RoundDir) -> tuple[list[int], np.ndarray]:
    """The selected image indices and tau of a round, from its selection.json and thresholds.json."""
    selected = json.loads(folder.selection.read_text())["selected_index"]
    tau = json.loads(folder.thresholds.read_text())["tau"]
    return selected, np.array([tau[name] for name in CLASS_NAMES], np.float64)
