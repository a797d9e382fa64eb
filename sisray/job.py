"""One job's life, the same for every job and for a sweep's trial: its run directory (pulled from a
remote location, a run of another config refused, the config saved), Ray, and one MLflow run that
ends FINISHED, KILLED (Ctrl-C) or FAILED.

    job = Job(cfg, "adapt", stages=True)   # locks RUN, pulls it, refuses a foreign run: before any work
    ...check the inputs...
    with job.started() as tracking:        # saves RUN/config.yaml, starts Ray, opens the MLflow run
        ...the work...                     # RUN is pushed to its remote location once it succeeds
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sisray.config import Config, save_config
from sisray.errors import Interrupted
from sisray.run_lock import RunLock
from sisray.run_state import RunState
from sisray.rundir import RunDir
from sisray.storage import RunStore
from sisray.tracking import Tracking


class Job:
    def __init__(self, cfg: Config, kind: str, *, run_dir: bool = True, stages: bool = False, force: bool = False,
                 locked: bool = True, resume_run_id: str | None = None, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None):
        """`kind` names the job in MLflow (jobs/<kind>.py). With `run_dir`, the job works in
        cfg.run_dir, `locked` (RUN/.lock: one job at a time); with `stages`, it records its stages
        there (RUN/state.json: resume, and the MLflow run it continues). `force` continues a run
        directory made with another config."""
        self.cfg, self.kind = cfg, kind
        self.resume_run_id, self.parent_run_id, self.tags = resume_run_id, parent_run_id, tags
        self.store = RunStore(cfg.run_dir) if run_dir else None  # a path, or a URI worked on through a local copy
        self.lock = RunLock(cfg.run_dir, kind) if run_dir and locked else None
        if self.lock:  # before the pull: another job on this machine may be working in the same local copy
            self.lock.acquire()
        try:
            if self.store:
                self.store.pull()
            self.state = RunState(self.store, cfg, force) if self.store and stages else None
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give the run directory back (the end of `started()` does)."""
        if self.lock:
            self.lock.release()

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.store.local)

    @contextmanager
    def started(self, finished_anyway: Callable[[], bool] = lambda: False) -> Iterator[Tracking]:
        """Save the config and open the MLflow run; close it with the job's outcome. (Ray starts, or
        joins RAY_ADDRESS, when a stage first sizes itself: a finished run re-run starts none.) An
        exception ends the run FAILED unless `finished_anyway()` says the work was all done (Tune
        stops a trial once it has reported its last round)."""
        if self.store:
            self.store.local.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir.config)
        if self.state:
            self.state.save()
        resume = self.state.mlflow_run_id if self.state else self.resume_run_id
        tracking = Tracking(self.cfg, self.kind, resume_run_id=resume, parent_run_id=self.parent_run_id,
                            tags=self.tags)
        if self.state:
            self.state.mlflow_run_id = tracking.run_id
        if self.store:
            tracking.artifact(self.run_dir.config)
        status = "FAILED"
        try:
            yield tracking
            if self.store:
                self.store.push()
            status = "FINISHED"
        except (KeyboardInterrupt, Interrupted):
            status = "KILLED"
            raise
        except BaseException:
            status = "FINISHED" if finished_anyway() else "FAILED"
            raise
        finally:
            tracking.finish(status)
            self.release()
