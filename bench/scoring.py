"""The Ray Data scoring pass against bare PyTorch loops: whole runs (start-up included) first, then
the marginal rate; the driver's memory; the patch set's size.

    python bench/scoring.py [--n 32] [--large 1024] [--checkpoint MODEL (default: the default's source model)] [--tiny]
    python bench/scoring.py --actors 8,32,64,96,128   # where a second actor starts to pay

Every run is a fresh process, timed by this script from its start to its last record: the Ray side
imports, starts Ray and scores with 2 actors x 1 thread (`stages.score.score_pass`); the bare loops
do the same per-image work (load, forward, records) in the same layout, 2 processes x 1 thread each
scoring half the images, and in 1 process x 2 threads. Whole-run ratio = bare seconds / Ray seconds
at --large images (above 1: Ray is faster). The marginal rate compares --n with --large images (the
start-up cancels out). `--tiny` (8 images, a randomly initialised model: speed only; no marginal
rate, no memory ratio) is the test suite's smoke run. Last line: one JSON object.
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

from common import CONFIG, REPO, make_set, random_checkpoint, source_model

sys.path.insert(0, str(REPO))


def config(root: Path, actors: int = 2):
    from sisray.config import load_config

    return load_config(CONFIG, [
        f"data.source.root={root}", f"data.target.root={root}", "tracking.enabled=false",
        "lse.p0=0.2", "lse.selection=global", f"resources.num_actors={actors}"])


def busy_cpu_seconds() -> float:
    """CPU time spent by every process on the machine so far (/proc/stat): a pass's actors, Ray's
    processes and the driver alike. Read on a quiet machine."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def ray_child(root: Path, checkpoint: str, spawned: float, actors: int, patches: bool) -> dict:
    """Score one set on a fresh Ray instance with `actors` actors (whole_s: from the process's spawn
    to the last record; the pass's own seconds and the machine's CPU-seconds during it); optionally
    select and write the patch set after that."""
    import ray

    from sisray.rundir import RoundDir
    from sisray.stages.patch_pass import patch_pass
    from sisray.stages.score import score_pass
    from sisray.stages.select import select_and_threshold

    cfg = config(root, actors)
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as run:
        began, cpu = time.perf_counter(), busy_cpu_seconds()
        folder = RoundDir(Path(run))
        tables = score_pass(cfg, checkpoint, folder.scores)
        out = {"images": len(tables["counts"]), "pass_seconds": time.perf_counter() - began,
               "pass_cpu_s": busy_cpu_seconds() - cpu, "whole_s": time.time() - spawned}
        if patches:
            selected, tau = select_and_threshold(cfg, tables, cfg.lse.p0, folder)
            patch_pass(cfg, checkpoint, selected, tau, 1, folder.patches)
            size = sum(f.stat().st_size for f in folder.patches.glob("*.parquet"))
            out["bytes_per_selected_image"] = size / max(len(selected), 1)
    ray.shutdown()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def bare_child(root: Path, checkpoint: str, spawned: float, threads: int, part: int, parts: int) -> dict:
    """Score every `parts`-th image from `part` in this process: the same per-image work as an actor."""
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
    mine = range(part, len(dataset), parts)
    with torch.no_grad():
        for i in mine:
            image_records(predict_probs(model, dataset.load_image(i)[None]), cfg.lse.threshold.bins)
    return {"images": len(mine), "whole_s": time.time() - spawned}


