"""Bad input to the adaptation job, as a user meets it: each case exits 2 with a message naming the
file, key or value, and leaves the run directory exactly as it was: a run being resumed keeps every
byte of its files, a new run directory is not even created. Then a disk that fills up mid-stage."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from layouts import make_cityscapes, make_gta5, save_rgb, write_pickle_with_code

from sisray import rounds, run_state
from sisray.cli import DEFAULT_CONFIG
from sisray.config import load_config, save_config
from sisray.errors import StorageError
from sisray.models import build_model
from sisray.storage import RunStore
from sisray.tracking import Tracking

REPO = Path(__file__).resolve().parents[1]


def base_overrides(tmp: Path) -> list[str]:
    return ["data.source.name=gta5", f"data.source.root={tmp / 'gta5'}", "data.source.size=[40, 24]",
            "data.target.name=cityscapes", f"data.target.root={tmp / 'cityscapes'}", "data.target.size=[40, 24]",
            "data.target.val_size=[40, 24]", "model.name=fcn8s_vgg16", "model.width=0.0625", "lse.target_bn=false", f"model.source_checkpoint={tmp / 'source.pt'}",
            "tracking.enabled=false"]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under `folder` (hidden ones too) with its content hash and modification time."""
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def previous_run(tmp_path, fcn_checkpoint):
    """Datasets in the GTA5 and Cityscapes layouts, a source model, and a run directory with two finished
    stages (their files and digests in state.json) made with the same config."""
    make_gta5(tmp_path / "gta5", n=3)
    make_cityscapes(tmp_path / "cityscapes", "train", n=3)
    make_cityscapes(tmp_path / "cityscapes", "val", n=2, seed=1)
    shutil.copy(fcn_checkpoint, tmp_path / "source.pt")
    run_dir = tmp_path / "run"
    cfg = load_config(DEFAULT_CONFIG, [*base_overrides(tmp_path), f"run_dir={run_dir}"])  # the job's default
    state = run_state.RunState(RunStore(run_dir), cfg)
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    state.run("source/eval", lambda: (run_dir / "source").mkdir() or (run_dir / "source" / "eval.json").write_text("{}"))
    state.run("round_01/score", lambda: (run_dir / "round_01").mkdir() or
              (run_dir / "round_01" / "scores.parquet").write_bytes(b"PAR1 scores PAR1"))
    return tmp_path


def run_adapt(monkeypatch, capsys, *args: str) -> str:
    """jobs/adapt.py in this process (its checks are cheap; a subprocess would import torch each time);
    returns stderr after asserting it exited 2 before its work began (the run's config saved, Ray)."""
    def no_work(*args, **kwargs):
        raise AssertionError("the job went past its input checks")
    monkeypatch.setattr("sisray.job.Job.started", no_work)
    monkeypatch.setattr("sisray.cluster.start_ray", no_work)
    monkeypatch.setattr(sys, "argv", ["jobs/adapt.py", *args])
    monkeypatch.delenv("SISRAY_SET", raising=False)
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / "jobs" / "adapt.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def empty(root: Path) -> None:
    for f in [p for p in root.rglob("*") if p.is_file()]:
        f.unlink()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def checkpoint_of(name: str, num_classes: int):
    def write(path: Path) -> None:
        torch.save(build_model(name, num_classes, width=0.0625).state_dict(), path)
    return write


def pickle_with_code(path: Path) -> None:
    write_pickle_with_code(path, path.parent / "pwned")


