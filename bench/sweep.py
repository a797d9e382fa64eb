"""A Ray Tune sweep as a user runs it, timed whole: `jobs/tune.py` from its start to its exit, then
what the sweep directory says about it.

    python bench/sweep.py [--space tune_spaces/lse_thresholds.yaml] [--num-samples 12] [--search optuna]
        [--out runs/bench_sweep] [--set k=v ...]     # runs the sweep (ASHA, the default objective), then reports
    python bench/sweep.py --report SWEEP_DIR         # reports a finished sweep only (the tests' smoke sweep)

Reported: the wall time; the trials, and those ASHA stopped after fewer rounds; how many trials
computed the source stages and how many took them from another (sisray/stage_cache.py); the
objective's pick among the trials that ran every round, its target-val mIoU against the best of
them (regret, points), and the Spearman correlation of each label-free statistic with target-val
mIoU over those trials. Last line: one JSON object with the same figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import REPO


def report(sweep: Path, wall_s: float | None) -> dict:
    """The figures of the finished sweep in SWEEP."""
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    trials = summary["trials"]
    finalists = [t for t in trials if t["rounds"] == summary["rounds_of_finalists"] and "target_val_miou19" in t]
    adopted = [bool(json.loads(f.read_text()).get("adopted_from")) for f in sweep.glob("trials/*/summary.json")]
    best = summary["best"]
    top = max((t["target_val_miou19"] for t in finalists), default=None)
    return {"wall_s": wall_s, "trials": len(trials), "errors": sum(1 for t in trials if t["error"]),
            "stopped_early": sum(1 for t in trials if t["rounds"] < summary["rounds_of_finalists"]),
            "source_stages_computed": adopted.count(False), "source_stages_adopted": adopted.count(True),
            "objective": summary["objective"], "scheduler": summary["scheduler"],
            "pick": {"params": best["params"], "objective": best[summary["metric"]],
                     "miou19": round(100 * best["target_val_miou19"], 2)} if best else None,
            "best_finalist_miou19": None if top is None else round(100 * top, 2),
            "regret": None if top is None or not best else round(100 * (top - best["target_val_miou19"]), 2),
            "rank_correlation": {k: None if v is None else round(v, 3)
                                 for k, v in summary["rank_correlation_with_target_miou19"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default=str(REPO / "tune_spaces" / "lse_thresholds.yaml"))
    parser.add_argument("--num-samples", type=int, default=12)
    parser.add_argument("--search", default="optuna")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_sweep")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config overrides (jobs/tune.py --set)")
    parser.add_argument("--report", type=Path, default=None, help="report this finished sweep directory; run nothing")
    args = parser.parse_args()
    wall_s = None
    if args.report is None:
        if args.out.exists():
            sys.exit(f"{args.out} exists: the bench times a whole sweep from nothing; pass another --out")
        command = [sys.executable, str(REPO / "jobs" / "tune.py"), "--space", args.space, "--num-samples",
                   str(args.num_samples), "--search", args.search, "--run-dir", str(args.out),
                   *[a for o in args.overrides for a in ("--set", o)]]
        began = time.perf_counter()
        done = subprocess.run(command, cwd=REPO)
        wall_s = round(time.perf_counter() - began, 1)
        if done.returncode:
            sys.exit(f"jobs/tune.py exited with {done.returncode}")
    sweep = args.out if args.report is None else args.report
    if not (sweep / "sweep_summary.json").is_file():
        sys.exit(f"{sweep / 'sweep_summary.json'} not found: expected a finished sweep directory (jobs/tune.py --run-dir)")
    figures = report(sweep, wall_s)
    print(f"\n{figures['trials']} trials ({figures['stopped_early']} stopped early by ASHA, {figures['errors']} "
          f"failed); source stages computed by {figures['source_stages_computed']}, taken by "
          f"{figures['source_stages_adopted']}" + ("" if wall_s is None else f"; wall {wall_s / 60:.1f} min"))
    if figures["pick"]:
        print(f"the {figures['objective']} objective picks {figures['pick']['params']}: target-val mIoU19 "
              f"{figures['pick']['miou19']} against the best finalist's {figures['best_finalist_miou19']} "
              f"(regret {figures['regret']})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