def run(*children: list[str]) -> tuple[float, list[dict]]:
    """Start the children at once; the whole run = until the last of them has its last record."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    spawned = time.time()
    processes = [subprocess.Popen([sys.executable, __file__, "--child", child[0], child[1], child[2], str(spawned),
                                   *child[3:]], stdout=subprocess.PIPE, text=True, env=env) for child in children]
    outs = [p.communicate()[0] for p in processes]
    if any(p.returncode for p in processes):
        sys.exit("a benchmark process failed")
    results = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    return max(r["whole_s"] for r in results), results


def actors_per_pass(sizes: list[int], checkpoint: str | None, tiny: bool) -> None:
    """A scoring pass over each set size with 1 actor x 2 threads and 2 actors x 1 thread: the pass's
    seconds and the machine's CPU-seconds (`sisray.cluster.IMAGES_PER_ACTOR` rests on these)."""
    figures: dict[str, list] = {"images": sizes, "pass_s_1": [], "pass_s_2": [], "cpu_s_1": [], "cpu_s_2": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = random_checkpoint(Path(tmp) / "random.pt") if tiny else source_model(checkpoint)
        for n in sizes:
            root = make_set(Path(tmp) / f"set{n}", n)
            for actors in (1, 2):
                _, (out,) = run(["ray", str(root), model, str(actors)])
                figures[f"pass_s_{actors}"].append(round(out["pass_seconds"], 2))
                figures[f"cpu_s_{actors}"].append(round(out["pass_cpu_s"], 2))
            print(f"{n} images: 1 actor {figures['pass_s_1'][-1]:.2f} s ({figures['cpu_s_1'][-1]:.1f} CPU-s), "
                  f"2 actors {figures['pass_s_2'][-1]:.2f} s ({figures['cpu_s_2'][-1]:.1f} CPU-s)")
    print(json.dumps({"actors_per_pass": figures, "random_model": tiny}))


def set_sizes(text: str) -> list[int]:
    """--actors: comma-separated positive image counts."""
    try:
        sizes = [int(n) for n in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated image counts, e.g. 8,32,64")
    return sizes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--large", type=int, default=1024)
    p.add_argument("--checkpoint", help="the model to score with (default: the default's source model)")
    p.add_argument("--tiny", action="store_true", help="8 images, whole runs only (the tests' smoke run)")
    p.add_argument("--actors", type=set_sizes, help="instead: one pass with 1 and with 2 actors at each of these "
                                                     "set sizes (comma-separated), where a second actor starts to pay")
    p.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, root, checkpoint, spawned, *rest = args.child
        out = (ray_child(Path(root), checkpoint, float(spawned), int(rest[0]), rest[1:] == ["patches"]) if kind == "ray"
               else bare_child(Path(root), checkpoint, float(spawned), *(int(v) for v in rest)))
        print(json.dumps(out))
        return
    if args.actors:
        return actors_per_pass(args.actors, args.checkpoint, args.tiny)
    small_n, large_n = (0, 8) if args.tiny else (args.n, args.large)
    with tempfile.TemporaryDirectory() as tmp:
        large = make_set(Path(tmp) / "large", large_n)
        checkpoint = random_checkpoint(Path(tmp) / "random.pt") if args.tiny else source_model(args.checkpoint)
        ray_large_s, (ray_large,) = run(["ray", str(large), checkpoint, "2", "patches"])
        if small_n:  # the marginal rate and the memory ratio: a second, smaller whole run
            ray_small_s, (ray_small,) = run(["ray", str(make_set(Path(tmp) / "small", small_n)), checkpoint, "2"])
        two_s, _ = run(*(["bare", str(large), checkpoint, "1", str(k), "2"] for k in (0, 1)))
        one_s, _ = run(["bare", str(large), checkpoint, "2", "0", "1"])
    print(f"whole runs at {large_n} images (process start to last record): Ray Data 2 actors x 1 thread "
          f"{ray_large_s:.1f} s; bare loops 2 processes x 1 thread {two_s:.1f} s, 1 process x 2 threads {one_s:.1f} s")
    print(f"  whole-run ratio (bare / Ray): {two_s / ray_large_s:.2f} against the same layout, "
          f"{one_s / ray_large_s:.2f} against 1 x 2; patch set {ray_large['bytes_per_selected_image']:.0f} bytes "
          "per selected image")
    figures = {"whole_run_ratio_same_layout": round(two_s / ray_large_s, 3),
               "whole_run_ratio_one_process": round(one_s / ray_large_s, 3),
               "ray_whole_s": round(ray_large_s, 1), "bare_2x1_whole_s": round(two_s, 1),
               "bare_1x2_whole_s": round(one_s, 1)}
    if small_n:
        marginal = (large_n - small_n) / (ray_large["pass_seconds"] - ray_small["pass_seconds"])
        print(f"  at {small_n} images: Ray {ray_small_s:.1f} s whole run; the pass alone {ray_small['pass_seconds']:.1f} s")
        print(f"marginal rate ({small_n} -> {large_n} images, start-up cancelled): {marginal:.1f} images/s; "
              f"the bare loops' whole-run rates {large_n / two_s:.1f} (2 x 1) and {large_n / one_s:.1f} (1 x 2) images/s")
        print(f"driver peak RSS {ray_small['peak_rss_mb']:.0f} MB at {small_n} images, "
              f"{ray_large['peak_rss_mb']:.0f} MB at {large_n}")
        figures.update(ray_marginal_images_per_s=round(marginal, 2), ray_small_whole_s=round(ray_small_s, 1),
                       rss_ratio=round(ray_large["peak_rss_mb"] / ray_small["peak_rss_mb"], 3))
    print(json.dumps({**figures, "bytes_per_selected_image": round(ray_large["bytes_per_selected_image"]),
                      "images": [n for n in (small_n, large_n) if n],
                      "random_model": checkpoint.endswith("random.pt")}))


if __name__ == "__main__":
    main()
