"""Source-only training on Ray Train, then evaluation on target val.

    python jobs/train_source.py [--config F] [--run-dir D] [--set key=value ...]

Writes D/source/checkpoint/ (model.pt: a plain state dict; train_state.pt: optimiser, scheduler,
step), D/source/eval.json and D/source/overlay.png. Re-running with the same run directory resumes
from the last checkpoint; a finished run is not trained again. `--set train.oracle=true` trains on
the target's train labels instead (the usual upper bound; never part of adaptation).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from sisray.cli import add_config_arguments, add_run_dir_argument, job_config, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    add_run_dir_argument(parser)
    cfg = job_config(parser.parse_args())
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, source_checkpoint=None))  # this job trains it

    from sisray.datasets import open_target, target_eval_classes
    from sisray.job import Job
    from sisray.metrics import format_iou_table
    from sisray.stages.evaluate import evaluate_into
    from sisray.stages.train import train_source, training_set
    from sisray.tracking import evaluation_metrics

    training_set(cfg), open_target(cfg.data.target, "val", with_labels=True)  # bad data: stop now
    job = Job(cfg, "train_source")
    with job.started() as tracking:
        checkpoint = train_source(cfg, job.store, tracking.logger)
        source = job.run_dir.source
        summary = evaluate_into(cfg, job.store.shared(checkpoint), source)
        tracking.metrics(evaluation_metrics(summary, "source"))
        tracking.artifact(source.eval)
        tracking.artifact(source.overlay)
        name = "oracle (target labels)" if cfg.train.oracle else "source-only"
        print(f"\n{name} model on target val (IoU %):")
        print(format_iou_table({name: summary}, target_eval_classes(cfg.data.target)))
    print(f"\ncheckpoint: {job.store.shared(checkpoint)}\nrun directory: {job.store.location}\n{tracking.where()}")


if __name__ == "__main__":
    run(main)
