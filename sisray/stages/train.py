"""Training on Ray Train, driven from the job: DDP over workers (gloo on CPU, NCCL with one GPU
each), the stage's length and rate decided here, checkpoints published into the run directory
(RUN/source/checkpoint/, RUN/round_XX/checkpoint/). The worker's side is `train_loop.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from sisray import storage
from sisray.cluster import Workers, ray_log_level, stage_errors, train_workers
from sisray.config import Config, with_absolute_paths
from sisray.errors import SisrayError
from sisray.models import checkpoint_file
from sisray.patch_set import count_rows
from sisray.rundir import MODEL, TARGET_BN_MODEL, TRAIN_STATE, RunDir, round_name
from sisray.sampling import RareClassSampler, rare_class_sampler
from sisray.stages.label_space import label_space
from sisray.stages.train_loop import TrainSpec, holdout_split, read_train_state, train_loop, training_set
from sisray.storage import RunStore
from sisray.target_statistics import report
from sisray.tracking import RunLogger


HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def steps_for(epochs: float, samples: int, batch_size: int) -> int:
    return max(1, math.ceil(epochs * samples / batch_size))


def source_steps(cfg: Config, samples: int) -> tuple[int, int]:
    """The source stage's steps over `samples` labelled images, and the length of its rate schedule."""
    steps = steps_for(cfg.train.source_epochs, samples, cfg.train.batch_size)
    schedule = cfg.train.source_schedule_epochs
    return steps, max(steps, steps_for(schedule, samples, cfg.train.batch_size)) if schedule else steps


def fit(cfg: Config, spec: TrainSpec, store: RunStore, name: str, loop=None):
    """Run `train_loop` (or `loop`, which wraps it: the fault tests) on Ray Train; returns Ray
    Train's result (final checkpoint and its metrics). A worker that dies is restarted once, from
    the last checkpoint (FailureConfig(max_failures=1)).

    Ray Train keeps its checkpoints in RUN/<name>/train/ (at the remote location for a remote run
    directory); re-running with the same run directory resumes from the last one.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    workers = train_workers(cfg)
    spec = dataclasses.replace(spec, config=with_absolute_paths(spec.config), ray_log_level=ray_log_level())
    storage_path, storage_filesystem = store.train_storage(name)
    # Ray Train's controller polls its workers every 2 s by default, so every fit() ends up to 2 s
    # after its last step; 0.25 s polls cost nothing measurable (passed on to the controller).
    os.environ.setdefault(HEALTH_CHECK_ENV, "0.25")
    trainer = TorchTrainer(
        loop or train_loop,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="nccl" if workers.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers.count, use_gpu=workers.use_gpu,
                                               resources_per_worker={"CPU": workers.cpus_each}),
        run_config=ray.train.RunConfig(
            name="train", storage_path=storage_path, storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=1, controller_failure_limit=2),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(log_level=ray_log_level())),
    )
    try:
        with stage_errors("training"):
            result = fit_interruptibly(trainer)
    except ray.train.TrainingFailedError as exc:
        raise SisrayError(f"training failed: {exc}") from exc
    if result.checkpoint is None:
        raise SisrayError(f"training of {name} finished without a checkpoint in {store.location}")
    return result


def fit_interruptibly(trainer):
    """trainer.fit() on a helper thread. On the main thread Ray Train installs its own Ctrl-C handler,
    which aborts the run and then exits 1 with Ray's messages; here Ctrl-C is a KeyboardInterrupt at
    once (the job exits 130, and the same command resumes from the last checkpoint)."""
    outcome: dict = {}

    def fit_and_keep_the_outcome() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit_and_keep_the_outcome, name="ray-train-fit", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def finished_step(checkpoint: Path) -> int:
    """The step a published checkpoint was saved at (0 if there is none)."""
    state = checkpoint / TRAIN_STATE
    return read_train_state(state)["step"] if state.is_file() else 0


def publish_checkpoint(files: Iterable[str | Path], destination: Path, renamed: dict[str, str] | None = None) -> None:
    """Copy checkpoint files (paths or URIs) into the directory `destination` atomically (copy
    beside it, then rename); a file named as a key of `renamed` takes its value as name."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        for item in files:
            name = Path(str(item).partition("?")[0]).name
            (staging / (renamed or {}).get(name, name)).write_bytes(storage.read_bytes(item))
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_result(result, destination: Path, target_bn: Path | None = None) -> None:
    """Ray Train's final checkpoint (local or remote) as RUN/<stage>/checkpoint/; with `target_bn`,
    its model with target BatchNorm statistics as TARGET_BN/model.pt, beside the same train_state.pt."""
    with result.checkpoint.as_directory() as folder:
        files = sorted(Path(folder).iterdir())
        publish_checkpoint([f for f in files if f.name != TARGET_BN_MODEL], destination)
        if target_bn:
            publish_checkpoint([Path(folder) / TARGET_BN_MODEL, Path(folder) / TRAIN_STATE], target_bn,
                               renamed={TARGET_BN_MODEL: MODEL})
            report(result.metrics["target_bn_images"], result.metrics["target_bn_skipped"])


