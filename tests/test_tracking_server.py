"""Tracking never stops the work: a real MLflow server stopped mid-run (tests/mlflow_server.py) is warned
about once, what it missed is logged when it is back, and what it never got is named. The whole job
against a server stopped mid-training: tests/test_jobs.py."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from sisray import tracking
from sisray.config import load_config
from sisray.errors import TrackingError
from sisray.tracking import RunLogger, Tracking
from mlflow_server import Gate, free_port, mlflow_server


def loss_steps(client: MlflowClient, run_id: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, "loss")]


def test_a_stopped_server_is_warned_about_once_and_what_it_missed_is_logged_when_it_is_back(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tracking, "RETRY_S", 0.0)  # retry at every call: the window has its own test
    monkeypatch.setattr(tracking, "CLOSE_WAIT_S", 0.0)
    with mlflow_server(tmp_path) as url:
        server = MlflowClient(url)
        run_id = server.create_run(server.create_experiment("outage")).info.run_id
        gate = Gate(url)
        logger = RunLogger(gate.url, run_id)
        logger.metrics({"loss": 1.0}, step=1)

        gate.close()  # the server stops
        logger.metrics({"loss": 2.0}, step=2)
        (tmp_path / "summary.json").write_text("{}")
        logger.artifact(tmp_path / "summary.json")
        logger.metrics({"loss": 3.0}, step=3)
        err = capsys.readouterr().err
        assert err.count("warning: MLflow") == 1, err
        assert f"{gate.url} did not take metrics (step 2)" in err and "The run goes on" in err
        assert loss_steps(server, run_id) == [1]

        gate.open()  # back: the next call sends what was kept first, in order
        logger.metrics({"loss": 4.0}, step=4)
        assert loss_steps(server, run_id) == [1, 2, 3, 4]
        assert [m.value for m in server.get_metric_history(run_id, "loss")] == [1.0, 2.0, 3.0, 4.0]
        assert "summary.json" in {a.path for a in server.list_artifacts(run_id)}
        err = capsys.readouterr().err
        assert "answers again" in err and "warning" not in err

        gate.close()  # stopped for good: the end of the process names what it never got
        logger.metrics({"loss": 5.0}, step=5)
        logger.close()
        err = capsys.readouterr().err
        assert f"not logged to run {run_id}: 1 x metrics" in err
        assert loss_steps(server, run_id) == [1, 2, 3, 4]


class Refusing:
    """An MLflow client whose server is down: counts the calls it is asked to make."""

    def __init__(self):
        self.calls = 0

    def log_batch(self, *args, **kwargs):
        self.calls += 1
        raise ConnectionError("Connection refused")


def test_after_a_failure_calls_are_kept_without_asking_the_server_until_the_retry_time(tmp_path, capsys):
    logger = RunLogger(f"sqlite:///{tmp_path / 'unused.db'}", "run")
    logger.client = Refusing()
    logger.metrics({"loss": 1.0}, step=1)
    logger.metrics({"loss": 2.0}, step=2)  # within RETRY_S of the failure: kept, the server not asked
    assert logger.client.calls == 1 and len(logger.unsent) == 2
    logger.retry_at = 0.0  # RETRY_S later
    logger.metrics({"loss": 3.0}, step=3)
    assert logger.client.calls == 2 and len(logger.unsent) == 3  # one attempt, the oldest call first
    assert capsys.readouterr().err.count("warning: MLflow") == 1


def test_a_tracking_server_that_does_not_answer_when_the_job_starts_is_a_clear_error(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    cfg = load_config(None, [f"tracking.uri={uri}", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(TrackingError) as caught:
        Tracking(cfg, "adapt")
    message = str(caught.value)
    assert f"cannot open an MLflow run in {uri}" in message and "tracking.enabled=false" in message
