"""Run directories on S3 (a moto server on loopback stands in for it): push/pull, stale shards,
state.json last, readers of remote checkpoints and patch sets, and the adaptation job end to end:
killed on two machines (SIGKILL mid patch pass and mid retraining, then a finished stage's file cut
short), finished on a third as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import set_args, small_adaptation
from mlflow_server import free_port
from processes import stop_when
from sisray import storage
from sisray.errors import StorageError
from sisray.models import build_model, read_state_dict
from sisray.patch_set import read_rows
from sisray.storage import RunStore

REPO = Path(__file__).resolve().parents[1]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on loopback in its own process group, with a bucket `sisray`."""
    import pyarrow.fs as pafs

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, **CREDENTIALS})
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                fs.create_dir("sisray")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _uri(endpoint: str, path: str) -> str:
    return f"s3://sisray/{path}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_uri_keeps_its_query_when_joined():
    assert storage.join("s3://b/run?endpoint_override=h:1", "round_01", "model.pt") == \
        "s3://b/run/round_01/model.pt?endpoint_override=h:1"
    assert storage.join("runs/x", "a") == str(Path("runs/x/a"))


def test_push_and_pull_keep_a_remote_run_directory_in_step(s3_endpoint, tmp_path, monkeypatch):
    location = _uri(s3_endpoint, "step")
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "machine_a"))
    store = RunStore(location)
    store.pull()  # nothing there yet
    (store.local / "round_01" / "patches").mkdir(parents=True)
    for shard in range(3):
        (store.local / "round_01" / "patches" / f"part-{shard:05d}.parquet").write_bytes(b"shard %d" % shard)
    (store.local / "round_01" / "train").mkdir()
    (store.local / "round_01" / "train" / "ray.json").write_text("Ray Train's own: never copied")
    (store.local / "round_01" / ".scores.parquet.tmp").write_text("staging: never copied")
    (store.local / "state.json").write_text('{"finished": {"round_01/patches": 1.0}}')
    store.push()

    # a re-run stage writes fewer shards and another state of the same size
    (store.local / "round_01" / "patches" / "part-00002.parquet").unlink()
    (store.local / "round_01" / "patches" / "part-00001.parquet").write_bytes(b"SHARD 1")
    (store.local / "state.json").write_text('{"finished": {"round_01/patches": 2.0}}')
    store.push()

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "machine_b"))
    other = RunStore(location)
    assert other.local != store.local
    other.pull()
    assert _tree(other.local) == {"round_01/patches/part-00000.parquet": b"shard 0",
                                  "round_01/patches/part-00001.parquet": b"SHARD 1",
                                  "state.json": b'{"finished": {"round_01/patches": 2.0}}'}
    assert other.shared(other.local / "round_01" / "patches") == _uri(s3_endpoint, "step/round_01/patches")
    assert storage.list_files(other.shared(other.local / "round_01" / "patches"), ".parquet") == [
        _uri(s3_endpoint, f"step/round_01/patches/part-0000{i}.parquet") for i in (0, 1)]

    # a stale local copy (same sizes, older content) is replaced on pull
    (other.local / "state.json").write_text('{"finished": {"round_01/patches": 9.0}}')
    (other.local / "leftover.json").write_text("{}")
    other.pull()
    assert (other.local / "state.json").read_text() == '{"finished": {"round_01/patches": 2.0}}'
    assert not (other.local / "leftover.json").exists()


def test_a_failed_push_never_uploads_the_new_state(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path))
    store = RunStore(_uri(s3_endpoint, "failing"))
    store.local.mkdir(parents=True)
    (store.local / "state.json").write_text('{"finished": {}}')
    store.push()
    (store.local / "round_01").mkdir()
    (store.local / "round_01" / "selection.json").write_text("[1, 2]")
    (store.local / "state.json").write_text('{"finished": {"round_01/select": 0.1}}')
    real_upload = RunStore._upload

    def upload(self, name):
        if name == "round_01/selection.json":
            raise OSError("simulated: the connection dropped")
        real_upload(self, name)

    monkeypatch.setattr(RunStore, "_upload", upload)
    with pytest.raises(StorageError, match="failing.*cannot write.*connection dropped"):
        store.push()
    assert storage.read_bytes(storage.join(store.location, "state.json")) == b'{"finished": {}}'


def test_a_run_directory_on_s3_is_locked_by_one_job_at_a_time(s3_endpoint, monkeypatch):
    """The lock lives at the remote location (machines do not share their local copies); it is not
    pulled or pushed with the run's files."""
    from sisray.run_lock import LOCK, RunInUse, RunLock

    monkeypatch.setattr("sisray.run_lock.SETTLE_S", 0.1)
    location = _uri(s3_endpoint, "locked")
    first = RunLock(location, "adapt")
    first.acquire()
    assert json.loads(storage.read_bytes(storage.join(location, LOCK)))["owner"] == first.mine["owner"]
    with pytest.raises(RunInUse, match="the run directory is in use: s3://sisray/locked/.lock"):
        RunLock(location, "adapt").acquire()
    assert LOCK not in RunStore(location)._remote_files()
    first.release()
    assert not storage.is_file(storage.join(location, LOCK))
    second = RunLock(location, "adapt")
    second.acquire()
    second.release()


