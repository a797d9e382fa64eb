"""Subprocess smoke tests of the job entry points, as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_job(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_make_synthetic_generates_and_prints_statistics(tmp_path):
    out = tmp_path / "bench"
    args = ("jobs/make_synthetic.py", "--out", str(out), "--n-source", "6", "--n-target-train", "4",
            "--n-target-val", "3", "--processes", "2")
    first = run_job(*args)
    assert first.returncode == 0, first.stderr
    assert "6 source, 4 target-train, 3 target-val images" in first.stdout
    assert "traffic sign" in first.stdout and "larger in the target domain" in first.stdout
    assert (out / "SYNTHETIC.json").is_file()
    second = run_job(*args, "--no-stats")
    assert second.returncode == 0 and "6 source" in second.stdout


def test_bad_config_override_exits_2_with_a_message_and_no_traceback(tmp_path):
    result = run_job("jobs/make_synthetic.py", "--out", str(tmp_path / "b"), "--n-source", "2",
                     "--n-target-train", "2", "--n-target-val", "1", "--set", "data.target.size=[0, 5]")
    assert result.returncode == 2
    assert "error:" in result.stderr and "data.target.size = [0, 5]" in result.stderr
    assert "Traceback" not in result.stderr


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "target").mkdir()
    result = run_job("jobs/make_synthetic.py", "--out", str(tmp_path), "--no-stats")
    assert result.returncode == 2
    assert f"{tmp_path / 'target'} exists but is not part of a sisray synthetic benchmark" in result.stderr
