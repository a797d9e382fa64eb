"""Connecting to Ray (quietly, unless asked) and sizing actor pools and worker groups from the
cluster's resources."""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass

from sisray.config import Config


VERBOSE_ENV = "SISRAY_VERBOSE"  # 1 (or --verbose): Ray's and MLflow's own INFO logs too
# Warnings Ray prints on every start that say nothing about this job.
RAY_NOISE = ("Token authentication is enabled", "Progress bars disabled")


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def ray_log_level() -> str:
    """The level of Ray's own logs on the terminal (its log files keep everything)."""
    return "INFO" if is_verbose() else "WARNING"


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(RAY_NOISE)


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's State API clients look before auto-detecting


def start_ray() -> None:
    """Join the cluster at RAY_ADDRESS (as under `ray job submit`), else start a local instance: its
    dashboard serves Ray's State API (Tune and Ray Train clean up placement groups through it), and
    its processes are told where (API_SERVER_ENV): when several local instances run on one machine
    (two jobs side by side), Ray's own auto-detection refuses to choose, and Ray Train's placement
    group cleaner died with a traceback on the job's terminal. Ray Train's preemption watcher is left
    out (a local instance's one node is never drained; the watcher costs ~2 CPU-seconds per fit).

    Unless verbose, the terminal keeps sisray's lines and Ray's warnings and errors: Ray's INFO
    logs (start-up, Ray Data's progress dumps, Ray Train's worker-group messages) go to its log
    files only. Errors raised in actors and workers reach the job as exceptions either way."""
    import ray

    if ray.is_initialized():
        return
    quiet = not is_verbose()
    if quiet:
        _quiet_console("ray")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=ray_log_level())
    else:  # a local instance sized to this machine
        os.environ.setdefault("RAY_LOGGER_LEVEL", ray_log_level().lower())  # its workers inherit it
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")  # passed on to each fit's controller
        # inherited by every process of the instance; a value inherited from another job's is replaced
        dashboard_port = _free_port(preferred=8265)  # Ray's default, when free
        os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{dashboard_port}"
        ray.init(logging_level=ray_log_level(), dashboard_port=dashboard_port)
    if quiet:
        import ray.data  # its loggers are configured on import

        ray.data.DataContext.get_current().enable_progress_bars = False  # sisray prints its own progress
        _quiet_console("ray.data")


def _free_port(preferred: int) -> int:
    """`preferred` if nothing listens on it on loopback, else a port the OS has free."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


def _quiet_console(logger: str) -> None:
    """Ray's console handlers of `logger`: warnings and errors only, without RAY_NOISE. Its log files
    (other handlers) keep every record."""
    for handler in logging.getLogger(logger).handlers:
        handler.addFilter(_DropNoise())
        if not type(handler).__name__.endswith("FileHandler"):
            handler.setLevel(max(handler.level, logging.WARNING))


@dataclass(frozen=True)
class Workers:
    count: int
    use_gpu: bool
    cpus_each: float
    threads_each: int  # torch threads per worker on CPU


_SIZE: dict[str, tuple[float, float]] = {}  # each cluster's (CPUs, GPUs) as first seen, by GCS address


def _cluster() -> tuple[float, float]:
    """The (CPUs, GPUs) of the Ray cluster this process is connected to, read once per cluster:
    every stage of a job is sized from the cluster it started on. A node lost mid-run (replaced or
    not) then changes no later stage's count of actors, workers or threads, so the run's results stay
    those of an uninterrupted one. To use nodes that join later, set train.num_workers and
    resources.num_actors. Ray is started here, when a job's first stage needs it (`start_ray`)."""
    import ray

    start_ray()
    address = ray.get_runtime_context().gcs_address
    if address not in _SIZE:
        resources = ray.cluster_resources()
        _SIZE[address] = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    return _SIZE[address]


def use_gpu(cfg: Config, gpus: float) -> bool:
    if cfg.resources.device == "cpu":
        return False
    if cfg.resources.device == "cuda" and gpus < 1:
        from sisray.errors import ConfigError

        raise ConfigError("resources.device = cuda, but the Ray cluster has no GPU")
    return gpus >= 1


def train_workers(cfg: Config) -> Workers:
    """One worker per GPU when there are GPUs, else one per CPU core (at most the batch size)."""
    cpus, gpus = _cluster()
    gpu = use_gpu(cfg, gpus)
    count = cfg.train.num_workers or (int(gpus) if gpu else max(1, int(cpus)))
    count = min(count, cfg.train.batch_size)
    while cfg.train.batch_size % count:  # an even split keeps the global batch exact
        count -= 1
    return Workers(count, gpu, cfg.resources.cpus_per_worker, max(1, int(cpus) // count))


@dataclass(frozen=True)
class Actors:
    count: int
    use_gpu: bool
    threads_each: int
    batch_size: int
    resources: dict  # map_batches resource arguments per actor


# An actor costs about 3.5 CPU-seconds before its first image (Python, Ray, torch, the model). On 2
# cores a second actor pays only from 64 images of the default's scoring (bench/README.md, "Actors
# per pass"), so a pass gets at most one actor per IMAGES_PER_ACTOR images of work.
IMAGES_PER_ACTOR = 64


def inference_actors(cfg: Config, items: int, work_each: int = 1) -> Actors:
    """One actor per GPU when there are GPUs, else one per CPU core, and at most one per
    IMAGES_PER_ACTOR images of work (`items` x `work_each`), unless resources.num_actors sets the
    count; never more actors than items."""
    cpus, gpus = _cluster()
    gpu = use_gpu(cfg, gpus)
    count = cfg.resources.num_actors or min(int(gpus) if gpu else max(1, int(cpus)),
                                            math.ceil(items * work_each / IMAGES_PER_ACTOR))
    count = max(1, min(count, items))
    # Fractional CPUs leave room for Ray Data's read tasks (a pool at 1 CPU each can starve them).
    resources = {"num_gpus": 1} if gpu else {"num_cpus": cfg.resources.cpus_per_actor}
    return Actors(count, gpu, max(1, int(cpus) // count), cfg.resources.actor_batch_size, resources)


_PASSES = [0]  # Ray Data passes, Ray tasks and Ray Train fits this process has run (stage_errors)


def passes_run() -> int:
    """How many Ray Data passes, Ray tasks and Ray Train fits this process has started."""
    return _PASSES[0]


@contextmanager
def stage_errors(stage: str):
    """Around each Ray Data pass, Ray task and Ray Train fit (each is counted: `passes_run`): re-raise
    a sisray error raised inside a Ray actor as itself, with its message (which names the file or
    value), instead of Ray's wrapped traceback of the actor."""
    from sisray import errors

    _PASSES[0] += 1
    try:
        yield
    except errors.SisrayError:
        raise
    except Exception as exc:
        match = re.search(r"sisray\.errors\.(\w+): (.*)", str(exc))
        kind = getattr(errors, match[1], None) if match else None
        if isinstance(kind, type) and issubclass(kind, errors.SisrayError):
            raise kind(f"{stage}: {match[2]}") from None
        raise
