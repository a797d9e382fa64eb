"""Sweep LSE's hyperparameters with Ray Tune and compare the trials in `mlflow ui`.

    python jobs/tune.py --space tune_spaces/lse_thresholds.yaml [--config F] [--set key=value ...]
        [--run-dir D] [--num-samples N] [--search random|grid|optuna] [--scheduler asha|fifo]
        [--objective information|target_miou] [--concurrency N] [--force]

Each trial is a (shortened, per the space's `trial:` overrides) adaptation in D/trials/<trial id>/
from one source model shared by the sweep (the config's model.source_checkpoint, or trained once
in D/source/). Trials report after every round; ASHA stops the weak ones early. The default
objective reads no target label (`information` of the softmax on target images); `target_miou`
uses target-val labels and tags the sweep's MLflow run as doing so.

Writes D/sweep_summary.json (every trial, the best, how the label-free statistics rank the trials
against target-val mIoU) and D/best_config.yaml, ready for `python jobs/adapt.py --config`. MLflow:
one parent run per sweep, one child run per trial. Re-running the same command resumes an
interrupted sweep (Tune restore) without repeating finished trials.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from sisray.cli import add_config_arguments, check_inputs, job_config, run  # noqa: E402
from sisray.config import config_to_dict, save_config, with_absolute_paths  # noqa: E402
from sisray.errors import ConfigError, SisrayError  # noqa: E402
from sisray.sweep import OBJECTIVES, SEARCHES, load_space, param_space  # noqa: E402

STATE = "sweep.json"
SUMMARY = "sweep_summary.json"
BEST = "best_config.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", required=True, help="search space YAML (tune_spaces/*.yaml)")
    add_config_arguments(parser)
    parser.add_argument("--run-dir", default=None, help="sweep directory (default: runs/tune/<space name>)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="trials to sample (with grid values: samples of the grid; default 4, grid search 1)")
    parser.add_argument("--search", choices=SEARCHES, default="random")
    parser.add_argument("--scheduler", choices=("asha", "fifo"), default="asha",
                        help="asha: stop weak trials after their first rounds; fifo: run every trial to the end")
    parser.add_argument("--objective", choices=tuple(OBJECTIVES), default="information",
                        help="information (label-free, default) or target_miou (reads target-val labels)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="trials at once (default: as the cluster allows; 1 on a CPU machine)")
    parser.add_argument("--force", action="store_true", help="continue a sweep directory made with other settings")
    args = parser.parse_args(argv)
    if args.num_samples is not None and args.num_samples < 1:
        parser.error(f"--num-samples {args.num_samples}: expected at least 1")
    if args.concurrency is not None and args.concurrency < 1:
        parser.error(f"--concurrency {args.concurrency}: expected at least 1")
    return args


def sweep_record(args, space, cfg) -> dict:
    """What makes a sweep the same sweep: a directory made with other settings is refused."""
    from sisray.rounds import fingerprint

    return {"space": space.describe(), "trial": space.trial, "search": args.search, "scheduler": args.scheduler,
            "objective": args.objective, "num_samples": args.num_samples, "config": fingerprint(cfg)}


def open_sweep(sweep_dir: Path, record: dict, force: bool) -> dict:
    """SWEEP/sweep.json: the sweep's settings and its MLflow parent run."""
    import json

    path = sweep_dir / STATE
    if not path.is_file():
        return {**record, "parent_run_id": None}
    saved = json.loads(path.read_text())
    changed = sorted(k for k in record if saved.get(k) != record[k])
    if changed and not force:
        raise ConfigError(f"{sweep_dir} holds a sweep with other settings ({', '.join(changed)} differ): use "
                          "another --run-dir, or --force to continue it anyway")
    return {**saved, **record}


def expected_trials(space, search: str, num_samples: int) -> int:
    """How many trials the sweep runs: each sample crosses every grid."""
    count = num_samples
    for d in space.dimensions:
        if d.kind == "grid" or (search == "grid" and d.kind == "choice"):
            count *= len(d.values)
    return count


