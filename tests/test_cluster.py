"""`ray start --head` + `ray job submit` as the README documents them, with token authentication.

The head runs with `--block` in its own process group; the test ends exactly that group, never
other Ray processes on the machine (such as the test session's own instance)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import set_args
from sisray.models import build_model

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.ray  # a Ray head in a subprocess
@pytest.mark.timeout(900, method="thread")
def test_ray_job_submit_runs_an_adaptation_on_a_token_authenticated_head(tmp_path, small_benchmark):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # the job's `python` is this venv's
           "RAY_USAGE_STATS_ENABLED": "0"}
    dashboard = free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         # every port Ray would otherwise take by default: another Ray (the test session's) may hold it
         "--port", str(free_port()), "--ray-client-server-port", str(free_port()),
         "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
         "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()), "--num-cpus", "2",
         "--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--temp-dir", str(Path("/tmp") / f"srh{os.getpid()}"), "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        torch.manual_seed(0)
        source = tmp_path / "source.pt"
        torch.save(build_model("fcn8s_vgg16", width=0.0625).state_dict(), source)
        run_dir = tmp_path / "run"
        settings = [f"data.source.root={small_benchmark}", f"data.target.root={small_benchmark}",
                    "data.source.size=[64, 36]", "data.target.size=[64, 32]", "model.name=fcn8s_vgg16", "model.width=0.0625", "lse.target_bn=false",
                    f"model.source_checkpoint={source}", "lse.selection=global", "lse.p0=0.5", "lse.p_max=0.5",
                    "train.epochs_per_round=1", "train.batch_size=2", "tracking.enabled=false"]
        deadline = time.monotonic() + 120
        while True:  # the dashboard's job API answers a few seconds after the head starts
            probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert probe.returncode == 0, probe.stderr[-2000:]
        for _ in range(20):  # the head's job agent can come up some seconds after its job API
            submitted = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                 "python", "jobs/adapt.py", "--run-dir", str(run_dir), *set_args(settings)],
                env=env, capture_output=True, text=True, timeout=700)  # follows the job's logs until it ends
            if "No available agent" not in submitted.stderr:
                break
            time.sleep(3)
        assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-4000:]
        assert "succeeded" in submitted.stdout.lower() and "final" in submitted.stdout
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["complete"] and len(summary["rounds"]) == 1 and summary["final"]["miou19"] is not None

        refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address],
                                 env={**env, "RAY_AUTH_TOKEN": "wrong"}, capture_output=True, text=True)
        assert refused.returncode != 0  # a client without the cluster's token is turned away
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # exactly the processes this test started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        for _ in range(30):
            if not group_alive(head.pid):
                break
            time.sleep(1)
    assert not group_alive(head.pid)
