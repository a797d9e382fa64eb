"""Search spaces of a sweep: read and checked against the config schema, turned into Ray Tune's.

A search space (tune_spaces/*.yaml) names dotted config keys and their distributions, and the
overrides that shorten every trial:

    space:
      lse.threshold.estimator: {choice: [cutoff_image, window, quantile]}
      lse.scale: {uniform: [1.5, 3.0]}
    trial:
      lse.p_max: 0.3

Every choice, grid value and range end is checked to give a valid config before any trial runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from sisray.config import Config, key_type, read_yaml, with_values
from sisray.errors import ConfigError

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
# Keys a sweep cannot vary: the source model is trained once per sweep, and where or how fast a
# trial runs is the sweep's business.
FIXED_KEYS = ("data.", "model.", "train.source_epochs", "train.source_schedule_epochs", "train.oracle", "run_dir", "tracking.", "resources.")
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


def load_space(path: str | Path, base: Config) -> Space:
    """Read and validate a search space against the config schema: every key exists and may be
    swept, every distribution is well formed, and every choice, grid value and range end gives a
    valid config together with `base` (the job's config) and the trial overrides."""
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


def trial_config(base: Config, trial: dict[str, Any], params: dict[str, Any], run_dir: str | None = None) -> Config:
    """The validated config of one trial: base <- trial overrides <- sampled params [<- run_dir]."""
    return with_values(base, {**trial, **params, **({"run_dir": run_dir} if run_dir else {})})


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


def expected_trials(space: Space, search: str, num_samples: int) -> int:
    """How many trials the sweep runs: each sample crosses every grid."""
    count = num_samples
    for d in space.dimensions:
        if d.kind == "grid" or (search == "grid" and d.kind == "choice"):
            count *= len(d.values)
    return count