def summarise(results, space, metric: str, mode: str) -> dict:
    """Every trial's parameters and last report, the best completed trial, and how each label-free
    statistic ranks the trials against target-val mIoU (reporting only)."""
    from sisray.sweep import spearman

    trials = []
    for result in results:
        last = result.metrics or {}
        trials.append({"trial_id": last.get("trial_id") or Path(result.path).name,
                       "params": {d.key: (result.config or {}).get(d.key) for d in space.dimensions},
                       "rounds": int(last.get("round", 0)), "error": str(result.error) if result.error else None,
                       **{k: last[k] for k in ("information", "mean_entropy", "class_entropy",
                                               "target_val_miou19", "target_val_miou") if k in last}})
    done = [t for t in trials if not t["error"] and metric in t]
    most = max((t["rounds"] for t in done), default=0)
    finalists = [t for t in done if t["rounds"] == most]  # ASHA-stopped trials reported fewer rounds
    pick = max if mode == "max" else min
    best = pick(finalists, key=lambda t: t[metric]) if finalists else None
    ranking = {}
    for statistic, sign in (("information", 1), ("mean_entropy", -1), ("class_entropy", 1)):
        pairs = [(sign * t[statistic], t["target_val_miou19"]) for t in finalists
                 if statistic in t and "target_val_miou19" in t]
        ranking[statistic] = spearman([p[0] for p in pairs], [p[1] for p in pairs])
    return {"metric": metric, "mode": mode, "trials": trials, "best": best, "rounds_of_finalists": most,
            "rank_correlation_with_target_miou19": ranking}


