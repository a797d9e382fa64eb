"""A sweep's trial: one whole adaptation (rounds.run) in SWEEP/trials/<trial id>/ from the sweep's
shared source model (and the source stages of an earlier trial of the same source-side config),
reporting once per round so ASHA can stop it early; and how many trials,
actors and workers the cluster holds at once.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sisray.config import Config
from sisray.errors import ConfigError
from sisray.metrics import MIOU_KEYS
from sisray.sweep.space import trial_config

ROUND_REPORTED = "round.json"  # the trial's Tune checkpoint: the last round it reported


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares, decided on the driver (picklable)."""
    base: Config  # the job's config (absolute paths) with the shared source model and the trial's resources
    trial: dict[str, Any]  # the space's trial overrides
    sweep_dir: str
    parent_run_id: str | None


def trial_metrics(block: dict) -> dict[str, float]:
    """What a round reports to Tune: the label-free statistics and, for reporting, target-val mIoU."""
    evaluation = block["evaluation"]
    metrics = {"round": block["round"], **{f"target_val_{k}": evaluation.get(k) for k in MIOU_KEYS},
               "selected_images": block["selected_images"], "patches": block["patches"]}
    metrics.update(evaluation.get("label_free", {}))
    metrics.update({f"validator_{k}": v for k, v in evaluation.get("validators", {}).items()})
    return {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}


def adapt_trial(params: dict, setup: TrialSetup) -> None:
    """A Tune trial: one adaptation in SWEEP/trials/<trial id>/, reported after every round. A
    restored trial continues its run directory and reports only rounds Tune has not seen."""
    from ray import tune

    from sisray import rounds
    from sisray.job import Job
    from sisray.rundir import SweepDir, round_name

    trial_id = tune.get_context().get_trial_id()
    sweep = SweepDir(Path(setup.sweep_dir))
    cfg = trial_config(setup.base, setup.trial, params, str(sweep.trial(trial_id)))
    # not locked: the sweep's lock covers its trials, and Tune runs each trial once at a time (a trial
    # restored on another node must not wait for the lock its lost node left)
    job = Job(cfg, "tune_trial", stages=True, locked=False, parent_run_id=setup.parent_run_id,
              tags={"sisray.trial_id": trial_id})
    restored = tune.get_checkpoint()
    reported = 0
    if restored:
        with restored.as_directory() as folder:
            reported = json.loads((Path(folder) / ROUND_REPORTED).read_text())["round"]

    def report(block: dict) -> None:
        if block["round"] <= reported:
            return
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / ROUND_REPORTED).write_text(json.dumps({"round": block["round"]}))
            tune.report(trial_metrics(block), checkpoint=tune.Checkpoint.from_directory(tmp))

    # Tune stops a trial once it reports its last round (the scheduler's max_t), which can land
    # after that round's last stage: a trial whose every stage finished is not a failed one.
    last_stage = f"{round_name(len(rounds.schedule(cfg.lse)))}/log"
    with job.started(finished_anyway=lambda: job.state.finished(last_stage)) as tracking:
        rounds.run(cfg, job.state, tracking, on_round=report, shared_source=sweep.shared_source)


@dataclass(frozen=True)
class Slots:
    concurrent: int  # trials at once
    actors: int  # Ray Data actors per trial
    workers: int  # Ray Train workers per trial


TRIAL_CPUS = 0.5  # the trial's own process: it only drives Ray Data and Ray Train
TASK_CPUS = 1.0  # left free inside a trial's share for Ray Data's read tasks (1 CPU each)


def trial_slots(cfg: Config, cpus: float, gpus: float, concurrent: int | None = None) -> Slots:
    """How many trials run at once and how many actors/workers each gets, so that trials, Ray Data
    actors, their read tasks and Train workers never wait on each other (a silent hang otherwise).
    On GPUs: one GPU per trial by default (its actors and workers take turns on it). On CPUs: the
    share of a trial holds the trial itself, its actors and one free CPU for Ray Data's tasks."""
    if gpus >= 1 and cfg.resources.device != "cpu":
        per = max(cfg.resources.num_actors, cfg.train.num_workers, 1)
        n = concurrent or max(1, int(gpus) // per)
        return Slots(n, cfg.resources.num_actors or per, cfg.train.num_workers or per)
    n = concurrent or 1
    share = cpus / n
    actors = cfg.resources.num_actors or int((share - TRIAL_CPUS - TASK_CPUS) / cfg.resources.cpus_per_actor)
    workers = cfg.train.num_workers or min(int(share), int((share - TRIAL_CPUS) / cfg.resources.cpus_per_worker))
    if actors < 1 or workers < 1:
        raise ConfigError(f"{n} concurrent trial(s) on {cpus:g} CPUs leave {share:g} CPUs each: not enough for "
                          f"a trial ({TRIAL_CPUS} CPU), one actor and Ray Data's tasks; run fewer at once")
    return Slots(n, actors, workers)
