"""Hyperparameter sweeps of LSE on Ray Tune (jobs/tune.py): search spaces (space.py), the trial and
its resources (trial.py), the driver and its summary (driver.py)."""

from sisray.sweep.driver import OBJECTIVES, SCHEDULERS, SweepArgs, run_sweep, spearman, summarise
from sisray.sweep.space import SEARCHES, Space, load_space, param_space, search_algorithm, trial_config
from sisray.sweep.trial import trial_metrics, trial_slots

__all__ = ["OBJECTIVES", "SCHEDULERS", "SEARCHES", "Space", "SweepArgs", "load_space", "param_space", "run_sweep",
           "search_algorithm", "spearman", "summarise", "trial_config", "trial_metrics", "trial_slots"]
