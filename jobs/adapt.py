"""Adapt a segmentation model to the unlabelled target domain with LSE, round by round.

    python jobs/adapt.py [--config F] [--set key=value ...] [--run-dir D] [--resume D] [--force]

With no arguments: the whole method on the built-in synthetic benchmark (generated first if missing)
on a local Ray instance (or the cluster at RAY_ADDRESS): source-only training, then one round per p
of the schedule (score -> select + thresholds -> patches -> focal-loss retraining -> evaluation).
Prints the IoU table (source-only, each round, final) and writes RUN/summary.json.

Re-running the same command with the same run directory resumes after the last finished stage
(RUN/state.json). `--resume D` continues run D with the config saved in it. A run directory made
with another config is refused unless `--force`. Extra overrides can also come from the
environment: SISRAY_SET="key=value;key=value" (applied before --set).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from sisray.cli import add_config_arguments, add_run_dir_argument, job_config, run  # noqa: E402
from sisray.inputs import check_inputs  # noqa: E402
from sisray.config import Config, load_config  # noqa: E402
from sisray.errors import ConfigError  # noqa: E402
from sisray.rundir import CONFIG, SUMMARY  # noqa: E402
from sisray.storage import RunStore, join  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    add_run_dir_argument(parser)
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help="continue the run in RUN_DIR with the config saved there (RUN_DIR/config.yaml)")
    parser.add_argument("--force", action="store_true",
                        help="continue a run directory even though it was made with another config")
    args = parser.parse_args(argv)
    args.overrides = [o for o in os.environ.get("SISRAY_SET", "").split(";") if o.strip()] + args.overrides
    return args


def resolve_config(args: argparse.Namespace) -> Config:
    if not args.resume:
        return job_config(args)
    store = RunStore(args.resume)
    store.pull()
    saved = store.local / CONFIG
    if not saved.is_file():
        raise ConfigError(f"--resume {args.resume}: no {CONFIG} there (not a sisray run directory)")
    return load_config(saved, [*args.overrides, f"run_dir={args.resume}"])


def main() -> None:
    args = parse_args()
    cfg = resolve_config(args)

    from sisray import rounds
    from sisray.datasets import headline_metrics, open_target, target_eval_classes
    from sisray.job import Job
    from sisray.labels import NUM_CLASSES
    from sisray.metrics import format_headline, format_iou_table

    job = Job(cfg, "adapt", stages=True, force=args.force)  # refuses a foreign run directory before any work
    check_inputs(cfg)
    target_images = len(open_target(cfg.data.target, "train", with_labels=False))
    if empty := rounds.rounds_without_selection(cfg, target_images):
        print(f"warning: with {target_images} target images, class-wise selection takes no image in the rounds "
              f"with p = {', '.join(f'{p:g}' for p in empty)} (floor(N_c p / {NUM_CLASSES}) = 0 for every class): "
              "they will train on no pseudo-label. Set lse.min_per_class (e.g. 2) or lse.selection: global", flush=True)
    with job.started() as tracking:
        summary = rounds.run(cfg, job.state, tracking)
    columns = {"source-only": summary["source_only"]}
    if summary["source_target_bn"]:
        columns["+ target BN"] = summary["source_target_bn"]
    columns.update({f"round {b['round']} (p={b['p']:g})": b["evaluation"] for b in summary["rounds"]})
    columns["final"] = summary["final"]
    which = "the last the safeguard accepted" if cfg.lse.safeguard else "the last round's"
    print(f"\nLSE on target val (IoU %; the final model is {which}):")
    for verdict in summary["safeguard"]:
        print(f"safeguard: {verdict['reason']}")
    print(format_iou_table(columns, target_eval_classes(cfg.data.target)))
    shares = rounds.stage_shares(summary)
    print(f"\nwall time of the stages {summary['wall_s']:.0f} s: " +
          ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items()))
    print(f"summary: {join(job.store.location, SUMMARY)}\n{tracking.where()}")
    if summary["final"] and summary["source_only"]:
        print(f"\nfinal model on target val: {format_headline(summary['final'], summary['source_only'], headline_metrics(cfg))}"
              " (one seed: compare variants with bench/ablation.py)")


if __name__ == "__main__":
    run(main)
