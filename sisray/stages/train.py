"""Training on Ray Train: DDP over workers (gloo on CPU, NCCL with one GPU each), checkpoints in the run dir.

Length is counted in samples (`epochs x dataset size`), split into global batches of
`train.batch_size` that the workers share evenly, so neither the batch size nor the number of
workers changes how much is trained. Which samples form global batch k, and every random draw of
step k on rank r, are functions of (seed, k, r): a run resumed from a checkpoint at step k continues
exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from sisray import storage
from sisray.augment import photometric
from sisray.cluster import ray_log_level, train_workers
from sisray.config import Config, with_absolute_paths
from sisray.datasets import SegmentationDataset, open_source, open_target, source_classes, target_eval_classes
from sisray.errors import SisrayError
from sisray.labels import NUM_CLASSES
from sisray.lse.losses import cross_entropy, lse_target_loss
from sisray.models import build_model, checkpoint_file, load_state
from sisray.models.common import batchnorm_layers
from sisray.patch_set import PatchDataset, count_rows
from sisray.rundir import MODEL, STUDENT, TRAIN_STATE, RunDir
from sisray.storage import RunStore
from sisray.tracking import RunLogger

@dataclass(frozen=True)
class TrainSpec:
    """Everything a worker needs, decided on the driver (picklable)."""
    config: Config
    stage: str  # "source", or "round_XX" for the retraining of a round
    steps: int
    init: str  # model init for this stage: random, imagenet or a checkpoint path
    threads: int
    logger: RunLogger | None
    round: int = 0
    patches: str | None = None  # a round's patch set: each step adds a pseudo-labelled batch
    carried_state: str | None = None  # train_state.pt of the previous stage: its optimiser state carries over
    lr: float | None = None  # base rate of this stage (None: the model's recipe)
    warmup_steps: int = 0  # linear warm-up of the rate
    frozen_bn: bool = False  # BatchNorm layers keep their running statistics (eval mode) while training
    classes: tuple[int, ...] | None = None  # the label space this stage sets; None: the init checkpoint's
    ema_decay: float | None = None  # publish the moving average of the weights (lse.ema_decay) instead of the last
    ray_log_level: str = "INFO"  # of Ray Train's own logs in the worker (the driver's: cluster.ray_log_level)


HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def stream_seed(seed: int, round_: int, stream: int) -> int:
    """The seed of one sample stream (0: labelled, 1: patches) of one round."""
    return int(np.random.SeedSequence([seed, round_, stream]).generate_state(1)[0]) if round_ else seed


def steps_for(epochs: float, samples: int, batch_size: int) -> int:
    return max(1, math.ceil(epochs * samples / batch_size))


def global_batch(step: int, batch_size: int, samples: int, seed: int) -> list[int]:
    """Sample indices of global batch `step`: consecutive slices of a stream of seeded per-epoch
    permutations (every sample once per epoch)."""
    out: list[int] = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position + len(out), samples)
        order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out += order[offset: offset + batch_size - len(out)].tolist()
    return out


def param_groups(model: torch.nn.Module, lr: float) -> list[dict]:
    """Trainable parameters grouped by rate: the recipe's head and bias multipliers (lowest rate first)."""
    recipe = model.RECIPE
    head = {id(p) for p in model.head_parameters()}
    groups: dict[float, list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            rate = lr * (recipe.head_lr if id(param) in head else 1.0) * (recipe.bias_lr if name.endswith("bias") else 1.0)
            groups.setdefault(rate, []).append(param)
    return [{"params": params, "lr": rate} for rate, params in sorted(groups.items())]


def make_optimizer(model: torch.nn.Module, lr: float | None, total_steps: int, carried: dict | None = None,
                   warmup_steps: int = 0):
    """The model's recipe (`model.RECIPE`) at base rate `lr` (None: the recipe's): the optimiser and its
    schedule, a linear warm-up over `warmup_steps` then constant or poly 0.9 over `total_steps`.
    `carried` is the optimiser state of the previous stage (moments, momentum): it is loaded, but
    every group starts again at its configured rate."""
    recipe = model.RECIPE
    groups = param_groups(model, lr or recipe.lr)
    if recipe.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    else:
        kind = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
        optimizer = kind(groups, betas=recipe.betas, weight_decay=recipe.weight_decay)

    def schedule(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        return warm * ((1 - min(step, total_steps) / total_steps) ** 0.9 if recipe.poly else 1.0)

    if carried:
        rates = [g["lr"] for g in optimizer.param_groups]
        optimizer.load_state_dict(carried)
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
            group.pop("initial_lr", None)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def freeze_batchnorm_statistics(model: torch.nn.Module) -> None:
    """BatchNorm layers normalise with their running statistics and leave them as they are; their
    affine parameters still train."""
    for layer in batchnorm_layers(model):
        layer.eval()


def training_set(cfg: Config) -> SegmentationDataset:
    """The labelled set of the source stage: the source, or with `train.oracle` the target's train labels."""
    if cfg.train.oracle:
        return open_target(cfg.data.target, "train", with_labels=True)
    return open_source(cfg.data.source)


def training_classes(cfg: Config) -> tuple[int, ...]:
    """The classes the source stage's labels contain: the label space of the model it trains."""
    return target_eval_classes(cfg.data.target) if cfg.train.oracle else source_classes(cfg.data.source)


def load_batch(dataset, indices: list[int], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The dataset's items at `indices`, stacked field by field: (images, labels[, weights])."""
    items = [dataset[i] for i in indices]
    return tuple(torch.stack(field).to(device, non_blocking=True) for field in zip(*items))


def moving_average(model: torch.nn.Module, decay: float) -> AveragedModel:
    """The exponential moving average of `model`'s weights and BatchNorm statistics."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _save_checkpoint(folder: Path, model, optimizer, scheduler, step: int, seed: int,
                     average: AveragedModel | None) -> None:
    # model.pt is a plain state dict, usable on its own (evaluate --checkpoint, model.init): the
    # moving average when there is one; the trained weights then go to student.pt, for resuming.
    if average is not None:
        torch.save(model.state_dict(), folder / STUDENT)
        model = average.module
    torch.save(model.state_dict(), folder / MODEL)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "seed": seed}, folder / TRAIN_STATE)


def _report(metrics: dict, rank: int, model, optimizer, scheduler, step: int, seed: int,
            average: AveragedModel | None = None) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            _save_checkpoint(Path(tmp), model, optimizer, scheduler, step, seed, average)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _forward(net, images, use_amp: bool):
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=use_amp):
        return net(images)


def training_step(net, optimizer, labelled: tuple, patches: tuple | None, beta: float, gamma: float,
                  use_amp: bool = False) -> dict[str, float]:
    """One optimiser step on L = CE(labelled) [+ CE(patches) + beta * FL(patches)] (docs/METHOD.md step 5).

    The two terms are backpropagated one after the other into the same gradient (half the peak
    memory of one graph holding both batches); under DDP the first backward skips the all-reduce,
    so gradients are synchronised once per step."""
    optimizer.zero_grad(set_to_none=True)
    sync_later = net.no_sync() if patches is not None and hasattr(net, "no_sync") else contextlib.nullcontext()
    with sync_later:
        source_loss = cross_entropy(_forward(net, labelled[0], use_amp), labelled[1])
        source_loss.backward()
    parts = {"loss": source_loss.item()}
    if patches is not None:
        weights = patches[2] if len(patches) > 2 else None  # the teacher's confidence (lse.confidence_weight)
        target_loss = lse_target_loss(_forward(net, patches[0], use_amp), patches[1], beta, gamma, weights)
        target_loss.backward()
        parts = {"loss": parts["loss"] + target_loss.item(), "source_ce": source_loss.item(),
                 "target_loss": target_loss.item()}
    optimizer.step()
    return parts


def train_loop(loop_config: dict) -> None:
    """The per-worker loop of Ray Train. Each step: a labelled batch (CE), and in a round also a
    batch of scale-invariant examples with their pseudo-labels (CE + beta * FL, docs/METHOD.md step 5)."""
    import ray.train
    import ray.train.torch

    spec: TrainSpec = loop_config["spec"]
    cfg = spec.config
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # Ray Train's per-report INFO line is logged outside its `ray.train` logger, past its LoggingConfig
    logging.getLogger().setLevel(spec.ray_log_level)
    torch.set_num_threads(spec.threads)
    device = ray.train.torch.get_device()
    dataset = training_set(cfg)
    # without pseudo-labels (the continued-source control) a round trains as many steps on the source alone
    patches = (PatchDataset(spec.patches, cfg.data.target.size, cfg.lse.confidence_weight)
               if spec.patches and cfg.train.pseudo_labels else None)
    torch.manual_seed(cfg.seed)  # the same random initialisation on every rank and every run
    model = build_model(cfg.model.name, NUM_CLASSES, cfg.model.width, spec.init)
    if spec.classes is not None:
        model.label_space.restrict(spec.classes)
    carried = read_train_state(spec.carried_state)["optimizer"] if spec.carried_state else None
    optimizer, scheduler = make_optimizer(model, spec.lr, spec.steps, carried, spec.warmup_steps)
    average = moving_average(model, spec.ema_decay) if spec.ema_decay else None
    start = 0
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as folder:
            trained = Path(folder) / (STUDENT if average is not None else MODEL)
            load_state(model, torch.load(trained, weights_only=True), "the restored checkpoint")
            if average is not None:
                load_state(average.module, torch.load(Path(folder) / MODEL, weights_only=True),
                           "the restored checkpoint's moving average")
            state = torch.load(Path(folder) / TRAIN_STATE, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
        if average is not None:
            average.n_averaged.fill_(start)  # already averaging: the next update must not restart it
    net = ray.train.torch.prepare_model(model)  # device placement, and DDP when world > 1
    per_worker = cfg.train.batch_size // world
    mine = slice(rank * per_worker, (rank + 1) * per_worker)
    use_amp = device.type == "cuda"
    logged: dict[str, list[float]] = {}
    step_times: list[float] = []
    for step in range(start, spec.steps):
        began = time.perf_counter()
        # dropout and augmentation draws: a function of (seed, round, step, rank)
        draws = cfg.seed * 1_000_003 + spec.round * 104_729 + step * 7919 + rank
        torch.manual_seed(draws)
        net.train()
        if spec.frozen_bn:
            freeze_batchnorm_statistics(net)
        indices = global_batch(step, cfg.train.batch_size, len(dataset), stream_seed(cfg.seed, spec.round, 0))
        labelled = load_batch(dataset, indices[mine], device)
        if cfg.train.photometric:
            labelled = (photometric(labelled[0], torch.Generator().manual_seed(draws)), labelled[1])
        pseudo = None
        if patches is not None:
            indices = global_batch(step, cfg.train.batch_size, len(patches), stream_seed(cfg.seed, spec.round, 1))
            pseudo = load_batch(patches, indices[mine], device)
        parts = training_step(net, optimizer, labelled, pseudo, cfg.lse.beta, cfg.lse.gamma, use_amp)
        scheduler.step()
        if average is not None:
            average.update_parameters(model)
        for key, value in parts.items():
            logged.setdefault(key, []).append(value)
        step_times.append(time.perf_counter() - began)
        done = step + 1
        if rank == 0 and spec.logger and (done % cfg.train.log_every == 0 or done == spec.steps):
            spec.logger.metrics({**{f"{spec.stage}/{k}": sum(v) / len(v) for k, v in logged.items()},
                                 f"{spec.stage}/lr": scheduler.get_last_lr()[0]}, step=done)
            logged = {}
        if done % cfg.train.checkpoint_every == 0 or done == spec.steps:
            # steady-state throughput: the median step leaves out the warm-up of the first steps
            samples_per_s = cfg.train.batch_size / statistics.median(step_times)
            metrics = {"step": done, "loss": parts["loss"], "resumed_from": start, "samples_per_s": samples_per_s}
            _report(metrics, rank, model, optimizer, scheduler, done, cfg.seed, average)
    if start >= spec.steps:  # resumed after the last step: hand the final checkpoint back again
        metrics = {"step": start, "loss": float("nan"), "resumed_from": start}
        _report(metrics, rank, model, optimizer, scheduler, start, cfg.seed, average)


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


def read_train_state(location: str | Path) -> dict:
    """train_state.pt (optimiser, scheduler, step) from a path or a URI."""
    return torch.load(io.BytesIO(storage.read_bytes(location)), map_location="cpu", weights_only=True)


def finished_step(checkpoint: Path) -> int:
    """The step a published checkpoint was saved at (0 if there is none)."""
    state = checkpoint / TRAIN_STATE
    return read_train_state(state)["step"] if state.is_file() else 0


def publish_checkpoint(files: Iterable[str | Path], destination: Path) -> None:
    """Copy checkpoint files (paths or URIs) into the directory `destination` atomically (copy
    beside it, then rename)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        for item in files:
            (staging / Path(str(item).partition("?")[0]).name).write_bytes(storage.read_bytes(item))
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_result(result, destination: Path) -> None:
    """Ray Train's final checkpoint (local or remote) as RUN/<stage>/checkpoint/."""
    with result.checkpoint.as_directory() as folder:
        publish_checkpoint(sorted(Path(folder).iterdir()), destination)


def train_source(cfg: Config, store: RunStore, logger: RunLogger | None) -> Path:
    """Source-only training: writes RUN/source/checkpoint/ (model.pt + train_state.pt)."""
    dataset = training_set(cfg)  # validated here, before any worker starts
    steps = steps_for(cfg.train.source_epochs, len(dataset), cfg.train.batch_size)
    folder = RunDir(store.local).source
    destination = folder.checkpoint
    if finished_step(destination) >= steps:
        return destination
    workers = train_workers(cfg)
    spec = TrainSpec(cfg, folder.name, steps, cfg.model.init, workers.threads_each, logger,
                     lr=cfg.train.lr, classes=training_classes(cfg))
    publish_result(fit(cfg, spec, store, folder.name), destination)
    return destination


def train_round(cfg: Config, store: RunStore, round_: int, previous: str, logger: RunLogger | None) -> Path:
    """Retraining of one round on the labelled set + the round's patch set (RUN/round_XX/patches/),
    from the previous model (a location workers can read) and its optimiser state: writes
    RUN/round_XX/checkpoint/. Its length is `train.epochs_per_round` passes over the patch set; a
    round without patches keeps the model."""
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
    workers = train_workers(cfg)
    spec = TrainSpec(cfg, stage, steps, model, workers.threads_each, logger, round_,
                     store.shared(patches), state, lr=cfg.train.round_lr or cfg.train.lr,
                     warmup_steps=round(cfg.train.round_warmup * steps), frozen_bn=cfg.train.round_bn == "frozen",
                     ema_decay=cfg.lse.ema_decay)
    publish_result(fit(cfg, spec, store, stage), destination)
    return destination
