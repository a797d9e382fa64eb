"""Writing the benchmark: the source half in the GTA5 layout, the target half in the Cityscapes
layout, Cityscapes label IDs, a manifest written last."""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from sisray.datasets.cityscapes import IMAGE_SUFFIX, LABEL_SUFFIX
from sisray.datasets.synthetic.render import render
from sisray.datasets.synthetic.scene import CLASSES, SyntheticSpec
from sisray.errors import DatasetError
from sisray.storage import atomic_write_json

MANIFEST = "SYNTHETIC.json"
PARTIAL_MARKER = ".sisray-synthetic-partial"
TRAIN_CITIES = ("alderby", "brookfield", "corvale")
VAL_CITIES = ("dunmore", "eastwick")
FRAME = 19  # Cityscapes' fine annotations are frame 000019 of each sequence


def _gta5_palette() -> list[int]:
    from cityscapesscripts.helpers.labels import labels

    palette = [0] * 768
    for lab in labels:
        if 0 <= lab.id < 256:
            palette[3 * lab.id: 3 * lab.id + 3] = lab.color
    return palette


def _target_name(split: str, index: int) -> tuple[str, str]:
    cities = TRAIN_CITIES if split == "train" else VAL_CITIES
    city = cities[index % len(cities)]
    return city, f"{city}_{index:06d}_{FRAME:06d}"


def _write_one(args: tuple[SyntheticSpec, str, int, str]) -> None:
    spec, domain, index, out = args
    rgb, ids = render(spec, domain, index)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    if domain == "source":
        name = f"{index + 1:05d}.png"
        cv2.imwrite(os.path.join(out, "source", "images", name), bgr)
        label = Image.fromarray(ids, mode="P")
        label.putpalette(_gta5_palette())
        label.save(os.path.join(out, "source", "labels", name))
    else:
        city, stem = _target_name(domain, index)
        cv2.imwrite(os.path.join(out, "target", "leftImg8bit", domain, city, stem + IMAGE_SUFFIX), bgr)
        cv2.imwrite(os.path.join(out, "target", "gtFine", domain, city, stem + LABEL_SUFFIX), ids)


def _jobs(spec: SyntheticSpec, out: str):
    for domain, count in (("source", spec.n_source), ("train", spec.n_target_train), ("val", spec.n_target_val)):
        for index in range(count):
            yield spec, domain, index, out


def _spec_record(spec: SyntheticSpec) -> dict:
    return json.loads(json.dumps(asdict(spec)))  # tuples -> lists, as stored


# The suite of target domains (`jobs/make_synthetic.py --suite`): one benchmark each, the same source
# (its images do not depend on the target's settings), targets that differ in kind.
SUITE = {
    "day": {},                     # the benchmark: photo-like textures, haze, a longer focal length
    "dusk": {"look": "dusk"},      # low light, a colour cast, sensor noise, lit lamps and windows
    "fog": {"look": "fog"},        # short visibility and rain streaks
    "camera": {"look": "camera"},  # another mounting: higher, tilted down, a wider field of view
    "small": {"n_target_train": 48},  # the day look with 48 unlabelled target images
    "drive": {"n_target_train": 48, "drives": 4},  # 48 frames of 4 drives: a short video, frames nearly alike
    "near": {"appearance_gap": 0.2, "zoom": (1.0, 1.2)},  # nearly the source's look and framing: little to adapt
    "rural": {"scenery": "rural"},  # the day look on country roads: other class proportions (label shift)
    "rural_near": {"scenery": "rural", "appearance_gap": 0.2},  # country roads, nearly the source's look
}
ADDED_SPEC_KEYS = {"look": "day", "drives": 0, "scenery": "street"}  # keys added since the first manifests, with the value they meant


def generate_suite(out: str | Path, spec: SyntheticSpec = SyntheticSpec(), processes: int | None = None) -> dict:
    """Every domain of the suite as a benchmark of its own, OUT/<domain>; returns the manifests."""
    return {name: generate(Path(out) / name, replace(spec, **changes), processes) for name, changes in SUITE.items()}


def generate(out: str | Path, spec: SyntheticSpec = SyntheticSpec(), processes: int | None = None) -> dict:
    """Write the benchmark to OUT/source (GTA5 layout) and OUT/target (Cityscapes layout).

    A complete set made with the same spec is left as it is (returns its manifest). A set made
    with another spec is refused. A half-written set of ours (marker file present) is removed and
    redone; folders that are not ours are never overwritten. The manifest is written last.
    """
    spec.validate()
    out = Path(out)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{manifest_path}: unreadable manifest ({exc}); delete {out} to regenerate") from None
        if {**ADDED_SPEC_KEYS, **manifest.get("spec", {})} != _spec_record(spec):
            raise DatasetError(f"{out} holds a synthetic benchmark made with other settings "
                               f"{manifest.get('spec')}; choose another --out or delete {out}")
        return manifest
    ours = (out / PARTIAL_MARKER).exists()
    for sub in ("source", "target"):
        if (out / sub).exists():
            if not ours:
                raise DatasetError(f"{out / sub} exists but is not part of a sisray synthetic benchmark "
                                   f"(no {MANIFEST}); refusing to overwrite it: choose another --out")
            shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTIAL_MARKER).write_text("generation in progress; rerun to redo\n")
    for folder in ("source/images", "source/labels"):
        (out / folder).mkdir(parents=True)
    for split, cities in (("train", TRAIN_CITIES), ("val", VAL_CITIES)):
        for city in cities:
            for kind in ("leftImg8bit", "gtFine"):
                (out / "target" / kind / split / city).mkdir(parents=True)

    start = time.perf_counter()
    processes = processes or min(os.cpu_count() or 1, 8)
    jobs = list(_jobs(spec, str(out)))
    if processes > 1:
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_write_one, jobs, chunksize=16))
    else:
        for job in jobs:
            _write_one(job)
    manifest = {
        "generator": "sisray.datasets.synthetic",
        "spec": _spec_record(spec),
        "counts": {"source": spec.n_source, "target_train": spec.n_target_train, "target_val": spec.n_target_val},
        "classes": list(CLASSES),
        "seconds": round(time.perf_counter() - start, 2),
    }
    atomic_write_json(manifest_path, manifest)
    (out / PARTIAL_MARKER).unlink()
    return manifest
