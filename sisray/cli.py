"""What every job entry point shares: config arguments, and bad input reported without a traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from sisray.errors import SisrayError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "synthetic.yaml"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="YAML config (default: the built-in synthetic benchmark, configs/synthetic.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set lse.scale=2.0 (repeatable)")


def run(main: Callable[[], int | None]) -> None:
    """Run a job's main: bad input exits 2 with a one-line message, Ctrl-C exits 130."""
    try:
        code = main()
    except SisrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def add_run_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default=None, help="run directory (default: the config's run_dir)")


def job_config(args: argparse.Namespace):
    """The validated config of a job: file <- --set overrides <- --run-dir."""
    from sisray.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "run_dir", None):
        overrides.append(f"run_dir={args.run_dir}")
    return load_config(args.config, overrides)


def evaluation_metrics(summary: dict, prefix: str) -> dict[str, float]:
    """An evaluation block as flat MLflow metrics: PREFIX/miou19, PREFIX/iou/road, ..."""
    metrics = {f"{prefix}/{k}": summary[k] for k in ("miou", "miou19", "miou16", "miou13", "pixel_accuracy")}
    metrics.update({f"{prefix}/iou/{name}": value for name, value in summary["per_class"].items()})
    metrics.update({f"{prefix}/label_free/{name}": value for name, value in summary.get("label_free", {}).items()})
    return metrics


def check_checkpoint(cfg, location: str) -> None:
    """Stop before any work if `location` is missing, not a checkpoint, or of another model or class count."""
    from sisray.labels import NUM_CLASSES
    from sisray.models import build_model

    build_model(cfg.model.name, NUM_CLASSES, cfg.model.width, location)


def check_target_batchnorm(cfg) -> None:
    """lse.target_bn needs a model with BatchNorm layers that track statistics (DeepLab-v2's are frozen)."""
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

    if cfg.model.source_checkpoint:
        check_checkpoint(cfg, cfg.model.source_checkpoint)
    if cfg.lse.target_bn:
        check_target_batchnorm(cfg)

    for domain in (cfg.data.source, cfg.data.target):
        if domain.name == "synthetic" and not (Path(domain.root) / MANIFEST).is_file():
            print(f"generating the built-in synthetic benchmark in {domain.root} ...", flush=True)
            generate(domain.root)
    open_source(cfg.data.source), open_target(cfg.data.target, "train", with_labels=False)
    open_target(cfg.data.target, "val", with_labels=True)