def train_source(cfg: Config, store: RunStore, logger: RunLogger | None) -> Path:
    """Source-only training: writes RUN/source/checkpoint/ (model.pt + train_state.pt)."""
    dataset = training_set(cfg)  # validated here, before any worker starts
    trained, _ = holdout_split(len(dataset), cfg.train.holdout, cfg.seed)
    steps, schedule_steps = source_steps(cfg, len(trained))
    folder = RunDir(store.local).source
    destination = folder.checkpoint
    if finished_step(destination) >= steps:
        return destination
    workers = train_workers(cfg)
    spec = TrainSpec(cfg, folder.name, steps, cfg.model.init, workers.threads_each, logger,
                     lr=cfg.train.lr, schedule_steps=schedule_steps, classes=label_space(cfg, store),
                     sampler=labelled_sampler(cfg, store), prefetch=prefetch_depth(cfg, workers))
    publish_result(fit(cfg, spec, store, folder.name), destination)
    return destination


def labelled_sampler(cfg: Config, store: RunStore) -> RareClassSampler | None:
    """How a stage draws its labelled images: rare-class sampling (`train.rare_class_sampling`) over
    the trained ones, from the run's counted label space; None: each once an epoch, in seeded order."""
    if cfg.train.rare_class_sampling is None:
        return None
    label_space(cfg, store)  # counted once per run
    counted = json.loads(RunDir(store.local).label_space.read_text())
    trained, _ = holdout_split(counted["labels"], cfg.train.holdout, cfg.seed)
    return rare_class_sampler(counted, trained, cfg.train.rare_class_sampling)


def train_round(cfg: Config, store: RunStore, round_: int, previous: str, logger: RunLogger | None,
                target_bn: bool = False) -> Path:
    """Retraining of one round on the labelled set + the round's patch set (RUN/round_XX/patches/),
    from the previous model (a location workers can read) and its optimiser state: writes
    RUN/round_XX/checkpoint/, and with `target_bn` the model with target BatchNorm statistics,
    re-estimated by the first worker after the last step (RUN/round_XX/target_bn/). Its length is
    `train.epochs_per_round` passes over the patch set; a round without patches keeps the model
    (its target statistics are then a stage of their own, stages/target_bn.py)."""
    folder = RunDir(store.local).round(round_)
    stage, destination, patches = folder.name, folder.checkpoint, folder.patches
    samples = count_rows(patches)
    steps = steps_for(cfg.train.epochs_per_round, samples, cfg.train.batch_size) if samples else 0
    if finished_step(destination) >= steps and (destination / MODEL).is_file():
        return destination
    model = checkpoint_file(previous)
    # A sisray checkpoint directory carries its optimiser state; a bare state-dict file does not.
    state = storage.join(previous, TRAIN_STATE) if storage.is_dir(previous) else None
    state = state if state and storage.is_file(state) else None
    if not samples:
        publish_checkpoint([f for f in (model, state) if f], destination)
        return destination
    spec = round_spec(cfg, round_, steps, model, state, store.shared(patches), train_workers(cfg), logger,
                      labelled_sampler(cfg, store), target_bn)
    publish_result(fit(cfg, spec, store, stage), destination, folder.target_bn.checkpoint if target_bn else None)
    return destination


def round_spec(cfg: Config, round_: int, steps: int, model: str, carried_state: str | None, patches: str,
               workers: Workers, logger: RunLogger | None, sampler: RareClassSampler | None = None,
               target_bn: bool = False) -> TrainSpec:
    """What the workers of a round's retraining run, every value resolved here: the rounds' rate
    (train.round_lr, else train.lr, else the model's recipe), warm-up steps, BatchNorm, EMA, how its
    labelled images are drawn and how far ahead they are loaded, and whether its final checkpoint
    holds the model with target BatchNorm statistics."""
    return TrainSpec(cfg, round_name(round_), steps, model, workers.threads_each, logger, round_, patches,
                     carried_state, lr=cfg.train.round_lr or cfg.train.lr,
                     warmup_steps=round(cfg.train.round_warmup * steps), frozen_bn=cfg.train.round_bn == "frozen",
                     ema_decay=cfg.lse.ema_decay, online_teacher=cfg.lse.online_teacher, sampler=sampler,
                     prefetch=prefetch_depth(cfg, workers), target_bn=target_bn)


def prefetch_depth(cfg: Config, workers: Workers) -> int:
    """Batches a worker loads ahead: train.prefetch, else 2 on GPUs and none on CPU cores."""
    if cfg.train.prefetch is not None:
        return cfg.train.prefetch
    return 2 if workers.use_gpu else 0
