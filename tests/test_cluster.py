"""Ray clusters as the README documents them: `ray start --head` + `ray job submit` with token
authentication, and a head with worker nodes that a test loses mid-job.

Every node runs `ray start --block` in its own process group; a test ends exactly those groups
(and their workers), never other Ray processes on the machine (such as the test session's own)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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


def ray_start(*args: str) -> list[str]:
    """`ray start --block` on this machine's loopback with `args`, on free ports for every port Ray
    would otherwise take by default: another Ray (the test session's, another node's) may hold it."""
    ports = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
             "--runtime-env-agent-port")
    return [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
            *(a for option in ports for a in (option, str(free_port()))), *args]


def plain(text: str) -> str:
    """`text` without the terminal's colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@contextlib.contextmanager
def ray_head(env: dict) -> Iterator[str]:
    """`ray start --head --block` on free ports in its own process group (2 CPUs); yields the job API's
    address once `ray job list` answers there, and ends exactly that group."""
    dashboard = free_port()
    head = subprocess.Popen(
        ray_start("--head", "--port", str(free_port()), "--ray-client-server-port", str(free_port()), "--num-cpus", "2",
                  "--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                  "--temp-dir", str(Path("/tmp") / f"srh{os.getpid()}")),
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
        status = plain(ray_cli(env, "job", "status", "--address", address, name).stdout)
        ended = re.search(rf"Job '{name}' (?:was )?(succeeded|failed|stopped)", status)  # the CLI's words for its end
        if ended:
            return ended[1].upper() + "\n" + ray_cli(env, "job", "logs", "--address", address, name).stdout
        assert time.monotonic() < deadline, f"job {name} did not end within {timeout} s: {status}"
        time.sleep(3)


class LocalCluster:
    """A head without CPUs (the driver's node: work runs on the worker nodes) and worker nodes of
    `cpus` CPUs each, all on this machine. The head marks a node dead 1.5 s after its raylet stops
    answering (Ray's default: 15 s)."""

    def __init__(self, env: dict, cpus: int):
        self.cpus = cpus
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**env, "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3",
                    "RAY_health_check_timeout_ms": "1000", "RAY_health_check_initial_delay_ms": "500"}
        self.temp = Path("/tmp") / f"srn{os.getpid()}"
        self.temp.mkdir(exist_ok=True)
        self.log = open(self.temp / "nodes.log", "a")  # every node's `ray start` output
        self.nodes: list[subprocess.Popen] = [self._start(
            "--head", "--port", str(self.port), "--num-cpus", "0", "--ray-client-server-port", str(free_port()),
            "--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()),
            "--temp-dir", str(self.temp))]

    def _start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            ray_start("--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()), *args),
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def total_cpus(self) -> float:
        probe = subprocess.run(
            [sys.executable, "-c", "import ray; ray.init(logging_level='ERROR', log_to_driver=False); "
             "print('CPU', ray.cluster_resources().get('CPU', 0))"],
            env={**self.env, "RAY_ADDRESS": self.address}, capture_output=True, text=True, timeout=120)
        counted = re.search(r"^CPU (\S+)$", probe.stdout, re.M)
        return float(counted[1]) if counted else -1.0

    def add_node(self) -> None:
        """A worker node, once the head counts its CPUs. One at a time: nodes on one machine name
        their sockets in the session's directory in turn, and two starting together take one name."""
        expected = self.cpus * len(self.nodes)  # the live worker nodes' and this one's
        self.nodes.append(self._start("--address", self.address, "--num-cpus", str(self.cpus)))
        deadline = time.monotonic() + 120
        while self.total_cpus() != expected:
            assert time.monotonic() < deadline, (f"a worker node did not join {self.address} ({self.total_cpus()} "
                                                 f"CPUs): {(self.temp / 'nodes.log').read_text()[-3000:]}")
            time.sleep(0.5)

    def lose_node_hosting(self, title: str, once: Callable[[], bool] = lambda: True) -> None:
        """Kill (SIGKILL) the worker node whose raylet runs the process titled `title`, as soon as
        there is one and `once()` holds, with all its processes, as a machine is lost."""
        deadline = time.monotonic() + 120
        while not (hosted := self._find(title)) or not once():
            assert time.monotonic() < deadline, f"no {title} on a worker node"
            time.sleep(0.01)
        kill_nodes({hosted})
        self.nodes = [n for n in self.nodes if n.pid != hosted]

    def _find(self, title: str) -> int | None:
        """The process group of the worker node running a process titled `title`."""
        workers = {n.pid for n in self.nodes[1:]}
        running = processes()
        for parent, _, command in running.values():
            node = running.get(parent, (0, 0, ""))[1]  # a Ray worker's parent is its node's raylet
            if title in command and node in workers:
                return node
        return None

    def stop(self) -> None:
        kill_nodes({n.pid for n in self.nodes})
        self.log.close()
        shutil.rmtree(self.temp, ignore_errors=True)


def kill_nodes(groups: set[int]) -> None:
    """SIGKILL to every process of the nodes whose `ray start` process groups are `groups`, and to
    their Ray workers (each in a group of its own, a child of its node's raylet)."""
    running = processes()
    for pid, (parent, pgid, _) in running.items():
        if pgid in groups or running.get(parent, (0, 0, ""))[1] in groups:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def processes() -> dict[int, tuple[int, int, str]]:
    """Every process on the machine: pid -> (parent pid, process group, command line)."""
    rows = subprocess.run(["ps", "-eo", "pid=,ppid=,pgid=,args="], capture_output=True, text=True).stdout
    return {int(f[0]): (int(f[1]), int(f[2]), f[3]) for f in (r.split(None, 3) for r in rows.splitlines()) if len(f) == 4}


@contextlib.contextmanager
def ray_cluster(env: dict, workers: int, cpus: int) -> Iterator[LocalCluster]:
    cluster = LocalCluster(env, cpus)
    try:
        for _ in range(workers):
            cluster.add_node()
        yield cluster
    finally:
        cluster.stop()


def round_results(summary: dict) -> list[tuple]:
    return [(r["selected_images"], r["patches"], r["thresholds"]) for r in summary["rounds"]]


def ends_as_round_one_alone(summary: dict, alone: dict) -> None:
    """A one-round run of the small job (ONE_ROUND) against round 1 of its reference run: the same
    selection, patches, thresholds and model (nothing of round 1 depends on the rounds after it)."""
    assert summary["complete"] and round_results(summary) == round_results(alone)[:1]
    assert summary["rounds"][0]["evaluation"]["miou19"] == pytest.approx(
        alone["rounds"][0]["evaluation"]["miou19"], abs=1e-9)


ONE_ROUND = "lse.p_max=0.5"  # the small job's first round only: what these tests need of it


@pytest.mark.slow
@pytest.mark.ray  # a Ray head in a subprocess
@pytest.mark.timeout(1200, method="thread")
def test_ray_job_submit_runs_two_jobs_side_by_side_as_each_runs_alone_and_refuses_a_third_in_a_run_in_use(
        tmp_path, small_benchmark, fcn_checkpoint, small_ablation):
    """On a token-authenticated head, two adaptation jobs submitted together, in their own run
    directories, both logging to one MLflow server, end with the results of the same job run alone
    (round 1 of the small job's reference run, tests/conftest.py); a third pointed at a run
    directory in use is refused. A client with a wrong token is turned away."""
    alone = json.loads((small_ablation[0] / "seed_0" / "lse_fl" / "summary.json").read_text())
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # the job's `python` is this venv's
           "RAY_USAGE_STATS_ENABLED": "0"}
    with mlflow_server(tmp_path) as url, ray_head(env) as address:
        settings = set_args([*small_adaptation(small_benchmark, fcn_checkpoint), ONE_ROUND, "tracking.enabled=true",
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
            ends_as_round_one_alone(json.loads((run_dir / "summary.json").read_text()), alone)

        server = MlflowClient(url)
        tracked = server.search_runs([server.get_experiment_by_name("sisray").experiment_id])
        assert sorted((r.data.tags["sisray.run_dir"], r.info.status) for r in tracked) == [
            (str(runs["first"]), "FINISHED"), (str(runs["second"]), "FINISHED")]  # the third opened none

        refused = ray_cli({**env, "RAY_AUTH_TOKEN": "wrong"}, "job", "list", "--address", address)
        assert refused.returncode != 0  # a client without the cluster's token is turned away


@pytest.mark.slow
@pytest.mark.ray  # a Ray cluster of three nodes in subprocesses
@pytest.mark.timeout(900, method="thread")
def test_a_node_lost_mid_scoring_and_another_mid_retraining_change_no_result(
        tmp_path, small_benchmark, fcn_checkpoint, small_ablation):
    """On a head and two worker nodes, the worker node running a scoring actor is lost while the
    source model's evaluation scores for round 1, and the one running a Ray Train worker while round
    2 retrains (3 steps; round 1 has 2); each is replaced, as an autoscaler would. The job ends with
    the selection, patches, thresholds and mIoU of the same job run alone (the small job's reference
    run, tests/conftest.py)."""
    alone = json.loads((small_ablation[0] / "seed_0" / "lse_fl" / "summary.json").read_text())
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    run = tmp_path / "run"
    cpus = max(1, (os.cpu_count() or 2) // 2)  # the cluster has this machine's CPUs, as the reference run had
    with ray_cluster(env, workers=2, cpus=cpus) as cluster:
        job = subprocess.Popen(
            [sys.executable, "jobs/adapt.py", "--run-dir", str(run),
             *set_args(small_adaptation(small_benchmark, fcn_checkpoint))],
            cwd=REPO, env={**env, "RAY_ADDRESS": cluster.address}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        output, lost = [], []
        for line in job.stdout:
            output.append(line)
            if line.startswith("== source/eval"):  # the pass that also scores for round 1
                cluster.lose_node_hosting("MapBatches(EvaluationPass)")
                lost.append("scoring")
                assert not (run / "source" / "target_scores.parquet").exists()  # lost while the pass ran
                cluster.add_node()  # a replacement, as an autoscaler would start one
            elif line.startswith("== round_02/train"):  # lost once Ray Train has registered a checkpoint
                cluster.lose_node_hosting(
                    "RayTrainWorker", once=lambda: (run / "round_02" / "train" / "checkpoint_manager_snapshot.json").exists())
                lost.append("training")
                assert not (run / "round_02" / "checkpoint").exists()  # before the fit ended
                cluster.add_node()
        assert job.wait(timeout=60) == 0, "".join(output)[-6000:]
    assert lost == ["scoring", "training"]
    trained = re.findall(r"RayTrainWorker pid=(\d+)\S* round_02 training: (\d+)/3",
                         plain("".join(output)))
    # the fit had stepped before the node was lost, and workers started after it finished the fit (each
    # node's log monitor forwards the workers' lines of all nodes on this machine: they repeat)
    assert any(pid != trained[0][0] and step == "3" for pid, step in trained), trained
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and round_results(summary) == round_results(alone)
    assert summary["final"]["miou19"] == pytest.approx(alone["final"]["miou19"], abs=1e-9)



LOCAL_STATE_API = """
import json
import ray
from ray.util.state import list_nodes
from sisray.cluster import start_ray

start_ray()

@ray.remote
def nodes_seen_by_a_worker():
    return [node.node_id for node in list_nodes()], ray.get_runtime_context().get_node_id()

print(json.dumps(ray.get(nodes_seen_by_a_worker.remote())))
"""


@pytest.mark.ray  # the session's instance is the other one on this machine
def test_a_local_instance_beside_another_tells_its_processes_where_its_state_api_is(ray_session):
    """Two local Ray instances on one machine (two jobs side by side): Ray's auto-detection of the
    State API refuses to choose between them, and Ray Train's placement group cleaner died with a
    traceback on the job's terminal. A job's local instance names its own dashboard to its processes:
    a worker's State API answers about its own instance."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_API_SERVER_ADDRESS"] = "http://127.0.0.1:9"  # inherited from a job gone: replaced
    done = subprocess.run([sys.executable, "-c", LOCAL_STATE_API], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    seen, own = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == [own]
