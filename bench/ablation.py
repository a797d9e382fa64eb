"""The ablation table on the built-in benchmark: same seed, same source model, same budget.

    python bench/ablation.py [--source runs/synthetic/source/checkpoint] [--out runs/ablation] [--set k=v ...]

Variants (each a full `jobs/adapt.py` run from the same source model, configs/synthetic.yaml):
plain self-training (scale 1: every patch is the whole image, no focal term), LSE without focal loss
(beta 0), LSE + focal loss (the default); plus the oracle (trained on target-train labels for as many
steps as the source model). The source model is trained first if `--source` does not exist.
Last line: {"source_only", "plain_self_training", "lse", "lse_fl", "oracle"} as mIoU19 (%), and the
same over the benchmark's 13 classes under "miou".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {
    "plain_self_training": ["lse.scale=1", "lse.beta=0"],
    "lse": ["lse.beta=0"],
    "lse_fl": [],
}


def job(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(REPO / "jobs" / script), *args], check=True, cwd=REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="runs/synthetic/source/checkpoint")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    out = Path(args.out)
    common = [a for o in [*args.overrides, "tracking.experiment=sisray-ablation"] for a in ("--set", o)]

    from sisray.config import load_config
    from sisray.datasets import open_source, open_target

    source = Path(args.source)
    if not (source / "model.pt").is_file():
        job("train_source.py", "--run-dir", str(source.parent.parent), *common)
    results = {}
    for name, overrides in VARIANTS.items():
        job("adapt.py", "--run-dir", str(out / name), "--set", f"model.source_checkpoint={source}", *common,
            *[a for o in overrides for a in ("--set", o)])
        summary = json.loads((out / name / "summary.json").read_text())
        results.setdefault("source_only", summary["source_only"])
        results[name] = summary["final"]

    cfg = load_config(REPO / "configs" / "synthetic.yaml", args.overrides)
    epochs = cfg.train.source_epochs * len(open_source(cfg.data.source)) / len(
        open_target(cfg.data.target, "train", with_labels=False))  # as many steps as the source model
    job("train_source.py", "--run-dir", str(out / "oracle"), "--set", "train.oracle=true",
        "--set", f"train.source_epochs={epochs}", *common)
    results["oracle"] = json.loads((out / "oracle" / "source" / "eval.json").read_text())

    print(f"\n{'':<22}{'mIoU (13 classes)':>18}{'mIoU19':>10}")
    for name, block in results.items():
        print(f"{name:<22}{100 * block['miou']:>18.1f}{100 * block['miou19']:>10.1f}")
    print(json.dumps({**{k: round(100 * v["miou19"], 2) for k, v in results.items()},
                      "miou": {k: round(100 * v["miou"], 2) for k, v in results.items()}}))


if __name__ == "__main__":
    main()
