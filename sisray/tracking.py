"""MLflow tracking: one run per job, params = the flattened config, metrics per step, artifacts.

The driver creates the experiment and the run; Ray workers log into that run by id through
`RunLogger` (rank 0 only). The tracking URI is resolved once on the driver — MLflow's default is a
SQLite file relative to the working directory, which Ray workers do not share — and passed on.

Tracking never stops the work: a store that stops answering mid-run (a tracking server restarted) is
warned about once; what could not be sent is kept, in order, and sent once it answers again; what is
still unsent when the process ends is named (the run directory holds all of it).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sisray.config import Config, config_to_dict
from sisray.errors import TrackingError
from sisray.metrics import MIOU_KEYS
from sisray.storage import is_uri


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def evaluation_metrics(summary: dict, prefix: str) -> dict[str, float]:
    """An evaluation block as flat MLflow metrics: PREFIX/miou19, PREFIX/iou/road, ..."""
    metrics = {f"{prefix}/{k}": summary[k] for k in (*MIOU_KEYS, "pixel_accuracy")}
    metrics.update({f"{prefix}/iou/{name}": value for name, value in summary["per_class"].items()})
    metrics.update({f"{prefix}/label_free/{name}": value for name, value in summary.get("label_free", {}).items()})
    metrics.update({f"{prefix}/validators/{name}": value for name, value in summary.get("validators", {}).items()})
    return metrics


def resolve_uri(uri: str | None) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else MLflow's default; relative SQLite paths made absolute."""
    import mlflow

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


# MLflow retries an HTTP request 7 times with doubling waits (minutes) before it gives up: a stopped
# server would stall training. One quick retry here; the kept calls are retried every RETRY_S instead.
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
RETRY_S = 30.0
CLOSE_WAIT_S = 20.0  # what a process still holds when it ends waits this long for a server being restarted


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    for key, value in FAIL_FAST.items():  # the user's own settings win
        os.environ.setdefault(key, value)
    return MlflowClient(tracking_uri=uri)


def _warn(message: str) -> None:
    print(f"warning: MLflow: {message}", file=sys.stderr, flush=True)


