"""How much room the built-in benchmark leaves for adaptation: source-only vs target-trained
("oracle") mIoU on target val, with the CPU default model (configs/synthetic.yaml) trained by the
real Ray Train stage for the same number of steps. `bench/ablation.py --oracle` reports the same
oracle beside the adaptation variants, over seeds.

    python bench/domain_gap.py [--root data/synthetic] [--source-epochs 8]

Last line: {"source_only_miou": ..., "oracle_miou": ..., "gap_points": ..., "steps": ...}
(percent, over the benchmark's 13 classes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sisray.config import load_config  # noqa: E402
from sisray.stages.evaluate import evaluate  # noqa: E402
from sisray.stages.train import steps_for, train_source, training_set  # noqa: E402
from sisray.storage import RunStore  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="data/synthetic")
    p.add_argument("--config", default="configs/synthetic.yaml")
    p.add_argument("--source-epochs", type=float, default=8.0)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    base = [f"data.source.root={args.root}", f"data.target.root={args.root}", "tracking.enabled=false"]
    source_cfg = load_config(args.config, base + [f"train.source_epochs={args.source_epochs}"])
    steps = steps_for(args.source_epochs, len(training_set(source_cfg)), source_cfg.train.batch_size)
    oracle_cfg = load_config(args.config, base + ["train.oracle=true", "train.source_epochs=1"])
    oracle_epochs = steps * oracle_cfg.train.batch_size / len(training_set(oracle_cfg))  # the same steps
    oracle_cfg = load_config(args.config, base + ["train.oracle=true", f"train.source_epochs={oracle_epochs}"])

    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in (("source_only", source_cfg), ("oracle", oracle_cfg)):
            began = time.perf_counter()
            checkpoint = train_source(cfg, RunStore(Path(tmp) / name), None)
            results[f"{name}_miou"] = round(100 * evaluate(cfg, checkpoint)["miou"], 2)
            print(f"{name}: mIoU {results[f'{name}_miou']:.2f} on target val after {steps} steps "
                  f"({time.perf_counter() - began:.0f} s)", flush=True)
    ray.shutdown()
    results["gap_points"] = round(results["oracle_miou"] - results["source_only_miou"], 2)
    results["steps"] = steps
    print(json.dumps(results))


if __name__ == "__main__":
    main()
