"""How the cost of an adaptation round grows with the number of target images: N, 2N and 4N.
    python bench/growth.py [--n 300] [--checkpoint MODEL (default: the default's source model)] [--tiny]

Each size is one real `jobs/adapt.py` run (its own process and Ray instance) of one round (p = 0.2,
the demo's first) from the same source model, on a synthetic benchmark with that many target-train
images and the same 50 target-val images: the source model's evaluation (without and with target
BatchNorm statistics; the latter's pass also scores the target-train images for the round), selection,
patches, focal-loss retraining (2 epochs over the round's patch set, as in the demo; its model's target
statistics after the last step) and evaluation. Scoring, patches, retraining and target statistics
should grow linearly, evaluation not at all; the fit gives seconds
per target image and the fixed cost. `--tiny` (N = 4 only, 64x32 images, a randomly initialised
model, global selection, no target statistics) is the test suite's smoke run: one job, all start-up,
so it measures no growth. Last line:
{"n", "wall_s", "stage_s", "growth_2n", "growth_4n", "per_image_s", "fixed_s" (not with --tiny),
"selected", "patches", "passes_per_round" and "source_passes" (Ray Data passes, Ray tasks and Ray Train
fits), "driver_rss_mb"}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import REPO, TINY, make_set, random_checkpoint, source_model

sys.path.insert(0, str(REPO))
KINDS = ("score", "select", "patches", "train", "target_bn", "eval")


def child(args: list[str]) -> None:
    """jobs/adapt.py in this process, then its own line with this process's peak RSS (the driver's)."""
    sys.argv = ["jobs/adapt.py", *args]
    try:
        runpy.run_path(str(REPO / "jobs" / "adapt.py"), run_name="__main__")
    except SystemExit as stop:
        if stop.code:
            raise
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def one_round(root: Path, run_dir: Path, checkpoint: str, tiny: bool) -> dict:
    overrides = [f"data.source.root={root}", f"data.target.root={root}", f"model.source_checkpoint={checkpoint}",
                 "lse.p0=0.2", "lse.p_step=0", "lse.p_max=0.2", "tracking.enabled=false", *(TINY if tiny else [])]
    cmd = [sys.executable, __file__, "--child", "--run-dir", str(run_dir)] + [f"--set={o}" for o in overrides]
    began = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    wall = time.perf_counter() - began
    if result.returncode:
        sys.exit(f"the job failed on {root}:\n{result.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    stages = {kind: sum(v for k, v in summary["timings_s"].items() if k.endswith(f"/{kind}") and k.startswith("round"))
              for kind in KINDS}
    stages["source"] = sum(v for k, v in summary["timings_s"].items() if k.startswith("source/"))
    return {"wall_s": wall, "stage_s": stages, "selected": summary["rounds"][0]["selected_images"],
            "patches": summary["rounds"][0]["patches"], "round_passes": summary["rounds"][0]["ray_passes"],
            "source_passes": sum(v for k, v in summary["ray_passes"].items() if k.startswith("source/")),
            "peak_rss_mb": peak_rss_mb(result.stdout)}


def peak_rss_mb(stdout: str) -> float:
    """The child's peak RSS from its own line (Ray may print its lines after it, at exit)."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"peak_rss_mb"')][-1]["peak_rss_mb"]


def cost_model(sizes: list[int], walls: list[float]) -> dict[str, float]:
    """Each size's wall time over the first's ("growth_2n", "growth_4n", ...) and the straight line
    through them: seconds per target image and fixed seconds."""
    per_image, fixed = np.polyfit(sizes, walls, 1)
    return {**{f"growth_{n // sizes[0]}n": round(w / walls[0], 3) for n, w in zip(sizes[1:], walls[1:])},
            "per_image_s": round(float(per_image), 4), "fixed_s": round(float(fixed), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="N target-train images (the demo's target-train set)")
    p.add_argument("--checkpoint", help="the source model (default: the default's, sisray/weights)")
    p.add_argument("--tiny", action="store_true", help="N = 4 only, at 64x32 from a random model (the tests' smoke run)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.child:
        child(rest)
        return
    base, val = (4, 2) if args.tiny else (args.n, 50)
    sizes = [base] if args.tiny else [base, 2 * base, 4 * base]  # tiny: one run, all start-up, measures no growth
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = random_checkpoint(Path(tmp) / "random.pt") if args.tiny else source_model(args.checkpoint)
        for n in sizes:
            runs.append(one_round(make_set(Path(tmp) / f"n{n}", n, val), Path(tmp) / f"run{n}", checkpoint, args.tiny))
            r = runs[-1]
            print(f"{n} target images: {r['wall_s']:.1f} s ({r['selected']} selected, {r['patches']} patches; " +
                  ", ".join(f"{k} {v:.1f} s" for k, v in r["stage_s"].items()) + f"); driver {r['peak_rss_mb']:.0f} MB",
                  flush=True)
    walls = [r["wall_s"] for r in runs]
    growth = cost_model(sizes, walls) if len(sizes) > 1 else {}
    if growth:
        print(f"cost = {growth['fixed_s']:.1f} s + {growth['per_image_s']:.3f} s per target image; " +
              ", ".join(f"{n // base}N/N {growth[f'growth_{n // base}n']:.2f}" for n in sizes[1:]))
    print(json.dumps({"n": sizes, "wall_s": [round(w, 1) for w in walls],
                      "stage_s": {k: [round(r["stage_s"][k], 1) for r in runs] for k in runs[0]["stage_s"]},
                      **growth,
                      "selected": [r["selected"] for r in runs], "patches": [r["patches"] for r in runs],
                      "passes_per_round": runs[0]["round_passes"], "source_passes": runs[0]["source_passes"],
                      "driver_rss_mb": [round(r["peak_rss_mb"]) for r in runs]}))


if __name__ == "__main__":
    main()
