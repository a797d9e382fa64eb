"""A job's inputs checked before any work: datasets (the built-in benchmark generated where it is
missing), checkpoints, and what the config asks of the model."""

from __future__ import annotations

from pathlib import Path


def check_checkpoint(cfg, location: str) -> None:
    """Stop before any work if `location` is missing, not a checkpoint, or of another model or class count."""
    from sisray.labels import NUM_CLASSES
    from sisray.models import build_model
    from sisray.weights import checkpoint_location

    build_model(cfg.model.name, NUM_CLASSES, cfg.model.width, checkpoint_location(location))


def check_target_batchnorm(cfg) -> None:
    """lse.target_bn needs a model with BatchNorm layers that track statistics (VGG16-FCN8s has none)."""
    import torch

    from sisray.errors import ConfigError
    from sisray.labels import NUM_CLASSES
    from sisray.models import build_model
    from sisray.models.common import batchnorm_layers

    with torch.device("meta"):  # the architecture only: no memory, no weights
        model = build_model(cfg.model.name, NUM_CLASSES, cfg.model.width)
    if not batchnorm_layers(model):
        raise ConfigError(f"lse.target_bn = true, but model.name = {cfg.model.name} has no BatchNorm statistics "
                          "to re-estimate: set lse.target_bn: false")


def check_inputs(cfg) -> None:
    """Generate the built-in benchmark where a synthetic root is missing; check every split and the
    source model before any work."""
    from sisray.datasets import open_source, open_target
    from sisray.datasets.synthetic import MANIFEST, generate
    from sisray.weights import check_shipped_source, is_shipped

    if cfg.model.source_checkpoint:
        check_checkpoint(cfg, cfg.model.source_checkpoint)
    if cfg.lse.target_bn:
        check_target_batchnorm(cfg)

    for domain in (cfg.data.source, cfg.data.target):
        if domain.name == "synthetic" and not (Path(domain.root) / MANIFEST).is_file():
            print(f"generating the built-in synthetic benchmark in {domain.root} ...", flush=True)
            generate(domain.root)
    if is_shipped(cfg.model.source_checkpoint):
        check_shipped_source(cfg.model.source_checkpoint, cfg.data.source)
    open_source(cfg.data.source), open_target(cfg.data.target, "train", with_labels=False)
    open_target(cfg.data.target, "val", with_labels=True)
