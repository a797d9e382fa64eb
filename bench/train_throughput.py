"""Training throughput of the Ray Train loop (2 workers, DDP over gloo) vs a plain single-process
PyTorch loop: same model, data, global batch and total threads. Steady state (median step time),
so Ray's start-up (reported separately) does not count.

    python bench/train_throughput.py [--root data/synthetic] [--steps 30]

Last line: {"ratio": ray/plain, "ray_samples_per_s": ..., "plain_samples_per_s": ..., "ray_fit_seconds": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sisray.config import load_config  # noqa: E402
from sisray.datasets import open_source  # noqa: E402
from sisray.labels import NUM_CLASSES  # noqa: E402
from sisray.models import build_model  # noqa: E402
from sisray.lse.losses import cross_entropy  # noqa: E402
from sisray.optim import make_optimizer  # noqa: E402
from sisray.stages.train import fit  # noqa: E402
from sisray.stages.train_loop import TrainSpec, global_batch, load_batch  # noqa: E402
from sisray.storage import RunStore  # noqa: E402


def plain_loop(cfg, steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    dataset = open_source(cfg.data.source)
    model = build_model(cfg.model.name, NUM_CLASSES, cfg.model.width, "random").train()
    optimizer, _ = make_optimizer(model, cfg.train.lr, steps)
    times = []
    for step in range(steps):
        began = time.perf_counter()
        images, labels = load_batch(dataset, global_batch(step, cfg.train.batch_size, len(dataset), cfg.seed),
                                    torch.device("cpu"))
        loss = cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - began)
    return cfg.train.batch_size / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="data/synthetic")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--config", default="configs/synthetic.yaml")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    threads = os.cpu_count() or 2
    cfg = load_config(args.config, [f"data.source.root={args.root}", f"data.target.root={args.root}",
                                    "train.num_workers=2", "train.lr=1e-3", f"train.checkpoint_every={args.steps}",
                                    "tracking.enabled=false"])
    plain = plain_loop(cfg, args.steps, threads)
    print(f"plain PyTorch, 1 process x {threads} threads: {plain:.2f} samples/s")

    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as run_dir:
        spec = TrainSpec(cfg, "bench", args.steps, "random", max(1, threads // 2), None, lr=cfg.train.lr)
        began = time.perf_counter()
        result = fit(cfg, spec, RunStore(run_dir), "bench")
        seconds = time.perf_counter() - began
    ray.shutdown()
    distributed = result.metrics["samples_per_s"]
    print(f"Ray Train, 2 workers x {max(1, threads // 2)} threads: {distributed:.2f} samples/s "
          f"(fit() took {seconds:.0f} s for {args.steps} steps)")
    print(json.dumps({"ratio": round(distributed / plain, 3), "ray_samples_per_s": round(distributed, 3),
                      "plain_samples_per_s": round(plain, 3), "ray_fit_seconds": round(seconds, 1),
                      "steps": args.steps, "batch_size": cfg.train.batch_size}))


if __name__ == "__main__":
    main()
