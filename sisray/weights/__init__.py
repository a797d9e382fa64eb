"""Source models that ship with sisray: `model.source_checkpoint: shipped:NAME`.

The built-in benchmark's default adapts a converged source model (15 epochs, chosen by the loss of
held-out source images; README "Results on the suite"). Training it takes about 12 minutes on 2
cores, more than the demo's budget, so it was trained once with the recipe in
configs/synthetic.yaml and ships here. It is used only after its sha256 is checked, and only on the
very source images it was trained on (the benchmark's settings are checked); anything else trains its own
(`model.source_checkpoint: null`, or jobs/train_source.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from sisray.errors import ConfigError, DatasetError, ModelError

if TYPE_CHECKING:
    from sisray.config import DomainConfig

SCHEME = "shipped:"


@dataclass(frozen=True)
class ShippedModel:
    file: str  # a plain state dict in this package
    sha256: str
    source_spec: dict  # the settings of the built-in benchmark whose source images it was trained on
    recipe: str  # the command that trains it again


SHIPPED = {
    "synthetic": ShippedModel(
        file="synthetic_lraspp_lite0_seed0.pt",
        sha256="43d2888a9224f9b938b1d27184f382e2e5c042f777bee2dbcdcd75585a066412",
        source_spec={"seed": 0, "n_source": 600, "source_size": [384, 216], "version": 1},
        recipe="python jobs/train_source.py --run-dir runs/synthetic_source (configs/synthetic.yaml: "
               "seed 0, 15 epochs, 10% of the source images held out; about 12 minutes on 2 cores)",
    ),
}


def is_shipped(location: str | None) -> bool:
    return bool(location) and location.startswith(SCHEME)


def shipped_model(location: str) -> ShippedModel:
    """The entry a `shipped:NAME` value names (a config error for an unknown name)."""
    name = location[len(SCHEME):]
    if name not in SHIPPED:
        raise ConfigError(f"model.source_checkpoint = {location!r}: no such shipped model; "
                          f"expected one of {', '.join(SCHEME + n for n in SHIPPED)}, or a checkpoint path")
    return SHIPPED[name]


@functools.cache
def shipped_path(location: str) -> str:
    """The file of a shipped model, after its sha256 is checked."""
    model = shipped_model(location)
    path = resources.files(__name__) / model.file
    if not path.is_file():
        raise ModelError(f"{location}: {path} is missing from the installed sisray; reinstall it, or train "
                         f"the model again: {model.recipe}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != model.sha256:
        raise ModelError(f"{location}: {path} has sha256 {digest}, expected {model.sha256}: the file is damaged "
                         f"or was replaced; restore it (git checkout), or train the model again: {model.recipe}")
    return str(path)


def checkpoint_location(location: str) -> str:
    """Where a `model.source_checkpoint` value is read: a shipped model's checked file, else the path
    made absolute (or the URI as it is)."""
    from sisray.storage import absolute

    return shipped_path(location) if is_shipped(location) else absolute(location)


def check_shipped_source(location: str, source: DomainConfig) -> None:
    """Stop before any work when a shipped model would adapt from source images it was not trained on
    (its source-only figures would describe another source set): the source must be the built-in
    benchmark's, written with the settings that decide its source half (SYNTHETIC.json). Settings,
    not bytes: another machine's rounding may change a pixel, never the scenes."""
    from sisray.datasets.synthetic import MANIFEST

    model = shipped_model(location)
    manifest = Path(source.root) / MANIFEST
    try:
        spec = json.loads(manifest.read_text())["spec"] if source.name == "synthetic" else None
    except (OSError, ValueError, KeyError):
        spec = None
    written = spec and {key: spec.get(key) for key in model.source_spec}
    if written != model.source_spec:
        raise DatasetError(f"model.source_checkpoint = {location} was trained on the built-in benchmark's source images "
                           f"({', '.join(f'{k} {v}' for k, v in model.source_spec.items())} in {MANIFEST}); "
                           f"data.source ({source.name} at {source.root}) holds other images"
                           f"{f' ({written})' if written else ''}: set model.source_checkpoint: null to train "
                           "a source model on them, or give one")
