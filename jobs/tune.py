"""Sweep LSE's hyperparameters with Ray Tune and compare the trials in `mlflow ui`.

    python jobs/tune.py --space tune_spaces/lse_thresholds.yaml [--config F] [--set key=value ...]
        [--run-dir D] [--num-samples N] [--search random|grid|optuna] [--scheduler asha|fifo]
        [--objective information|target_miou|validator_NAME] [--concurrency N] [--force]

Each trial is a (shortened, per the space's `trial:` overrides) adaptation in D/trials/<trial id>/
from one source model shared by the sweep (the config's model.source_checkpoint, or trained once
in D/source/). Trials report after every round; ASHA stops the weak ones early. The default
objective reads no target label (`information` of the softmax on target images); `target_miou`
uses target-val labels and tags the sweep's MLflow run as doing so; `validator_NAME` ranks by one of
the label-free validators on target-train images (sisray/validators.py: mean_entropy, information,
bnm, snd, flip_agreement, scale_agreement, prior_distance, mix_accuracy), which every trial then
computes on 64 images (validation.images).

Writes D/sweep_summary.json (every trial, the best, how the label-free statistics rank the trials
against target-val mIoU) and D/best_config.yaml, ready for `python jobs/adapt.py --config`. MLflow:
one parent run per sweep, one child run per trial. Re-running the same command resumes an
interrupted sweep (Tune restore) without repeating finished trials.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from sisray.cli import add_config_arguments, job_config, run  # noqa: E402
from sisray.sweep import OBJECTIVES, SCHEDULERS, SEARCHES, SweepArgs, run_sweep  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", required=True, help="search space YAML (tune_spaces/*.yaml)")
    add_config_arguments(parser)
    parser.add_argument("--run-dir", default=None, help="sweep directory (default: runs/tune/<space name>)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="trials to sample (with grid values: samples of the grid; default 4, grid search 1)")
    parser.add_argument("--search", choices=SEARCHES, default="random")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="asha",
                        help="asha: stop weak trials after their first rounds; fifo: run every trial to the end")
    parser.add_argument("--objective", choices=tuple(OBJECTIVES), default="information",
                        help="information (label-free, default) or target_miou (reads target-val labels)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="trials at once (default: as the cluster allows; 1 on a CPU machine)")
    parser.add_argument("--force", action="store_true", help="continue a sweep directory made with other settings")
    args = parser.parse_args(argv)
    if args.num_samples is not None and args.num_samples < 1:
        parser.error(f"--num-samples {args.num_samples}: expected at least 1")
    if args.concurrency is not None and args.concurrency < 1:
        parser.error(f"--concurrency {args.concurrency}: expected at least 1")
    args.sweep = SweepArgs(args.space, str(Path(args.run_dir or Path("runs") / "tune" / Path(args.space).stem).resolve()),
                           args.search, args.scheduler, args.objective, args.num_samples, args.concurrency, args.force)
    return args


def main() -> None:
    args = parse_args()
    run_sweep(job_config(args), args.sweep)


if __name__ == "__main__":
    run(main)
