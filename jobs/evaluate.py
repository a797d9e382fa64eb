"""Evaluate a checkpoint on target val: per-class IoU table, mIoU19/16/13, eval JSON.

    python jobs/evaluate.py --checkpoint C [--config F] [--set key=value ...] [--export DIR] [--out FILE]

C is a checkpoint directory (holding model.pt) or a bare state-dict file. --export writes every
prediction as a Cityscapes label-ID PNG (DIR/<city>/<city>_<seq>_<frame>_pred_labelIds.png), so the
official `cityscapesscripts` evaluator can check the numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from sisray.cli import add_config_arguments, job_config, run  # noqa: E402
from sisray.inputs import check_checkpoint  # noqa: E402
from sisray.errors import ConfigError  # noqa: E402
from sisray.storage import absolute, atomic_write_json, is_uri  # noqa: E402


def parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise ConfigError(f"--scales {text!r}: expected comma-separated numbers, e.g. 0.75,1,1.25") from None
    if not scales or any(s <= 0 for s in scales):
        raise ConfigError(f"--scales {text!r}: every scale must be positive")
    return scales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or state-dict file")
    add_config_arguments(parser)
    parser.add_argument("--export", default=None, help="write label-ID PNGs of the predictions here")
    parser.add_argument("--out", default=None, help="evaluation JSON (default: eval.json beside the checkpoint)")
    parser.add_argument("--scales", default="1", help="test scales, e.g. 0.75,1,1.25 (default: 1)")
    parser.add_argument("--flip", action="store_true", help="also average over horizontally flipped inputs")
    args = parser.parse_args()
    cfg = job_config(args)
    scales = parse_scales(args.scales)

    from sisray.datasets import open_target
    from sisray.job import Job
    from sisray.metrics import format_iou_table
    from sisray.models import checkpoint_file
    from sisray.stages.evaluate import evaluate, json_ready
    from sisray.tracking import evaluation_metrics

    checkpoint = checkpoint_file(args.checkpoint)
    check_checkpoint(cfg, checkpoint)  # a bad checkpoint stops here, before Ray starts
    val = open_target(cfg.data.target, "val", with_labels=True)
    if is_uri(checkpoint) and not args.out:
        raise ConfigError(f"--checkpoint {args.checkpoint} is remote: pass --out for eval.json")
    base = Path(checkpoint).parent
    out = Path(args.out) if args.out else (base.parent if base.name == "checkpoint" else base) / "eval.json"
    with Job(cfg, "evaluate", run_dir=False).started() as tracking:
        figure = out.with_name(out.stem + "_overlay.png")
        summary = evaluate(cfg, checkpoint, args.export, scales, args.flip, figure=figure)
        summary.update(scales=list(scales), flip=args.flip)
        atomic_write_json(out, json_ready(summary))
        tracking.metrics(evaluation_metrics(summary, "eval"))
        tracking.artifact(out)
        tracking.artifact(figure)
        print(format_iou_table({Path(args.checkpoint).name or "model": summary}, val.eval_classes))
    print(f"\nwrote {out}" + (f"; predictions in {absolute(args.export)}" if args.export else "") + f"\n{tracking.where()}")


if __name__ == "__main__":
    run(main)
