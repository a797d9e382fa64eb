"""The Ray Data scoring pass: efficiency vs a bare PyTorch loop, start-up cost, driver memory, storage.

    python bench/scoring.py [--n 32] [--checkpoint runs/synthetic/source/checkpoint]

Each size runs in its own process (fresh Ray instance, honest peak RSS) on a synthetic target set
of that many images: N and 4N give the marginal rate (start-up cancels out), N and 8N the driver's
peak-RSS ratio. The bare loop scores 4N images in one process with the same model and total threads.
Last line: {"efficiency", "fixed_s", "rss_ratio", "bytes_per_selected_image", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def config(root: Path):
    from sisray.config import load_config

    return load_config(REPO / "configs" / "synthetic.yaml", [
        f"data.source.root={root}", f"data.target.root={root}", "tracking.enabled=false",
        "lse.p0=0.2", "lse.selection=global"])


def make_set(folder: Path, images: int) -> Path:
    from sisray.datasets.synthetic import SyntheticSpec, generate

    generate(folder, SyntheticSpec(seed=1, n_source=1, n_target_train=images, n_target_val=1))
    return folder


def child(root: Path, checkpoint: str, patches: bool) -> dict:
    """Score one set on a fresh Ray instance; optionally select and write the patch set."""
    import ray

    from sisray.rundir import RoundDir
    from sisray.stages.patch_pass import patch_pass
    from sisray.stages.score import score_pass
    from sisray.stages.select import select_and_threshold

    cfg = config(root)
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as run:
        began = time.perf_counter()
        folder = RoundDir(Path(run))
        tables = score_pass(cfg, checkpoint, folder.scores)
        seconds = time.perf_counter() - began
        out = {"images": len(tables["counts"]), "seconds": seconds}
        if patches:
            selected, tau = select_and_threshold(cfg, tables, cfg.lse.p0, folder)
            patch_pass(cfg, checkpoint, selected, tau, 1, folder.patches)
            size = sum(f.stat().st_size for f in folder.patches.glob("*.parquet"))
            out["bytes_per_selected_image"] = size / max(len(selected), 1)
            out["selected"] = len(selected)
    ray.shutdown()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def bare_loop(root: Path, checkpoint: str, threads: int) -> float:
    """Images/s of a single-process loop doing the same per-image work (load, forward, records)."""
    import torch

    from sisray.datasets import open_target
    from sisray.labels import NUM_CLASSES
    from sisray.lse.records import image_records
    from sisray.models import build_model
    from sisray.models.inference import predict_probs

    torch.set_num_threads(threads)
    cfg = config(root)
    dataset = open_target(cfg.data.target, "train", with_labels=False)
    model = build_model(cfg.model.name, NUM_CLASSES, cfg.model.width, checkpoint).eval()
    warm = 4
    for i in range(len(dataset)):
        if i == warm:
            began = time.perf_counter()
        image_records(predict_probs(model, dataset.load_image(i)[None]), cfg.lse.threshold.bins)
    return (len(dataset) - warm) / (time.perf_counter() - began)


def run_child(root: Path, checkpoint: str, patches: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(root), "--checkpoint", checkpoint] + (["--patches"] if patches else [])
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--checkpoint", default=str(REPO / "runs" / "synthetic" / "source" / "checkpoint"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--patches", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child), args.checkpoint, args.patches)))
        return
    if not Path(args.checkpoint).exists():
        sys.exit(f"no checkpoint at {args.checkpoint}: run `make demo` (or pass --checkpoint)")
    threads = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        sets = {k: make_set(Path(tmp) / f"n{k}", k * args.n) for k in (1, 4, 8)}
        small = run_child(sets[1], args.checkpoint, False)
        large = run_child(sets[4], args.checkpoint, True)
        huge = run_child(sets[8], args.checkpoint, False)
        bare = bare_loop(sets[4], args.checkpoint, threads)
    marginal = (large["images"] - small["images"]) / (large["seconds"] - small["seconds"])
    fixed = small["seconds"] - small["images"] / marginal
    print(f"Ray Data scoring: {small['images']} images in {small['seconds']:.1f} s, {large['images']} in "
          f"{large['seconds']:.1f} s -> marginal {marginal:.2f} images/s, fixed cost {fixed:.1f} s")
    print(f"bare loop, 1 process x {threads} threads: {bare:.2f} images/s")
    print(f"driver peak RSS: {small['peak_rss_mb']:.0f} MB at {small['images']} images, "
          f"{huge['peak_rss_mb']:.0f} MB at {huge['images']}")
    print(f"patch set: {large['bytes_per_selected_image']:.0f} bytes per selected image ({large['selected']} selected)")
    print(json.dumps({"efficiency": round(marginal / bare, 3), "fixed_s": round(fixed, 1),
                      "rss_ratio": round(huge["peak_rss_mb"] / small["peak_rss_mb"], 3),
                      "bytes_per_selected_image": round(large["bytes_per_selected_image"]),
                      "ray_marginal_images_per_s": round(marginal, 3), "bare_images_per_s": round(bare, 3),
                      "n": args.n}))


if __name__ == "__main__":
    main()
