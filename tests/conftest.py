"""Shared fixtures. Ray is started once per session (starting it costs seconds): token authentication
off, no dashboard, a short temp dir, logical CPU over-subscription, and a hard timeout on every
test marked `ray` (the failure mode of Ray on a small machine is a silent hang).

`make test` runs the tests in two pytest-xdist workers. The benchmark, the stand-in source model and
the small job's reference run are made once per test run whichever worker asks first
(`made_once`). The end-to-end tests are collected first and handed out one at a time (the Makefile's
--maxschedchunk 1), so that both workers run them and neither ends with a queue of them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from filelock import FileLock

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
    # the slowest first, in their order otherwise (see above)
    items.sort(key=lambda item: (not item.get_closest_marker("slow"), not item.get_closest_marker("ray")))


def made_once(tmp_path_factory, name: str, make) -> Path:
    """The folder `name`, filled by `make(folder)` once per test run: by the first xdist worker that
    asks (the others wait at its lock and use it), or once per session without xdist."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder = root / f"made-{name}"
    with FileLock(f"{folder}.lock"):
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


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
    """A tiny synthetic benchmark written once per test run by the real generator."""
    from sisray.datasets.synthetic import SyntheticSpec, generate

    return made_once(tmp_path_factory, "synthetic", lambda root: generate(root, SyntheticSpec(**SMALL_SPEC),
                                                                          processes=1))


@pytest.fixture(scope="session")
def fcn_checkpoint(tmp_path_factory) -> Path:
    """A small random VGG16-FCN8s state dict whose prediction is not uniform (its score layers,
    zero at initialisation, get random weights): a stand-in source model."""
    import torch

    from sisray.models import build_model

    def make(folder: Path) -> None:
        torch.manual_seed(0)
        model = build_model("fcn8s_vgg16", width=0.0625)
        with torch.no_grad():
            model.score_fr.weight.normal_(0, 0.05)
            model.score_fr.bias.normal_(0, 1.0)
        torch.save(model.state_dict(), folder / "model.pt")

    return made_once(tmp_path_factory, "fcn", make) / "model.pt"


def set_args(overrides: list[str]) -> list[str]:
    """A job's command-line arguments for config overrides: --set k=v for each."""
    return [a for o in overrides for a in ("--set", o)]


def small_adaptation(benchmark: Path, source: Path) -> list[str]:
    """Settings of the tests' two-round job: 64x32 images, a 1/16-width FCN adapted from a stand-in
    source model, global selection of half and then three quarters of the 4 target images, each
    round's model judged by the safeguard (its consistency rule: the validators of each model's
    evaluation pass, on the 4 target-train images), its patches relabelled by an online teacher, mixed
    with source classes (ClassMix) and jittered, its source images in the patches' look (FDA) with each
    class recoloured on its own."""
    return [f"data.source.root={benchmark}", f"data.target.root={benchmark}", "data.source.size=[64, 36]",
            "data.target.size=[64, 32]", "model.name=fcn8s_vgg16", "model.width=0.0625", "lse.target_bn=false",
            f"model.source_checkpoint={source}", "train.batch_size=4", "train.epochs_per_round=2",
            "train.checkpoint_every=1", "lse.selection=global", "lse.p0=0.5", "lse.p_step=0.25", "lse.p_max=0.75",
            "lse.patches_per_image=2", "lse.safeguard=true", "lse.classmix=true",
            "train.photometric_patches=true", "lse.online_teacher=0.9", "lse.fourier_style=0.05",
            "train.class_colours=true", "tracking.enabled=false"]


@pytest.fixture(scope="session")
def small_ablation(small_benchmark, fcn_checkpoint, tmp_path_factory) -> tuple[Path, dict]:
    """`bench/ablation.py` for seed 0, the default variant only, on the small job: (its output folder,
    its last line). Its run, `seed_0/lse_fl`, is the tests' uninterrupted reference run of the small
    job (tests/test_storage.py)."""
    def make(out: Path) -> None:
        done = subprocess.run(
            [sys.executable, str(REPO / "bench" / "ablation.py"), "--out", str(out), "--seeds", "0",
             "--variants", "lse_fl", *set_args(small_adaptation(small_benchmark, fcn_checkpoint))],
            cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        assert done.returncode == 0, done.stderr[-3000:]
        (out / "last_line.json").write_text(done.stdout.strip().splitlines()[-1])

    out = made_once(tmp_path_factory, "ablation", make)
    return out, json.loads((out / "last_line.json").read_text())