def test_workers_read_checkpoints_and_patch_sets_from_a_remote_run_directory(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path))
    store = RunStore(_uri(s3_endpoint, "readers"))
    model = build_model("fcn8s_vgg16", width=0.0625)
    (store.local / "source" / "checkpoint").mkdir(parents=True)
    torch.save(model.state_dict(), store.local / "source" / "checkpoint" / "model.pt")
    (store.local / "round_01" / "patches").mkdir(parents=True)
    rows = [{"index": i, "patch": p, "label_png": b"x"} for i in (3, 1) for p in (1, 0)]
    pq.write_table(pa.Table.from_pylist(rows[:2]), store.local / "round_01" / "patches" / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:]), store.local / "round_01" / "patches" / "part-00001.parquet")
    store.push()

    state = read_state_dict(store.shared(store.local / "source" / "checkpoint"))  # a folder holding model.pt
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    patches = read_rows(store.shared(store.local / "round_01" / "patches"))
    assert [(r["index"], r["patch"]) for r in patches] == [(1, 0), (1, 1), (3, 0), (3, 1)]
    from sisray.errors import ModelError
    with pytest.raises(ModelError, match="checkpoint not found: s3://sisray/readers/nothing"):
        read_state_dict(storage.join(store.location, "nothing"))


def _names(location: str) -> list[str]:
    """The names of the files and folders directly in a remote folder."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(location)
    return [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))]


@pytest.mark.slow
@pytest.mark.ray  # in the jobs it starts
@pytest.mark.timeout(1500, method="thread")
def test_a_job_on_s3_killed_on_two_machines_finishes_on_a_third_as_an_uninterrupted_run(
        s3_endpoint, small_benchmark, fcn_checkpoint, small_ablation, tmp_path, monkeypatch):
    """`jobs/adapt.py --run-dir s3://...`, each machine with its own cache: SIGKILLed (Ray and all) on
    machine A in the middle of round 2's patch pass, on machine B in the middle of its retraining;
    then a patch shard of a finished stage is cut short in the bucket. Machine C finishes the run,
    redoing only what was lost, with the selections, thresholds, patches and mIoU of an
    uninterrupted local run (the small ablation's default run); a fourth machine finds it finished."""
    whole = small_ablation[0] / "seed_0" / "lse_fl"
    location = _uri(s3_endpoint, "job")
    command = [sys.executable, str(REPO / "jobs" / "adapt.py"), "--run-dir", location,
               *set_args(small_adaptation(small_benchmark, fcn_checkpoint))]

    def env(machine: str) -> dict:
        return {**CREDENTIALS, storage.CACHE_ENV: str(tmp_path / machine)}

    def job(machine: str):
        return subprocess.run(command, cwd=tmp_path, env={**os.environ, "RAY_AUTH_MODE": "disabled", **env(machine)},
                              capture_output=True, text=True, timeout=1000)

    def local_copy(machine: str) -> Path:
        monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / machine))
        return RunStore(location).local

    def bucket_state() -> dict:
        try:
            return json.loads(storage.read_bytes(storage.join(location, "state.json")))["finished"]
        except (StorageError, json.JSONDecodeError):  # not there yet, or moto mid-upload (S3 itself is atomic)
            return {}

    machine_a = local_copy("machine_a")
    stop_when(command, tmp_path, lambda: (machine_a / "round_02" / ".patches.tmp").is_dir(), signal.SIGKILL,
              env("machine_a"))
    after_a = bucket_state()
    assert "round_02/select" in after_a and "round_02/patches" not in after_a
    partial = json.loads(storage.read_bytes(storage.join(location, "summary.json")))
    assert not partial["complete"] and len(partial["rounds"]) == 1 and partial["final"] is None

    train = storage.join(location, "round_02", "train")  # Ray Train writes its checkpoints there directly
    stop_when(command, tmp_path, lambda: any(n.startswith("checkpoint_") for n in _names(train)), signal.SIGKILL,
              env("machine_b"))
    after_b = bucket_state()
    assert "round_02/patches" in after_b and "round_02/train" not in after_b
    assert {k: after_b[k] for k in after_a} == after_a  # machine B did not redo what A finished
    shard = storage.list_files(storage.join(location, "round_02", "patches"), ".parquet")[-1]
    storage.write_bytes(shard, storage.read_bytes(shard)[:100])  # as if cut short: detected, the patch stage redone

    done = job("machine_c")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "== round_01/score" not in done.stdout and "== round_02/patches" in done.stdout
    finished = bucket_state()
    assert {k: finished[k] for k in after_a} == after_a  # round 1 and round 2's scores: not redone
    assert len(storage.read_bytes(shard)) > 100
    machine_c = local_copy("machine_c")
    for r in ("round_01", "round_02"):
        for name in ("selection.json", "thresholds.json"):
            assert json.loads((whole / r / name).read_text()) == json.loads((machine_c / r / name).read_text()), (r, name)
        assert read_rows(whole / r / "patches") == read_rows(storage.join(location, r, "patches")), r
    a = json.loads((whole / "summary.json").read_text())
    b = json.loads(storage.read_bytes(storage.join(location, "summary.json")))
    assert b["complete"] and [r["patches"] for r in a["rounds"]] == [r["patches"] for r in b["rounds"]]
    assert b["final"]["miou19"] == pytest.approx(a["final"]["miou19"], abs=1e-6)
    # round 2's retraining resumed from machine B's checkpoint, its online teacher included: the same weights
    reference = read_state_dict(whole / "round_02" / "checkpoint")
    resumed = read_state_dict(storage.join(location, "round_02", "checkpoint"))
    for key, value in reference.items():
        assert torch.allclose(value.float(), resumed[key].float(), atol=1e-6), key
    assert storage.is_file(storage.join(location, "round_02", "checkpoint", "model.pt"))
    assert "checkpoint_manager_snapshot.json" in _names(train)

    again = job("machine_d")  # a fourth machine: pulls the run, finds it finished
    assert again.returncode == 0, again.stderr[-3000:]
    assert "== " not in again.stdout and "final" in again.stdout
