"""Shared fixtures. Ray is started once per session (starting it costs seconds): token authentication
off, no dashboard, a short temp dir, logical CPU over-subscription, and a hard timeout on every
test marked `ray` (the failure mode of Ray on a small machine is a silent hang)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # inherited by Ray's processes
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

RAY_TEST_TIMEOUT = 240


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("ray") and not item.get_closest_marker("timeout"):
            # method=thread ends the whole run on a hang instead of leaving CI waiting
            item.add_marker(pytest.mark.timeout(RAY_TEST_TIMEOUT, method="thread"))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    temp_dir = tempfile.mkdtemp(prefix="sr", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir,
             configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


SMALL_SPEC = dict(seed=3, n_source=6, n_target_train=4, n_target_val=3)


@pytest.fixture(scope="session")
def small_benchmark(tmp_path_factory) -> Path:
    """A tiny synthetic benchmark written once per session by the real generator."""
    from sisray.datasets.synthetic import SyntheticSpec, generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, SyntheticSpec(**SMALL_SPEC), processes=1)
    return root


@pytest.fixture(scope="session")
def fcn_checkpoint(tmp_path_factory) -> Path:
    """A small random VGG16-FCN8s state dict whose prediction is not uniform (its score layers,
    zero at initialisation, get random weights): a stand-in source model."""
    import torch

    from sisray.models import build_model

    torch.manual_seed(0)
    model = build_model("fcn8s_vgg16", width=0.0625)
    with torch.no_grad():
        model.score_fr.weight.normal_(0, 0.05)
        model.score_fr.bias.normal_(0, 1.0)
    path = tmp_path_factory.mktemp("fcn") / "model.pt"
    torch.save(model.state_dict(), path)
    return path


def set_args(overrides: list[str]) -> list[str]:
    """A job's command-line arguments for config overrides: --set k=v for each."""
    return [a for o in overrides for a in ("--set", o)]


def small_adaptation(benchmark: Path, source: Path) -> list[str]:
    """Settings of the tests' two-round job: 64x32 images, a 1/16-width FCN adapted from a stand-in
    source model, global selection of half and then three quarters of the 4 target images, each
    round's model judged by the safeguard, its patches relabelled by an online teacher, mixed with
    source classes (ClassMix) and jittered."""
    return [f"data.source.root={benchmark}", f"data.target.root={benchmark}", "data.source.size=[64, 36]",
            "data.target.size=[64, 32]", "model.name=fcn8s_vgg16", "model.width=0.0625", "lse.target_bn=false",
            f"model.source_checkpoint={source}", "train.batch_size=4", "train.epochs_per_round=2",
            "train.checkpoint_every=1", "lse.selection=global", "lse.p0=0.5", "lse.p_step=0.25", "lse.p_max=0.75",
            "lse.patches_per_image=2", "lse.safeguard=true", "lse.classmix=true", "train.photometric_patches=true",
            "lse.online_teacher=0.9", "tracking.enabled=false"]


@pytest.fixture(scope="session")
def small_ablation(small_benchmark, fcn_checkpoint, tmp_path_factory) -> tuple[Path, dict]:
    """`bench/ablation.py` for seed 0, the default variant only, on the small job: (its output folder,
    its last line). Its run, `seed_0/lse_fl`, is the tests' uninterrupted reference run of the small
    job (tests/test_storage.py)."""
    out = tmp_path_factory.mktemp("ablation")
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "ablation.py"), "--out", str(out), "--seeds", "0",
         "--variants", "lse_fl",
         *set_args(small_adaptation(small_benchmark, fcn_checkpoint))],
        cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads(done.stdout.strip().splitlines()[-1])
