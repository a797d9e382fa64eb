"""One job at a time in a run directory (RUN/.lock): a job in use refuses the next, a dead job's lock
is taken over. On s3: tests/test_storage.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sisray import run_lock
from sisray.run_lock import LOCK, RunInUse, RunLock

REPO = Path(__file__).resolve().parents[1]
HOLD = "import sys, time; from sisray.run_lock import RunLock; RunLock(sys.argv[1], 'adapt').acquire(); time.sleep(600)"


def _job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def _write_lock(run_dir: Path, **holder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK).write_text(json.dumps({"owner": "someone", "job": "adapt", "since": time.time(), **holder}))


def test_a_job_in_a_run_directory_in_use_is_refused_before_any_work(tmp_path, small_benchmark):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / LOCK).is_file():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        data = ["--set", f"data.source.root={small_benchmark}", "--set", f"data.target.root={small_benchmark}",
                "--set", "model.source_checkpoint=null"]  # the shipped source model is not of this source set
        for job in ("jobs/adapt.py", "jobs/train_source.py", "jobs/tune.py"):
            space = ["--space", "tune_spaces/smoke.yaml"] if job == "jobs/tune.py" else []
            refused = _job(job, "--run-dir", str(run_dir), *space, *data)
            assert refused.returncode == 2, refused.stderr[-2000:]
            assert (f"the run directory is in use: {run_dir / LOCK} is held by job adapt, pid {holder.pid} on host "
                    f"{socket.gethostname()}") in refused.stderr, refused.stderr[-2000:]
            assert "Traceback" not in refused.stderr
            assert sorted(p.name for p in run_dir.iterdir()) == [LOCK]  # nothing written: no config, no state
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_process_of_this_host_that_ended_is_taken_over(tmp_path, capsys):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write_lock(tmp_path, host=socket.gethostname(), pid=int(ended.stdout), heartbeat=time.time())
    lock = RunLock(tmp_path, "adapt")
    lock.acquire()
    assert f"its process {int(ended.stdout)} on this host has ended" in capsys.readouterr().out
    assert json.loads((tmp_path / LOCK).read_text())["owner"] == lock.mine["owner"]
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_a_lock_of_another_host_is_stale_only_once_its_heartbeat_stops(tmp_path):
    _write_lock(tmp_path, host="node-7", pid=1, heartbeat=time.time() - 10)
    with pytest.raises(RunInUse, match="pid 1 on host node-7"):
        RunLock(tmp_path, "adapt").acquire()
    _write_lock(tmp_path, host="node-7", pid=1, heartbeat=time.time() - run_lock.STALE_AFTER_S - 5)
    lock = RunLock(tmp_path, "adapt")
    lock.acquire()
    assert json.loads((tmp_path / LOCK).read_text())["host"] == socket.gethostname()
    lock.release()


def test_a_live_process_of_this_host_keeps_its_lock_however_old_its_heartbeat(tmp_path):
    _write_lock(tmp_path, host=socket.gethostname(), pid=os.getppid(), heartbeat=0)
    with pytest.raises(RunInUse, match=f"pid {os.getppid()} on host"):
        RunLock(tmp_path, "train_source").acquire()


def test_the_holder_beats_and_gives_back_only_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path, "adapt")
    lock.acquire()
    written = json.loads((tmp_path / LOCK).read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads((tmp_path / LOCK).read_text())["heartbeat"] > written
    lock._stop.set()  # its heartbeat stops; then someone takes the lock over
    lock._beat.join()
    _write_lock(tmp_path, host="node-7", pid=1, heartbeat=time.time())
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["host"] == "node-7"


def test_a_job_that_stops_on_bad_input_gives_the_run_directory_back(tmp_path, small_benchmark):
    run_dir = tmp_path / "run"
    missing = tmp_path / "no_such_model.pt"
    stopped = _job("jobs/adapt.py", "--run-dir", str(run_dir), "--set", f"data.source.root={small_benchmark}",
                   "--set", f"data.target.root={small_benchmark}", "--set", f"model.source_checkpoint={missing}")
    assert stopped.returncode == 2 and str(missing) in stopped.stderr, stopped.stderr[-2000:]
    assert not run_dir.exists()  # its lock given back, and the folder it made for it removed
