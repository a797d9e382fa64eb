"""Training throughput of the Ray Train loop (2 workers x 1 thread, DDP over gloo) against plain
PyTorch: whole runs first (start-up included), then the steady state (median step). Same model,
data, global batch and seed on every side.

    python bench/train_throughput.py [--root data/synthetic] [--steps 30] [--tiny]

Plain PyTorch runs in the same layout (2 processes x 1 thread, DDP over gloo, each rank half of the
global batch) and in 1 process x 2 threads. A whole run is timed from the call that starts it
(Ray: `fit()`, with its controller, workers and process group; plain: spawning the processes, or
building the model) to its last step. `--tiny` (a generated 8-image set, 3 steps, batch 2) is the
test suite's smoke run. Last line: one JSON object.
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

from common import REPO, make_set

sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from sisray.config import load_config  # noqa: E402
from sisray.datasets import open_source  # noqa: E402
from sisray.labels import NUM_CLASSES  # noqa: E402
from sisray.lse.losses import cross_entropy  # noqa: E402
from sisray.models import build_model  # noqa: E402
from sisray.optim import make_optimizer  # noqa: E402
from sisray.stages.train import fit  # noqa: E402
from sisray.stages.train_loop import TrainSpec, global_batch, load_batch  # noqa: E402
from sisray.storage import RunStore  # noqa: E402


def plain_loop(rank: int, world: int, cfg, steps: int, threads: int, port: int, out: dict) -> None:
    """The plain training loop on one rank (DDP when world > 1); rank 0 records its step times."""
    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(cfg.seed)
    dataset = open_source(cfg.data.source)
    model = build_model(cfg.model.name, NUM_CLASSES, cfg.model.width, "random").train()
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer, _ = make_optimizer(model, cfg.train.lr, steps)
    per_rank = cfg.train.batch_size // world
    times = []
    for step in range(steps):
        began = time.perf_counter()
        indices = global_batch(step, cfg.train.batch_size, len(dataset), cfg.seed)[rank * per_rank:(rank + 1) * per_rank]
        images, labels = load_batch(dataset, indices, torch.device("cpu"))
        loss = cross_entropy(net(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - began)
    if rank == 0:
        out["samples_per_s"] = cfg.train.batch_size / statistics.median(times)
    if world > 1:
        torch.distributed.destroy_process_group()


def plain_run(cfg, steps: int, world: int, threads: int) -> tuple[float, float]:
    """(whole-run seconds, steady samples/s) of plain PyTorch with `world` processes."""
    began = time.perf_counter()
    if world == 1:
        out: dict = {}
        plain_loop(0, 1, cfg, steps, threads, 0, out)
        return time.perf_counter() - began, out["samples_per_s"]
    manager = torch.multiprocessing.Manager()
    out = manager.dict()
    torch.multiprocessing.spawn(plain_loop, args=(world, cfg, steps, threads, 29_517, out), nprocs=world)
    return time.perf_counter() - began, out["samples_per_s"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="data/synthetic")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--config", default="configs/synthetic.yaml")
    p.add_argument("--tiny", action="store_true", help="8 generated images, 3 steps of batch 2 (the tests' smoke run)")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_set(Path(tmp) / "data", target_train=1, source=8) if args.tiny else Path(args.root)
        steps = 3 if args.tiny else args.steps
        cfg = load_config(args.config, [f"data.source.root={root}", f"data.target.root={root}", "train.num_workers=2",
                                        "train.lr=1e-3", f"train.checkpoint_every={steps}", "tracking.enabled=false",
                                        "train.photometric=false",  # the plain loops do not augment: the same work
                                        *(["train.batch_size=2"] if args.tiny else [])])
        same_s, same_rate = plain_run(cfg, steps, world=2, threads=1)
        one_s, one_rate = plain_run(cfg, steps, world=1, threads=2)

        import ray

        ray.init(include_dashboard=False, log_to_driver=False)
        spec = TrainSpec(cfg, "bench", steps, "random", 1, None, lr=cfg.train.lr)
        began = time.perf_counter()
        result = fit(cfg, spec, RunStore(Path(tmp) / "run"), "bench")
        ray_s = time.perf_counter() - began
        ray.shutdown()
    ray_rate = result.metrics["samples_per_s"]
    print(f"whole runs of {steps} steps of batch {cfg.train.batch_size}: Ray Train 2 workers x 1 thread {ray_s:.1f} s "
          f"(fit() with its start-up); plain 2 processes x 1 thread {same_s:.1f} s, 1 process x 2 threads {one_s:.1f} s")
    print(f"  whole-run ratio (plain / Ray): {same_s / ray_s:.2f} against the same layout, {one_s / ray_s:.2f} against 1 x 2")
    print(f"steady state (median step): Ray {ray_rate:.2f} samples/s; plain 2 x 1 {same_rate:.2f}, 1 x 2 {one_rate:.2f}: "
          f"ratios {ray_rate / same_rate:.2f} and {ray_rate / one_rate:.2f}")
    print(json.dumps({"whole_run_ratio_same_layout": round(same_s / ray_s, 3),
                      "whole_run_ratio_one_process": round(one_s / ray_s, 3), "ray_fit_s": round(ray_s, 1),
                      "plain_2x1_s": round(same_s, 1), "plain_1x2_s": round(one_s, 1),
                      "steady_ratio_same_layout": round(ray_rate / same_rate, 3),
                      "steady_ratio_one_process": round(ray_rate / one_rate, 3),
                      "ray_samples_per_s": round(ray_rate, 3), "plain_2x1_samples_per_s": round(same_rate, 3),
                      "plain_1x2_samples_per_s": round(one_rate, 3), "steps": steps, "batch_size": cfg.train.batch_size}))


if __name__ == "__main__":
    main()
