"""The sweep's driver: a Ray Tune run of adaptation trials from one shared source model, resumed if
interrupted, summarised (every trial, the best, how label-free statistics rank the trials against
target-val mIoU) with the best config written, ready for `jobs/adapt.py --config`.

The default objective reads no target label: the information of the final model's softmax on target
images (`validators.label_free`); target-val mIoU is used only when asked for, and the sweep's
MLflow run then says so. MLflow: one parent run per sweep, one child run per trial.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sisray.config import Config, save_config, with_absolute_paths, with_values
from sisray.errors import ConfigError, Interrupted, SisrayError
from sisray.rundir import SweepDir
from sisray.sweep.space import Space, expected_trials, load_space, param_space, search_algorithm, trial_config
from sisray.validators import HIGHER_IS_BETTER

# name: (metric reported to Tune, mode, reads target labels); `objective` resolves target mIoU per pair
OBJECTIVES = {
    "information": ("information", "max", False),
    "target_miou": ("target_val_miou", "max", True),
    # the validators on target-train images (sisray/validators.py; trials compute them: validation.images)
    **{f"validator_{name}": (f"validator_{name}", "max" if higher else "min", False)
       for name, higher in HIGHER_IS_BETTER.items()},
}
VALIDATOR_METRICS = tuple(f"validator_{name}" for name in HIGHER_IS_BETTER)
LABEL_FREE = ("information", "mean_entropy", "class_entropy", *VALIDATOR_METRICS)  # what a trial reports without labels
VALIDATOR_IMAGES = 64  # target-train images a trial validates on when the objective is a validator


def objective(name: str, cfg: Config) -> tuple[str, str, bool]:
    """(metric, mode, reads target labels) of objective `name`: target mIoU is the pair's headline
    figure (from SYNTHIA mIoU16, as the paper reports it; else the target benchmark's mIoU)."""
    from sisray.datasets import headline_metrics

    metric, mode, uses_labels = OBJECTIVES[name]
    if name == "target_miou":
        metric = f"target_val_{headline_metrics(cfg)[0]}"
    return metric, mode, uses_labels
SCHEDULERS = ("asha", "fifo")


@dataclass(frozen=True)
class SweepArgs:
    """How to sweep (jobs/tune.py's arguments, checked)."""
    space: str
    sweep_dir: str
    search: str = "random"
    scheduler: str = "asha"
    objective: str = "information"
    num_samples: int | None = None  # None: 4, or 1 sample of the grid with --search grid
    concurrency: int | None = None  # None: as the cluster allows
    force: bool = False

    @property
    def samples(self) -> int:
        return self.num_samples or (1 if self.search == "grid" else 4)


def sweep_record(args: SweepArgs, space: Space, cfg: Config) -> dict:
    """What makes a sweep the same sweep: a directory made with other settings is refused."""
    from sisray.run_state import fingerprint

    return {"space": space.describe(), "trial": space.trial, "search": args.search, "scheduler": args.scheduler,
            "objective": args.objective, "num_samples": args.num_samples, "config": fingerprint(cfg)}


def open_sweep(sweep_dir: SweepDir, record: dict, force: bool) -> dict:
    """SWEEP/sweep.json: the sweep's settings and its MLflow parent run."""
    path = sweep_dir.state
    if not path.is_file():
        return {**record, "parent_run_id": None}
    saved = json.loads(path.read_text())
    changed = sorted(k for k in record if saved.get(k) != record[k])
    if changed and not force:
        raise ConfigError(f"{sweep_dir.path} holds a sweep with other settings ({', '.join(changed)} differ): use "
                          "another --run-dir, or --force to continue it anyway")
    return {**saved, **record}


def summarise(results, space, metric: str, mode: str) -> dict:
    """Every trial's parameters and last report, the best completed trial, and how each label-free
    statistic ranks the trials against target-val mIoU (reporting only)."""

    trials = []
    for result in results:
        last = result.metrics or {}
        trials.append({"trial_id": last.get("trial_id") or Path(result.path).name,
                       "params": {d.key: (result.config or {}).get(d.key) for d in space.dimensions},
                       "rounds": int(last.get("round", 0)), "error": str(result.error) if result.error else None,
                       **{k: last[k] for k in (*LABEL_FREE, "target_val_miou19", "target_val_miou") if k in last}})
    done = [t for t in trials if not t["error"] and metric in t]
    most = max((t["rounds"] for t in done), default=0)
    finalists = [t for t in done if t["rounds"] == most]  # ASHA-stopped trials reported fewer rounds
    pick = max if mode == "max" else min
    best = pick(finalists, key=lambda t: t[metric]) if finalists else None
    ranking = {}
    statistics = [("information", 1), ("mean_entropy", -1), ("class_entropy", 1),
                  *((f"validator_{name}", 1 if higher else -1) for name, higher in HIGHER_IS_BETTER.items())]
    for statistic, sign in statistics:  # signed: higher is better, so +1 means it ranks as mIoU does
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


def make_tuner(args: SweepArgs, trainable, base: Config, space: Space, concurrent: int, seed: int):
    """A new Tuner, or the interrupted sweep's, restored (finished trials are not run again)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from sisray.rounds import schedule

    tuner_dir = SweepDir(Path(args.sweep_dir)).tuner
    if tune.Tuner.can_restore(str(tuner_dir)):
        print(f"resuming the sweep in {tuner_dir}", flush=True)
        return tune.Tuner.restore(str(tuner_dir), trainable, resume_unfinished=True, resume_errored=True)
    metric, mode, _ = objective(args.objective, base)
    rounds_per_trial = len(schedule(trial_config(base, space.trial, {}).lse))
    scheduler = None
    if args.scheduler == "asha":  # rungs at rounds 1, 2, 4, ...: half the trials go on at each
        scheduler = ASHAScheduler(time_attr="round", max_t=rounds_per_trial, grace_period=1, reduction_factor=2,
                                  stop_last_trials=False)
    return tune.Tuner(
        trainable, param_space=param_space(space, args.search),
        tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=args.samples, scheduler=scheduler,
                                    search_alg=search_algorithm(args.search, seed, concurrent)),
        run_config=tune.RunConfig(name=tuner_dir.name, storage_path=str(tuner_dir.parent),
                                  failure_config=tune.FailureConfig(max_failures=1)))


def run_sweep(cfg: Config, args: SweepArgs) -> None:
    """The whole sweep; writes SWEEP/sweep_summary.json and SWEEP/best_config.yaml."""
    sweep_dir = SweepDir(Path(args.sweep_dir))
    space = load_space(args.space, cfg)  # every key and value checked before any work
    param_space(space, args.search)  # the search can sample this space
    metric, mode, uses_labels = objective(args.objective, cfg)

    import ray
    from ray import tune

    from sisray.cluster import start_ray
    from sisray.inputs import check_inputs
    from sisray.job import Job
    from sisray.stages.train import train_source
    from sisray.storage import RunStore, atomic_write_json
    from sisray.sweep.trial import TRIAL_CPUS, TrialSetup, adapt_trial, trial_slots

    check_inputs(cfg)

    job = Job(dataclasses.replace(cfg, run_dir=str(sweep_dir.path)), "tune",  # locks the sweep directory first
              tags={"sisray.objective": args.objective, "sisray.search": args.search,
                    "sisray.uses_target_labels": str(uses_labels).lower()})
    state = open_sweep(sweep_dir, sweep_record(args, space, cfg), args.force)
    job.resume_run_id = state["parent_run_id"]
    with job.started() as tracking:
        state["parent_run_id"] = tracking.run_id
        atomic_write_json(sweep_dir.state, state)
        start_ray()
        resources = ray.cluster_resources()
        slots = trial_slots(cfg, float(resources.get("CPU", 1)), float(resources.get("GPU", 0)), args.concurrency)
        tracking.params({**{f"sweep.space.{k}": line for k, line in space.describe().items()},
                         **{f"sweep.trial.{k}": v for k, v in space.trial.items()},
                         "sweep.search": args.search, "sweep.scheduler": args.scheduler,
                         "sweep.objective": args.objective, "sweep.num_samples": args.samples,
                         "sweep.concurrent_trials": slots.concurrent})
        tracking.artifact(args.space)
        # Trials run in Tune's own working directories: every path absolute, the same MLflow store.
        shared = {"tracking.uri": tracking.uri} if tracking.enabled else {}
        if not cfg.model.source_checkpoint:  # one source model for every trial
            print("== sweep source model", flush=True)
            shared["model.source_checkpoint"] = str(train_source(cfg, RunStore(str(sweep_dir.path)), tracking.logger))
        if OBJECTIVES[args.objective][0] in VALIDATOR_METRICS and not cfg.validation.images:
            shared["validation.images"] = VALIDATOR_IMAGES  # the objective needs them
        best_base = with_values(with_absolute_paths(cfg), shared)  # the job's config + the shared source model
        base = with_values(best_base, {"resources.num_actors": slots.actors, "train.num_workers": slots.workers})
        setup = TrialSetup(base, space.trial, str(sweep_dir.path), tracking.run_id)
        trainable = tune.with_resources(tune.with_parameters(adapt_trial, setup=setup), {"cpu": TRIAL_CPUS})
        results = make_tuner(args, trainable, base, space, slots.concurrent, cfg.seed).fit()
        finished = sum(1 for r in results if r.error or (r.metrics or {}).get("done"))  # ASHA's stops are done
        expected = expected_trials(space, args.search, args.samples)
        if finished < expected:  # Ctrl-C: Tune saved the sweep and returned early
            raise Interrupted(f"sweep interrupted: {finished} of {expected} trials finished; the same command "
                              "resumes it")
        summary = summarise(results, space, metric, mode)
        summary.update(objective=args.objective, uses_target_labels=uses_labels, search=args.search,
                       scheduler=args.scheduler, num_samples=args.samples, seed=cfg.seed)
        atomic_write_json(sweep_dir.summary, summary)
        print_table(summary, space)
        if summary["best"] is None:
            raise SisrayError(f"no trial of the sweep in {sweep_dir.path} finished without error: "
                              f"see {sweep_dir.summary}")
        save_config(trial_config(best_base, {}, summary["best"]["params"], str(sweep_dir.best_run)),
                    sweep_dir.best_config)
        tracking.metrics({f"best/{metric}": summary["best"][metric],
                          **{f"rank_correlation/{k}": v for k, v in summary["rank_correlation_with_target_miou19"].items()
                             if v is not None}})
        write_validator_table(summary, sweep_dir.validator_table, sweep_dir.validator_figure)
        for artifact in (sweep_dir.summary, sweep_dir.best_config, sweep_dir.validator_table,
                         sweep_dir.validator_figure):
            if artifact.is_file():
                tracking.artifact(artifact)
        close_stopped_trials(tracking)
    print(f"\nbest trial {summary['best']['trial_id']} ({metric} = {summary['best'][metric]:.4f}): "
          f"{sweep_dir.best_config}\nrun it in full: python jobs/adapt.py --config {sweep_dir.best_config}\n"
          f"{tracking.where()}")


def write_validator_table(summary: dict, table: Path, figure: Path) -> None:
    """The trials' label-free statistics beside their target-val mIoU: a CSV row per trial and, where
    mIoU is known, one scatter per statistic (the study of which statistic tracks mIoU)."""
    import csv

    columns = [k for k in LABEL_FREE if any(k in t for t in summary["trials"])]
    table.parent.mkdir(parents=True, exist_ok=True)
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial_id", "rounds", "target_val_miou19", *columns])
        for t in summary["trials"]:
            writer.writerow([t["trial_id"], t["rounds"], t.get("target_val_miou19", ""), *(t.get(k, "") for k in columns)])
    known = [t for t in summary["trials"] if "target_val_miou19" in t]
    if not known or not columns:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    across = min(4, len(columns))
    fig, axes = plt.subplots(-(-len(columns) // across), across, figsize=(3.2 * across, 2.8 * -(-len(columns) // across)),
                             squeeze=False)
    correlation = summary["rank_correlation_with_target_miou19"]
    for ax, column in zip(axes.flat, columns):
        points = [(t[column], 100 * t["target_val_miou19"]) for t in known if column in t]
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=14)
        rho = correlation.get(column)
        ax.set_title(f"{column} (rho {rho:.2f})" if rho is not None else column, fontsize=8)
        ax.set_ylabel("target-val mIoU19", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(figure, dpi=100)
    plt.close(fig)


def close_stopped_trials(tracking) -> None:
    """Child runs of trials that ASHA stopped are still RUNNING in MLflow: mark them KILLED."""
    if not tracking.logger:
        return
    client = tracking.logger.client

    def close() -> None:
        for child in client.search_runs([tracking.experiment_id], filter_string=(
                f"tags.mlflow.parentRunId = '{tracking.run_id}' and attributes.status = 'RUNNING'")):
            client.set_tag(child.info.run_id, "sisray.stopped_early", "true")
            client.set_terminated(child.info.run_id, "KILLED")

    tracking.logger.send("status KILLED of stopped trials", close)


def spearman(x: list[float], y: list[float]) -> float | None:
    """Rank correlation (ties share their mean rank); None with fewer than 3 pairs or a constant side."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None

    def ranks(values: list[float]) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        out = np.empty(len(values))
        out[np.argsort(values, kind="stable")] = np.arange(len(values))
        for value in np.unique(values):
            out[values == value] = out[values == value].mean()
        return out

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])