class RunLogger:
    """Logs metrics and artifacts into an existing run by id; usable in any process. Calls the store
    does not take are kept and sent, in order, with a later call (at most every RETRY_S) or `close()`."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = _client(uri)
        self.unsent: list[tuple[str, Callable[[], Any]]] = []  # (what, the call), oldest first
        self.retry_at = 0.0
        self.outage = False  # warned: the store has not answered since

    def __reduce__(self):  # ship (uri, run id) to Ray workers, not the client
        return RunLogger, (self.uri, self.run_id)

    def send(self, what: str, call: Callable[[], Any]) -> None:
        """Make `call` (described as `what`) now, after what is kept; keep it if the store does not answer."""
        self.unsent.append((what, call))
        if time.monotonic() >= self.retry_at:
            self.flush()

    def flush(self) -> bool:
        """Send what is kept, oldest first; False (and try again RETRY_S later) if the store does not answer."""
        while self.unsent:
            try:
                self.unsent[0][1]()
            except Exception as exc:  # whatever the store raised: tracking must not end the work
                if not self.outage:
                    _warn(f"{self.uri} did not take {self.unsent[0][0]} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]}). The run goes on; what it logs is kept and "
                          f"sent when the tracking store answers again")
                self.outage, self.retry_at = True, time.monotonic() + RETRY_S
                return False
            self.unsent.pop(0)
        if self.outage:
            print(f"MLflow: {self.uri} answers again; what was kept is logged", file=sys.stderr, flush=True)
            self.outage = False
        return True

    def close(self) -> None:
        """Send what is kept, waiting up to CLOSE_WAIT_S; name what could not be sent (this process ends)."""
        deadline = time.monotonic() + CLOSE_WAIT_S
        while self.unsent and not self.flush():
            if time.monotonic() >= deadline:
                kinds = Counter(what.split(" ")[0] for what, _ in self.unsent)
                _warn(f"{self.uri} still does not answer: not logged to run {self.run_id}: "
                      + ", ".join(f"{n} x {kind}" for kind, n in kinds.items())
                      + " (the run directory holds every figure and file)")
                self.unsent.clear()
                return
            time.sleep(2.0)

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step or 0) for k, v in _finite(metrics).items()]
        if batch:
            self.send(f"metrics (step {step or 0})", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.send(f"artifact {Path(path).name}", lambda: self.client.log_artifact(self.run_id, str(path), folder))


class Tracking:
    """The job's MLflow run (or nothing, with tracking disabled)."""

    def __init__(self, cfg: Config, job: str, resume_run_id: str | None = None, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None):
        """A new run, or with `resume_run_id` (a resumed job) that run, continued. With
        `parent_run_id`, the run is nested under it (a sweep's trial under the sweep)."""
        self.enabled = cfg.tracking.enabled
        self.logger: RunLogger | None = None
        self.run_id: str | None = None
        if not self.enabled:
            return
        import mlflow  # noqa: F401  first: its import sets its loggers' levels, which the lines below lower

        from sisray.cluster import is_verbose

        if not is_verbose():  # MLflow's database set-up (alembic migrations) logs at INFO on a new store
            for name in ("mlflow", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)
        self.uri = resolve_uri(cfg.tracking.uri)
        try:
            self.run_id = self._open_run(cfg, job, resume_run_id, parent_run_id, tags)
        except Exception as exc:  # the store's own error, whatever the backend
            raise TrackingError(
                f"cannot open an MLflow run in {self.uri} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}). "
                f"Start the tracking server (README: On a Ray cluster), point tracking.uri at one that answers, "
                f"or set tracking.enabled=false") from exc
        self.logger = RunLogger(self.uri, self.run_id)
        if self.run_id != resume_run_id:
            self.params(flatten(config_to_dict(cfg)))

    def _open_run(self, cfg: Config, job: str, resume_run_id: str | None, parent_run_id: str | None,
                  tags: dict[str, str] | None) -> str:
        """The run id: `resume_run_id` set RUNNING again if the store has it, else a new run."""
        client = _client(self.uri)
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        self.experiment_id = (experiment.experiment_id if experiment
                              else client.create_experiment(cfg.tracking.experiment))
        if resume_run_id and self._exists(client, resume_run_id):
            client.update_run(resume_run_id, status="RUNNING")
            return resume_run_id
        where = cfg.run_dir if is_uri(cfg.run_dir) else str(Path(cfg.run_dir).resolve())
        name = where.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]  # the run directory's own name
        run = client.create_run(self.experiment_id, run_name=f"{job}:{name}",
                                tags={"sisray.job": job, "sisray.run_dir": where,
                                      "mlflow.source.name": f"jobs/{job}.py", **(tags or {}),
                                      **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})})
        return run.info.run_id

    def params(self, params: dict[str, Any]) -> None:
        """Log params (values as strings, MLflow's length and batch limits respected)."""
        if not self.logger:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.logger.send("params", lambda batch=items[i:i + 100]: self.logger.client.log_batch(self.run_id,
                                                                                                   params=batch))

    def _exists(self, client, run_id: str) -> bool:
        try:
            return client.get_run(run_id).info.experiment_id == self.experiment_id
        except Exception:  # MLflow raises MlflowException for an unknown id
            return False

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.logger:
            self.logger.metrics(metrics, step)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.logger:
            self.logger.artifact(path, folder)

    def finish(self, status: str = "FINISHED") -> None:
        if self.logger:
            self.logger.send(f"status {status}", lambda: self.logger.client.set_terminated(self.run_id, status))
            self.logger.close()

    def where(self) -> str:
        """A line saying where to see the run."""
        if not self.enabled:
            return "MLflow tracking is off (tracking.enabled: false)"
        page = f"#/experiments/{self.experiment_id}/runs/{self.run_id}"
        if self.uri.startswith("http"):
            return f"MLflow run: {self.uri.rstrip('/')}/{page}"
        return (f"MLflow run {self.run_id} in {self.uri}: run `mlflow ui --backend-store-uri {self.uri}` "
                f"and open http://127.0.0.1:5000/{page}")
