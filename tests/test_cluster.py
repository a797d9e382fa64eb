"""`ray start --head` + `ray job submit` as the README documents them, with token authentication.

The head runs with `--block` in its own process group; the test ends exactly that group, never
other Ray processes on the machine (such as the test session's own instance)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import set_args, small_adaptation
from mlflow_server import free_port, mlflow_server

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def ray_head(env: dict) -> Iterator[str]:
    """`ray start --head --block` on free ports in its own process group (2 CPUs); yields the job API's
    address once `ray job list` answers there, and ends exactly that group."""
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
        deadline = time.monotonic() + 120
        while True:  # the dashboard's job API answers a few seconds after the head starts
            probe = ray_cli(env, "job", "list", "--address", address)
            if probe.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert probe.returncode == 0, probe.stderr[-2000:]
        yield address
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


def ray_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=120)


def submit(env: dict, address: str, name: str, job_args: list[str]) -> None:
    """`ray job submit --no-wait` of `python JOB_ARGS` as submission `name`, the README's way."""
    for _ in range(20):  # the head's job agent can come up some seconds after its job API
        submitted = ray_cli(env, "job", "submit", "--address", address, "--submission-id", name, "--no-wait",
                            "--working-dir", str(REPO), "--", "python", *job_args)
        if "No available agent" not in submitted.stderr:
            break
        time.sleep(3)
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-3000:]


def wait_for(env: dict, address: str, name: str, timeout: float = 700) -> str:
    """The job's final status (SUCCEEDED, FAILED, STOPPED) and its logs."""
    deadline = time.monotonic() + timeout
    while True:
        status = re.sub(r"\x1b\[[0-9;]*m", "", ray_cli(env, "job", "status", "--address", address, name).stdout)
        ended = re.search(rf"Job '{name}' (?:was )?(succeeded|failed|stopped)", status)  # the CLI's words for its end
        if ended:
            return ended[1].upper() + "\n" + ray_cli(env, "job", "logs", "--address", address, name).stdout
        assert time.monotonic() < deadline, f"job {name} did not end within {timeout} s: {status}"
        time.sleep(3)


def round_results(summary: dict) -> list[tuple]:
    return [(r["selected_images"], r["patches"], r["thresholds"]) for r in summary["rounds"]]


@pytest.mark.slow
@pytest.mark.ray  # a Ray head in a subprocess
@pytest.mark.timeout(1200, method="thread")
def test_ray_job_submit_runs_two_jobs_side_by_side_as_each_runs_alone_and_refuses_a_third_in_a_run_in_use(
        tmp_path, small_benchmark, fcn_checkpoint, small_ablation):
    """On a token-authenticated head, two adaptation jobs submitted together, in their own run
    directories, both logging to one MLflow server, end with the results of the same job run alone
    (the small job's reference run, tests/conftest.py); a third pointed at a run directory in use
    is refused. A client with a wrong token is turned away."""
    alone = json.loads((small_ablation[0] / "seed_0" / "lse_fl" / "summary.json").read_text())
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # the job's `python` is this venv's
           "RAY_USAGE_STATS_ENABLED": "0"}
    with mlflow_server(tmp_path) as url, ray_head(env) as address:
        settings = set_args([*small_adaptation(small_benchmark, fcn_checkpoint), "tracking.enabled=true",
                             f"tracking.uri={url}"])
        runs = {name: tmp_path / name for name in ("first", "second")}
        for name, run_dir in runs.items():
            submit(env, address, name, ["jobs/adapt.py", "--run-dir", str(run_dir), *settings])
        while not (runs["first"] / ".lock").is_file():
            time.sleep(0.5)
        submit(env, address, "third", ["jobs/adapt.py", "--run-dir", str(runs["first"]), *settings])
        third = wait_for(env, address, "third")
        assert third.startswith("FAILED") and f"the run directory is in use: {runs['first']}/.lock" in third, third
        for name, run_dir in runs.items():
            ended = wait_for(env, address, name)
            assert ended.startswith("SUCCEEDED"), ended[-4000:]
            summary = json.loads((run_dir / "summary.json").read_text())
            assert summary["complete"] and round_results(summary) == round_results(alone)
            assert summary["final"]["miou19"] == pytest.approx(alone["final"]["miou19"], abs=1e-9)

        server = MlflowClient(url)
        tracked = server.search_runs([server.get_experiment_by_name("sisray").experiment_id])
        assert sorted((r.data.tags["sisray.run_dir"], r.info.status) for r in tracked) == [
            (str(runs["first"]), "FINISHED"), (str(runs["second"]), "FINISHED")]  # the third opened none

        refused = ray_cli({**env, "RAY_AUTH_TOKEN": "wrong"}, "job", "list", "--address", address)
        assert refused.returncode != 0  # a client without the cluster's token is turned away
