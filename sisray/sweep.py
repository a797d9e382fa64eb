"""Hyperparameter sweeps of LSE on Ray Tune: search spaces, the trial, the objective.

A search space (tune_spaces/*.yaml) names dotted config keys and their distributions, and the
overrides that shorten every trial:

    space:
      lse.threshold.estimator: {choice: [cutoff_image, window, quantile]}
      lse.scale: {uniform: [1.5, 3.0]}
    trial:
      lse.p_max: 0.3

Each trial is a whole adaptation (rounds.run) in SWEEP/trials/<trial id>/, from one source model
shared by the sweep, reporting once per round so ASHA can stop it early. The default objective
reads no target label: the information of the final model's softmax on target images (see
`stages.evaluate.label_free`); target-val mIoU is only used when asked for, and the sweep's MLflow
run then says so.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import numpy as np

from sisray.config import Config, config_from_dict, key_type, read_yaml, set_value
from sisray.errors import ConfigError

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
# Keys a sweep cannot vary: the source model is trained once per sweep, and where or how fast a
# trial runs is the sweep's business.
FIXED_KEYS = ("data.", "model.", "train.source_epochs", "train.oracle", "run_dir", "tracking.", "resources.")
# name: (metric reported to Tune, mode, reads target labels)
OBJECTIVES = {
    "information": ("information", "max", False),
    "target_miou": ("target_val_miou19", "max", True),
}
SEARCHES = ("random", "grid", "optuna")


@dataclass(frozen=True)
class Dimension:
    key: str
    kind: str  # one of DISTRIBUTIONS
    values: tuple  # choice/grid: the values; uniform/loguniform/randint: (low, high), both included


@dataclass(frozen=True)
class Space:
    path: str
    dimensions: tuple[Dimension, ...]
    trial: dict[str, Any]  # dotted key -> value, applied to every trial

    def describe(self) -> dict[str, str]:
        """One line per dimension, for MLflow params and the printed table."""
        return {d.key: f"{d.kind}{list(d.values)}" for d in self.dimensions}


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _takes_floats(hint: Any) -> bool:
    return hint is float or (get_origin(hint) is not Literal and float in get_args(hint))


def _dimension(path: str, key: str, spec: Any) -> Dimension:
    where = f"{path}: space.{key}"
    if any(key.startswith(k) if k.endswith(".") else key == k for k in FIXED_KEYS):
        raise ConfigError(f"{where}: this key cannot be swept (the sweep shares one source model and decides "
                          "resources and tracking itself); set it with --set for every trial")
    try:
        hint = key_type(key)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: expected one of {{{': ..., '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("choice", "grid"):
        return Dimension(key, kind, tuple(values))
    if len(values) != 2 or not all(_numeric(v) for v in values) or not values[0] < values[1]:
        raise ConfigError(f"{where}: {kind} needs [low, high] with low < high, got {values!r}")
    if kind == "loguniform" and values[0] <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {values[0]}")
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        raise ConfigError(f"{where}: randint needs integer bounds, got {values!r}")
    if kind in ("uniform", "loguniform") and not _takes_floats(hint):
        raise ConfigError(f"{where}: {key} takes {getattr(hint, '__name__', hint)} values; use randint, choice "
                          f"or grid")
    return Dimension(key, kind, tuple(values))


def load_space(path: str | Path, base: dict) -> Space:
    """Read and validate a search space against the config schema: every key exists and may be
    swept, every distribution is well formed, and every choice, grid value and range end gives a
    valid config together with `base` (the job's raw config) and the trial overrides."""
    raw = read_yaml(path)
    unknown = set(raw) - {"space", "trial"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}; expected space, trial")
    if not isinstance(raw.get("space"), dict) or not raw["space"]:
        raise ConfigError(f"{path}: expected a non-empty mapping `space:` of dotted config keys to distributions")
    trial = raw.get("trial") or {}
    if not isinstance(trial, dict):
        raise ConfigError(f"{path}: `trial:` must map dotted config keys to values, got {trial!r}")
    for key in trial:
        try:
            key_type(str(key))
        except ConfigError as exc:
            raise ConfigError(f"{path}: trial.{key}: {exc}") from None
    space = Space(str(path), tuple(_dimension(str(path), str(k), v) for k, v in raw["space"].items()), dict(trial))
    try:
        trial_config(base, space.trial, {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: the trial overrides: {exc}") from None
    for d in space.dimensions:
        for value in d.values:
            try:
                trial_config(base, space.trial, {d.key: value})
            except ConfigError as exc:
                raise ConfigError(f"{path}: space.{d.key}: {value!r} is not a valid value: {exc}") from None
    return space


def trial_config(base: dict, trial: dict[str, Any], params: dict[str, Any], run_dir: str | None = None) -> Config:
    """The validated config of one trial: base <- trial overrides <- sampled params [<- run_dir]."""
    raw = copy.deepcopy(base)
    for key, value in [*trial.items(), *params.items()]:
        set_value(raw, key, value)
    if run_dir:
        raw["run_dir"] = run_dir
    return config_from_dict(raw)


def param_space(space: Space, search: str) -> dict:
    """Ray Tune's param_space for a search algorithm ("random", "grid" or "optuna")."""
    from ray import tune

    if search not in SEARCHES:
        raise ConfigError(f"--search {search!r}: expected one of {', '.join(SEARCHES)}")
    out = {}
    for d in space.dimensions:
        if search == "grid" and d.kind not in ("choice", "grid"):
            raise ConfigError(f"{space.path}: space.{d.key} is {d.kind}: --search grid needs choice or grid values")
        if search == "optuna" and d.kind == "grid":
            raise ConfigError(f"{space.path}: space.{d.key} is a grid: use choice with --search optuna, "
                              "or --search grid/random")
        if d.kind == "grid" or (search == "grid" and d.kind == "choice"):
            out[d.key] = tune.grid_search(list(d.values))
        elif d.kind == "choice":
            out[d.key] = tune.choice(list(d.values))
        elif d.kind == "uniform":
            out[d.key] = tune.uniform(*d.values)
        elif d.kind == "loguniform":
            out[d.key] = tune.loguniform(*d.values)
        else:
            out[d.key] = tune.randint(d.values[0], d.values[1] + 1)  # Tune's upper bound is exclusive
    return out


def search_algorithm(search: str, seed: int, concurrent: int):
    """The searcher, seeded (the same seed proposes the same trials), running at most `concurrent`
    trials at once (Tune ignores max_concurrent_trials for its basic generator)."""
    if search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=concurrent, random_state=seed)


# ------------------------------------------------------------------------------- the trial

@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares (picklable)."""
    base: dict  # the job's raw config with the shared source model
    trial: dict[str, Any]  # the space's trial overrides
    sweep_dir: str
    parent_run_id: str | None
    cpus_per_trial: float


def trial_metrics(block: dict) -> dict[str, float]:
    """What a round reports to Tune: the label-free statistics and, for reporting, target-val mIoU."""
    evaluation = block["evaluation"]
    metrics = {"round": block["round"], "target_val_miou19": evaluation["miou19"],
               "target_val_miou": evaluation["miou"], "selected_images": block["selected_images"],
               "patches": block["patches"]}
    metrics.update(evaluation.get("label_free", {}))
    return {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}


def adapt_trial(params: dict, setup: TrialSetup) -> None:
    """A Tune trial: one adaptation in SWEEP/trials/<trial id>/, reported after every round. A
    restored trial continues its run directory and reports only rounds Tune has not seen."""
    from ray import tune

    from sisray import rounds
    from sisray.config import save_config
    from sisray.storage import RunStore
    from sisray.tracking import Tracking

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(setup.base, setup.trial, params, str(Path(setup.sweep_dir) / "trials" / trial_id))
    store = RunStore(cfg.run_dir)
    state = rounds.RunState(store, cfg)
    store.local.mkdir(parents=True, exist_ok=True)
    save_config(cfg, store.local / "config.yaml")
    state.save()
    tracking = Tracking(cfg, "tune_trial", resume_run_id=state.mlflow_run_id, parent_run_id=setup.parent_run_id,
                        tags={"sisray.trial_id": trial_id})
    state.mlflow_run_id = tracking.run_id
    restored = tune.get_checkpoint()
    reported = 0
    if restored:
        with restored.as_directory() as folder:
            reported = json.loads((Path(folder) / "round.json").read_text())["round"]

    def report(block: dict) -> None:
        if block["round"] <= reported:
            return
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "round.json").write_text(json.dumps({"round": block["round"]}))
            tune.report(trial_metrics(block), checkpoint=tune.Checkpoint.from_directory(tmp))

    last_stage = f"round_{len(rounds.schedule(cfg.lse)):02d}/log"
    try:
        rounds.run(cfg, state, tracking, on_round=report)
    except BaseException:
        # Tune stops a trial once it reports its last round (the scheduler's max_t), which can land
        # after that round's last stage: a trial whose every stage finished is not a failed one.
        tracking.finish("FINISHED" if state.finished(last_stage) else "FAILED")
        raise
    tracking.finish("FINISHED")


# ------------------------------------------------------------------------------- resources

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