def print_table(summary: dict, space) -> None:
    keys = [d.key for d in space.dimensions]
    header = ["trial", *keys, "rounds", summary["metric"], "target mIoU19"]
    rows = []
    for t in summary["trials"]:
        value, miou = t.get(summary["metric"]), t.get("target_val_miou19")
        rows.append([t["trial_id"], *(f"{t['params'][k]:.4g}" if isinstance(t["params"][k], float)
                                      else str(t["params"][k]) for k in keys),
                     str(t["rounds"]) + (" (error)" if t["error"] else ""),
                     "-" if value is None else f"{value:.4f}", "-" if miou is None else f"{100 * miou:.1f}"])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def make_tuner(args, trainable, tune_space, base: dict, space, metric: str, mode: str, num_samples: int,
               slots, seed: int, sweep_dir: Path):
    """A new Tuner, or the interrupted sweep's, restored (finished trials are not run again)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from sisray.rounds import schedule
    from sisray.sweep import search_algorithm, trial_config

    tuner_dir = sweep_dir / "tuner"
    if tune.Tuner.can_restore(str(tuner_dir)):
        print(f"resuming the sweep in {tuner_dir}", flush=True)
        return tune.Tuner.restore(str(tuner_dir), trainable, resume_unfinished=True, resume_errored=True)
    rounds_per_trial = len(schedule(trial_config(base, space.trial, {}).lse))
    scheduler = None
    if args.scheduler == "asha":  # rungs at rounds 1, 2, 4, ...: half the trials go on at each
        scheduler = ASHAScheduler(time_attr="round", max_t=rounds_per_trial, grace_period=1, reduction_factor=2,
                                  stop_last_trials=False)
    return tune.Tuner(
        trainable, param_space=tune_space,
        tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=num_samples, scheduler=scheduler,
                                    search_alg=search_algorithm(args.search, seed, slots.concurrent)),
        run_config=tune.RunConfig(name="tuner", storage_path=str(sweep_dir),
                                  failure_config=tune.FailureConfig(max_failures=1)))


def main() -> int:
    args = parse_args()
    cfg = job_config(args)
    sweep_dir = Path(args.run_dir or Path("runs") / "tune" / Path(args.space).stem).resolve()
    space = load_space(args.space, config_to_dict(cfg))  # every key and value checked before any work
    metric, mode, uses_labels = OBJECTIVES[args.objective]
    num_samples = args.num_samples or (1 if args.search == "grid" else 4)
    tune_space = param_space(space, args.search)
    state = open_sweep(sweep_dir, sweep_record(args, space, cfg), args.force)
    check_inputs(cfg)

    import ray
    from ray import tune

    from sisray.cluster import start_ray
    from sisray.stages.train import train_source
    from sisray.storage import RunStore, atomic_write_json
    from sisray.sweep import TRIAL_CPUS, TrialSetup, adapt_trial, trial_config, trial_slots
    from sisray.tracking import Tracking

    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep_dir / STATE, state)
    start_ray()
    resources = ray.cluster_resources()
    slots = trial_slots(cfg, float(resources.get("CPU", 1)), float(resources.get("GPU", 0)), args.concurrency)
    tracking = Tracking(dataclasses.replace(cfg, run_dir=str(sweep_dir)), "tune", resume_run_id=state["parent_run_id"],
                        tags={"sisray.objective": args.objective, "sisray.search": args.search,
                              "sisray.uses_target_labels": str(uses_labels).lower()})
    state["parent_run_id"] = tracking.run_id
    atomic_write_json(sweep_dir / STATE, state)
    tracking.params({**{f"sweep.space.{k}": line for k, line in space.describe().items()},
                     **{f"sweep.trial.{k}": v for k, v in space.trial.items()},
                     "sweep.search": args.search, "sweep.scheduler": args.scheduler,
                     "sweep.objective": args.objective, "sweep.num_samples": num_samples,
                     "sweep.concurrent_trials": slots.concurrent})
    tracking.artifact(args.space)
    status = "FAILED"
    try:
        # Trials run in Tune's own working directories: every path absolute, the same MLflow store.
        base = config_to_dict(with_absolute_paths(cfg))
        if tracking.enabled:
            base["tracking"]["uri"] = tracking.uri
        if not cfg.model.source_checkpoint:  # one source model for every trial
            print("== sweep source model", flush=True)
            base["model"]["source_checkpoint"] = str(train_source(cfg, RunStore(sweep_dir), tracking.logger))
        best_base = copy.deepcopy(base)  # the best config: the job's, the shared source model, the best values
        base["resources"]["num_actors"], base["train"]["num_workers"] = slots.actors, slots.workers
        setup = TrialSetup(base, space.trial, str(sweep_dir), tracking.run_id, TRIAL_CPUS)
        trainable = tune.with_resources(tune.with_parameters(adapt_trial, setup=setup), {"cpu": TRIAL_CPUS})
        tuner = make_tuner(args, trainable, tune_space, base, space, metric, mode, num_samples, slots, cfg.seed,
                           sweep_dir)
        results = tuner.fit()
        finished = sum(1 for r in results if r.error or (r.metrics or {}).get("done"))  # ASHA's stops are done
        expected = expected_trials(space, args.search, num_samples)
        if finished < expected:  # Ctrl-C: Tune saved the sweep and returned early
            print(f"\nsweep interrupted: {finished} of {expected} trials finished; the same command resumes it",
                  file=sys.stderr)
            status = "KILLED"
            return 130
        summary = summarise(results, space, metric, mode)
        summary.update(objective=args.objective, uses_target_labels=uses_labels, search=args.search,
                       scheduler=args.scheduler, num_samples=num_samples, seed=cfg.seed)
        atomic_write_json(sweep_dir / SUMMARY, summary)
        print_table(summary, space)
        if summary["best"] is None:
            raise SisrayError(f"no trial of the sweep in {sweep_dir} finished without error: see {sweep_dir / SUMMARY}")
        save_config(trial_config(best_base, {}, summary["best"]["params"], str(sweep_dir / "best")), sweep_dir / BEST)
        tracking.metrics({f"best/{metric}": summary["best"][metric],
                          **{f"rank_correlation/{k}": v for k, v in summary["rank_correlation_with_target_miou19"].items()
                             if v is not None}})
        for artifact in (sweep_dir / SUMMARY, sweep_dir / BEST):
            tracking.artifact(artifact)
        close_stopped_trials(tracking)
        print(f"\nbest trial {summary['best']['trial_id']} ({metric} = {summary['best'][metric]:.4f}): "
              f"{sweep_dir / BEST}\nrun it in full: python jobs/adapt.py --config {sweep_dir / BEST}\n"
              f"{tracking.where()}")
        status = "FINISHED"
    finally:
        tracking.finish(status)
    return 0


def close_stopped_trials(tracking) -> None:
    """Child runs of trials that ASHA stopped are still RUNNING in MLflow: mark them KILLED."""
    if not tracking.logger:
        return
    client = tracking.logger.client
    for child in client.search_runs([tracking.experiment_id], filter_string=(
            f"tags.mlflow.parentRunId = '{tracking.run_id}' and attributes.status = 'RUNNING'")):
        client.set_tag(child.info.run_id, "sisray.stopped_early", "true")
        client.set_terminated(child.info.run_id, "KILLED")


if __name__ == "__main__":
    run(main)
