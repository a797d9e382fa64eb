"""The run's label space: the classes its labelled training set contains (the source's; the oracle's:
the target train labels), counted from the label files once and kept in RUN/source/classes.json.

A model may predict only these (models/common.py, LabelSpace), and selection and thresholds skip the
others. A loader may declare more classes than its files hold (a GTA5-layout set with 11 of the 19):
the count decides, never the declaration. A given source checkpoint that predicts more is narrowed to
them once, into the run directory (`narrowed_source`), so that no stage after it can use the others.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
import torch

from sisray.config import Config
from sisray.labels import CLASS_NAMES, NUM_CLASSES
from sisray.models import LABEL_SPACE_KEY, read_state_dict
from sisray.rundir import MODEL, RunDir
from sisray.stages.train_loop import training_set
from sisray.storage import RunStore, atomic_write_bytes, atomic_write_json
from sisray.weights import checkpoint_location

_ANNOUNCED = 2000  # counting more labels than this takes noticeable time: say so


def count_label_space(cfg: Config) -> dict:
    """The classes the labelled training set's files contain, with their pixel and image counts."""
    dataset = training_set(cfg)
    began = time.perf_counter()
    if len(dataset) > _ANNOUNCED:
        print(f"counting the classes of {len(dataset)} {dataset.name} labels (once per run) ...", flush=True)
    histograms = dataset.label_histograms()
    pixels, images = histograms.sum(axis=0), (histograms > 0).sum(axis=0)
    classes = [c for c in range(NUM_CLASSES) if pixels[c] > 0]
    return {"dataset": dataset.name, "root": str(dataset.root), "labels": len(dataset),
            "class_ids": classes, "classes": [CLASS_NAMES[c] for c in classes],
            "pixels": {CLASS_NAMES[c]: int(pixels[c]) for c in classes},
            "images": {CLASS_NAMES[c]: int(images[c]) for c in classes},
            # per labelled image (the dataset's order), the classes it holds: rare-class sampling draws from these
            "image_classes": [np.flatnonzero(h).tolist() for h in histograms],
            "seconds": round(time.perf_counter() - began, 2)}


def label_space(cfg: Config, store: RunStore) -> tuple[int, ...]:
    """The run's label space, counted on the first call and read from RUN/source/classes.json after."""
    path = RunDir(store.local).label_space
    if not path.is_file():
        block = count_label_space(cfg)
        absent = [CLASS_NAMES[c] for c in range(NUM_CLASSES) if c not in block["class_ids"]]
        if absent:
            print(f"{block['dataset']} labels hold {len(block['class_ids'])} of the {NUM_CLASSES} classes: "
                  f"no model of this run predicts {', '.join(absent)}", flush=True)
        atomic_write_json(path, block)
    return tuple(json.loads(path.read_text())["class_ids"])


def unlabelled(classes: tuple[int, ...]) -> tuple[int, ...]:
    """The trainIds outside a label space: selection and thresholds skip them."""
    return tuple(c for c in range(NUM_CLASSES) if c not in classes)


def narrowed_source(cfg: Config, store: RunStore, classes: tuple[int, ...]) -> str:
    """The given source checkpoint (`model.source_checkpoint`) as the run uses it: as it is when it
    predicts no class outside the label space, else a copy without those classes in
    RUN/source/checkpoint/ (its weights unchanged)."""
    given = checkpoint_location(cfg.model.source_checkpoint)
    state = read_state_dict(given)
    allowed = state.get(LABEL_SPACE_KEY, torch.ones(NUM_CLASSES, dtype=torch.bool)).clone()
    outside = [c for c in range(NUM_CLASSES) if bool(allowed[c]) and c not in classes]
    if not outside:
        return given
    allowed[list(outside)] = False
    folder = RunDir(store.local).source.checkpoint
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({**state, LABEL_SPACE_KEY: allowed}, buffer)
    atomic_write_bytes(folder / MODEL, buffer.getvalue())
    print(f"the given source model predicts {', '.join(CLASS_NAMES[c] for c in outside)}, which its source "
          f"labels never contain: the run uses it without them ({folder / MODEL})", flush=True)
    return store.shared(folder)