CITY_TRAIN = "cityscapes/leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
CITY_VAL_LABEL = "cityscapes/gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png"
# (what breaks, the path it breaks under the test folder, how, what the message must say)
DATA_CASES = {
    "missing source root": ("gta5", shutil.rmtree, r"gta5 root not found: {tmp}/gta5"),
    "missing target root": ("cityscapes", shutil.rmtree, r"cityscapes root not found: {tmp}/cityscapes"),
    "empty source root": ("gta5", empty, r"no images found under {tmp}/gta5"),
    "image without label": ("gta5/labels/00002.png", Path.unlink,
                            r"{tmp}/gta5/images/00002.png: image has no label"),
    "unreadable target image": (CITY_TRAIN, truncate, r"{tmp}/%s: unreadable image" % CITY_TRAIN),
    "RGB label where label IDs are expected": (
        CITY_VAL_LABEL, lambda p: save_rgb(p, np.zeros((24, 40, 3), np.uint8)),
        r"{tmp}/%s: label is 8-bit RGB; expected an 8-bit single-channel" % CITY_VAL_LABEL),
    "checkpoint of another class count": ("source.pt", checkpoint_of("fcn8s_vgg16", 16),
                                          r"{tmp}/source.pt does not fit FCN8s .*shapes differ.*score_fr"),
    "checkpoint of another model": ("source.pt", checkpoint_of("deeplabv2_r101", 19),
                                    r"{tmp}/source.pt does not fit FCN8s .*missing keys"),
    "a pickle with code as checkpoint": ("source.pt", pickle_with_code,
                                         r"{tmp}/source.pt: not a loadable PyTorch state dict"),
    "a text file as checkpoint": ("source.pt", lambda p: p.write_text("weights: none"),
                                  r"{tmp}/source.pt: not a loadable PyTorch state dict"),
    "missing checkpoint": ("source.pt", Path.unlink, r"checkpoint not found: {tmp}/source.pt"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_or_checkpoint_stops_the_job_before_it_touches_the_run_directory(
        previous_run, monkeypatch, capsys, case):
    tmp = previous_run
    where, damage, message = DATA_CASES[case]
    before = snapshot(tmp / "run")
    damage(tmp / where)
    args = [f"--set={o}" for o in base_overrides(tmp)]
    err = run_adapt(monkeypatch, capsys, *args, "--run-dir", str(tmp / "run"))  # resuming the run
    assert re.search(message.format(tmp=tmp), err), err
    assert snapshot(tmp / "run") == before
    assert run_adapt(monkeypatch, capsys, *args, "--run-dir", str(tmp / "new")) == err  # a new run
    assert not (tmp / "new").exists()
    assert not (tmp / "pwned").exists()  # the pickled command never ran


def test_target_batchnorm_statistics_on_a_model_without_batchnorm_stop_the_job_before_any_work(
        previous_run, monkeypatch, capsys):
    args = [f"--set={o}" for o in base_overrides(previous_run)] + ["--set=lse.target_bn=true"]
    err = run_adapt(monkeypatch, capsys, *args, "--run-dir", str(previous_run / "new"))
    assert "lse.target_bn = true, but model.name = fcn8s_vgg16 has no BatchNorm statistics" in err
    assert not (previous_run / "new").exists()


CONFIG_CASES = {
    "unknown key": (["--set", "lse.scael=2"], r"lse.scael"),
    "bad value": (["--set", "lse.scale=-1"], r"lse.scale = -1"),
    "wrong type": (["--set", "train.batch_size=two"], r"train.batch_size"),
    "unknown key in the file": (["--config", "{tmp}/bad.yaml"], r"{tmp}/bad.yaml.*lse.foo"),
    "another config than the run's": (["--set", "lse.p0=0.3"],
                                      r"{tmp}/run holds a run made with another config \(lse.p0 = 0.2 there, 0.3 now\)"),
    "--resume of a folder that is no run": (["--resume", "{tmp}/gta5"], r"--resume {tmp}/gta5: no config.yaml there"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_stops_the_job_before_it_touches_the_run_directory(previous_run, monkeypatch, capsys, case):
    tmp = previous_run
    raw = yaml.safe_load((tmp / "run" / "config.yaml").read_text())
    raw["lse"]["foo"] = 1
    (tmp / "bad.yaml").write_text(yaml.safe_dump(raw))
    extra, message = CONFIG_CASES[case]
    before = snapshot(tmp / "run")
    args = [f"--set={o}" for o in base_overrides(tmp)] + [a.format(tmp=tmp) for a in extra]
    err = run_adapt(monkeypatch, capsys, *args, "--run-dir", str(tmp / "run"))
    assert re.search(message.format(tmp=tmp), err), err
    assert snapshot(tmp / "run") == before


# ------------------------------------------------------------------ disk full (Ray)

@pytest.mark.ray
def test_a_disk_full_while_writing_patches_is_a_clear_error_and_leaves_the_state_as_it_was(
        ray_session, small_benchmark, fcn_checkpoint, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = load_config(None, [
        "data.source.name=synthetic", f"data.source.root={small_benchmark}", "data.source.size=[64, 36]",
        "data.target.name=synthetic", f"data.target.root={small_benchmark}", "data.target.size=[64, 32]",
        "model.name=fcn8s_vgg16", "model.width=0.0625", "lse.target_bn=false", f"model.source_checkpoint={fcn_checkpoint}", "lse.selection=global", "lse.p0=0.5",
        "lse.p_step=0", "lse.p_max=0.5", "lse.patches_per_image=2", "lse.threshold.bins=16", f"run_dir={run_dir}",
        "tracking.enabled=false"])

    def onto_a_full_disk(table, where, **kwargs):  # half a shard lands, then the device is full (as pyarrow says it)
        Path(where).write_bytes(b"PAR1" + bytes(100))
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    monkeypatch.setattr(pq, "write_table", onto_a_full_disk)
    state = run_state.RunState(RunStore(run_dir), cfg)
    with pytest.raises(StorageError) as err:
        rounds.run(cfg, state, Tracking(cfg, "adapt"))
    assert re.fullmatch(rf"stage round_01/patches: no space left writing to {run_dir} \(.*No space left on device.*\)\. "
                        r"Free space and run the same command again: it resumes from the last finished stage",
                        str(err.value)), err.value
    saved = json.loads((run_dir / "state.json").read_text())
    assert list(saved["finished"]) == ["source/classes", "source/narrow", "source/eval", "round_01/score",
                                      "round_01/select"]
    assert sorted(p.name for p in (run_dir / "round_01").iterdir()) == ["scores.parquet", "selection.json",
                                                                        "thresholds.json"]  # no partial shard
    resumed = run_state.RunState(RunStore(run_dir), cfg)  # every finished stage's files still verify
    assert resumed.data["finished"] == saved["finished"]


# ------------------------------------------------------------------ an unwritable run directory

def test_a_run_directory_that_becomes_unwritable_is_a_clear_error_and_stays_resumable(tmp_path, monkeypatch):
    """A stage that cannot write (permission, read-only file system), or a state.json that cannot be
    saved: an error naming the file and what to do; the finished stages stay recorded, and the same
    stage runs again once the directory is writable. (As root, chmod does not stop a write: the
    errors are raised as the OS raises them.)"""
    from sisray import storage

    cfg = load_config(None, [f"run_dir={tmp_path}"])
    state = run_state.RunState(RunStore(tmp_path), cfg)
    state.run("source/classes", lambda: storage.atomic_write_json(tmp_path / "source" / "classes.json", [0]))
    target = tmp_path / "round_01" / "selection.json"

    def denied():
        raise PermissionError(errno.EACCES, "Permission denied", str(target))
    with pytest.raises(StorageError) as err:
        state.run("round_01/select", denied)
    assert str(err.value) == (f"stage round_01/select: cannot write to {target} (Permission denied). Make {tmp_path} "
                              "writable and run the same command again: it resumes from the last finished stage")
    real_write = run_state.atomic_write_json

    def read_only(path, obj):
        raise OSError(errno.EROFS, "Read-only file system", str(Path(path).parent / ".state.json.x.tmp"))
    monkeypatch.setattr(run_state, "atomic_write_json", read_only)
    with pytest.raises(StorageError, match=rf"recording the run's state: cannot write to {tmp_path}/\.state\.json"
                                           r"\.x\.tmp \(Read-only file system\)\. Make"):
        state.run("round_01/select", lambda: storage.atomic_write_json(target, {}))
    monkeypatch.setattr(run_state, "atomic_write_json", real_write)
    assert list(json.loads((tmp_path / "state.json").read_text())["finished"]) == ["source/classes"]

    resumed = run_state.RunState(RunStore(tmp_path), cfg)  # writable again: the same command goes on
    assert resumed.finished("source/classes") and not resumed.finished("round_01/select")
    resumed.run("round_01/select", lambda: storage.atomic_write_json(target, {}))
    assert list(json.loads((tmp_path / "state.json").read_text())["finished"]) == ["source/classes", "round_01/select"]


def test_a_permission_error_outside_the_run_directory_is_not_taken_for_it(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}"])
    state = run_state.RunState(RunStore(tmp_path / "run"), cfg)

    def unreadable_dataset():
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "data" / "image.png"))
    with pytest.raises(PermissionError):
        state.run("source/eval", unreadable_dataset)
