"""Stage specs: what crosses a Ray boundary is the typed Config plus the values the driver resolved
for the stage (no Ray started here)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from sisray.cluster import Actors, Workers
from sisray.config import Config, load_config
from sisray.stages.patch_pass import PatchSpec, patch_spec
from sisray.stages.train import round_spec
from sisray.stages.train_loop import TrainSpec


CPU = Workers(count=2, use_gpu=False, cpus_each=0.5, threads_each=1)


def _config(root: Path, *extra: str) -> Config:
    return load_config(None, ["data.target.name=synthetic", f"data.target.root={root}", "run_dir=relative/run",
                              "model.width=0.0625", "model.init=random", *extra])


def test_a_round_spec_carries_the_rounds_rate_warmup_and_batchnorm_resolved(tmp_path):
    cfg = _config(tmp_path, "train.lr=1e-3", "train.round_lr=2e-4", "train.round_warmup=0.25",
                  "train.round_bn=frozen", "lse.ema_decay=0.9")
    spec = round_spec(cfg, 3, 40, "/models/previous.pt", "/models/train_state.pt", "/run/round_03/patches", CPU, None)
    assert isinstance(spec, TrainSpec) and isinstance(spec.config, Config)
    assert (spec.stage, spec.round, spec.steps, spec.lr, spec.warmup_steps) == ("round_03", 3, 40, 2e-4, 10)
    assert spec.frozen_bn and spec.ema_decay == 0.9 and spec.init == "/models/previous.pt"
    assert (spec.patches, spec.carried_state) == ("/run/round_03/patches", "/models/train_state.pt")
    assert round_spec(_config(tmp_path, "train.lr=1e-3"), 1, 8, "m", None, "p", CPU, None).lr == 1e-3  # rounds as lr
    assert round_spec(_config(tmp_path), 1, 8, "m", None, "p", CPU, None).lr is None  # None: the model's recipe
    assert pickle.loads(pickle.dumps(spec)) == spec


def test_batches_are_loaded_ahead_on_gpu_workers_unless_configured():
    gpu = Workers(count=2, use_gpu=True, cpus_each=0.5, threads_each=1)
    assert round_spec(_config(Path("d")), 1, 8, "m", None, "p", gpu, None).prefetch == 2
    assert round_spec(_config(Path("d")), 1, 8, "m", None, "p", CPU, None).prefetch == 0  # the cores are taken
    assert round_spec(_config(Path("d"), "train.prefetch=3"), 1, 8, "m", None, "p", CPU, None).prefetch == 3


def test_a_patch_spec_carries_the_scales_thresholds_and_absolute_paths(small_benchmark, fcn_checkpoint, monkeypatch):
    monkeypatch.chdir(small_benchmark.parent)
    cfg = _config(Path(small_benchmark.name), "lse.scale=1.5")
    actors = Actors(count=2, use_gpu=False, threads_each=1, batch_size=4, resources={"num_cpus": 0.5})
    spec = patch_spec(cfg, fcn_checkpoint, actors, [2, 0, 1, 3], np.linspace(0.1, 0.9, 19), 2, figure=True)
    assert isinstance(spec, PatchSpec) and spec.scales == (1.5,) and spec.round == 2
    assert spec.tau == tuple(np.linspace(0.1, 0.9, 19)) and all(type(t) is float for t in spec.tau)
    assert spec.config.data.target.root == str(small_benchmark) and Path(spec.config.run_dir).is_absolute()
    assert spec.checkpoint == str(fcn_checkpoint) and spec.diagnose  # the benchmark's target train has labels
    assert spec.figure == (2, 0, 1)  # the first selected images, in selection order
    assert patch_spec(cfg, fcn_checkpoint, actors, [2, 0], np.zeros(19), 2, figure=False).figure == ()
    assert pickle.loads(pickle.dumps(spec)) == spec
