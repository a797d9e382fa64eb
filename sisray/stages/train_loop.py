"""The per-worker loop of Ray Train (docs/METHOD.md step 5) and what it needs: the stage's spec,
seeded batches, one optimiser step, checkpoints reported to Ray Train.

Length is counted in samples (`epochs x dataset size`), split into global batches of
`train.batch_size` that the workers share evenly, so neither the batch size nor the number of
workers changes how much is trained. Which samples form global batch k, and every random draw of
step k on rank r, are functions of (seed, k, r): a run resumed from a checkpoint at step k continues
exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from sisray import storage
from sisray.augment import class_colours, class_mix, fourier_style, photometric
from sisray.config import Config
from sisray.datasets import SegmentationDataset, open_source, open_target
from sisray.labels import NUM_CLASSES
from sisray.lse.losses import cross_entropy, lse_target_loss
from sisray.lse.online import relabelled
from sisray.models import build_model, load_state
from sisray.models.common import autocast
from sisray.optim import freeze_batchnorm_statistics, make_optimizer, moving_average
from sisray.patch_set import PatchDataset
from sisray.prefetch import prefetched
from sisray.progress import Progress
from sisray.rundir import MODEL, ONLINE_TEACHER, STUDENT, TARGET_BN_MODEL, TRAIN_STATE
from sisray.sampling import RareClassSampler
from sisray.target_statistics import with_target_statistics
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
    schedule_steps: int | None = None  # the rate schedule's length (None: steps); longer: stopped before its end
    prefetch: int = 0  # batches loaded ahead on as many threads (train.prefetch); 0: on the training thread
    warmup_steps: int = 0  # linear warm-up of the rate
    frozen_bn: bool = False  # BatchNorm layers keep their running statistics (eval mode) while training
    classes: tuple[int, ...] | None = None  # the label space this stage sets; None: the init checkpoint's
    ema_decay: float | None = None  # publish the moving average of the weights (lse.ema_decay) instead of the last
    online_teacher: float | None = None  # EMA decay of the teacher re-drawing the patches' labels (lse.online_teacher)
    sampler: RareClassSampler | None = None  # draws the labelled images (train.rare_class_sampling); None: epochs
    ray_log_level: str = "INFO"  # of Ray Train's own logs in the worker (the driver's: cluster.ray_log_level)
    target_bn: bool = False  # the final checkpoint also holds the model with target BatchNorm statistics (lse.target_bn)


def stream_seed(seed: int, round_: int, stream: int) -> int:
    """The seed of one sample stream (0: labelled, 1: patches) of one round."""
    return int(np.random.SeedSequence([seed, round_, stream]).generate_state(1)[0]) if round_ else seed


def labelled_batch(spec: TrainSpec, step: int, samples: int) -> list[int]:
    """Positions in the stage's `samples` trained labelled images of global batch `step`: drawn by the
    rare-class sampler when the stage has one, else the seeded epochs of `global_batch`."""
    seed, size = stream_seed(spec.config.seed, spec.round, 0), spec.config.train.batch_size
    return spec.sampler.batch(step, size, seed) if spec.sampler else global_batch(step, size, samples, seed)


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


def holdout_split(samples: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """(trained, held out) indices of the labelled set: a seeded `share` of it kept out of training
    (train.holdout). Without a share every sample is trained, in the order it always was."""
    held = round(share * samples)
    if not held:
        return list(range(samples)), []
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + 999_983))
    out = set(order[:held].tolist())
    return [i for i in range(samples) if i not in out], sorted(out)


@torch.no_grad()
def held_out_loss(model, dataset, indices: list[int], device: torch.device, batch_size: int) -> float:
    """The mean cross-entropy per labelled pixel of the held-out images, in eval mode."""
    was_training = model.training
    model.eval()
    total, pixels = 0.0, 0
    for start in range(0, len(indices), batch_size):
        images, labels = load_batch(dataset, indices[start:start + batch_size], device)
        valid = int((labels != 255).sum())
        total += cross_entropy(model(images), labels).item() * valid
        pixels += valid
    model.train(was_training)
    return total / max(pixels, 1)


def training_set(cfg: Config) -> SegmentationDataset:
    """The labelled set of the source stage: the source, or with `train.oracle` the target's train labels."""
    if cfg.train.oracle:
        return open_target(cfg.data.target, "train", with_labels=True)
    return open_source(cfg.data.source)


def load_batch(dataset, indices: list[int], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The dataset's items at `indices`, stacked field by field: (images, labels[, weights])."""
    items = [dataset[i] for i in indices]
    return tuple(torch.stack(field).to(device, non_blocking=True) for field in zip(*items))


def _save_checkpoint(folder: Path, model, optimizer, scheduler, step: int, seed: int,
                     average: AveragedModel | None, holdout_curve: list, teacher: AveragedModel | None,
                     adapted: dict | None) -> None:
    # model.pt is a plain state dict, usable on its own (evaluate --checkpoint, model.init): the
    # moving average when there is one; the trained weights then go to student.pt, for resuming.
    if average is not None:
        torch.save(model.state_dict(), folder / STUDENT)
        model = average.module
    torch.save(model.state_dict(), folder / MODEL)
    if teacher is not None:
        torch.save(teacher.module.state_dict(), folder / ONLINE_TEACHER)
    if adapted is not None:
        torch.save(adapted, folder / TARGET_BN_MODEL)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "seed": seed, "holdout_loss": holdout_curve}, folder / TRAIN_STATE)


def _report(metrics: dict, rank: int, model, optimizer, scheduler, step: int, seed: int,
            average: AveragedModel | None = None, holdout_curve: list = (), teacher: AveragedModel | None = None,
            adapted: dict | None = None) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            _save_checkpoint(Path(tmp), model, optimizer, scheduler, step, seed, average, list(holdout_curve), teacher,
                             adapted)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _forward(net, images, precision: str):
    with autocast(precision, images.device):
        return net(images)


def training_step(net, optimizer, labelled: tuple, patches: tuple | None, beta: float, gamma: float,
                  precision: str = "fp32") -> dict[str, float]:
    """One optimiser step on L = CE(labelled) [+ CE(patches) + beta * FL(patches)] (docs/METHOD.md step 5).

    The two terms are backpropagated one after the other into the same gradient (half the peak
    memory of one graph holding both batches); under DDP the first backward skips the all-reduce,
    so gradients are synchronised once per step."""
    optimizer.zero_grad(set_to_none=True)
    sync_later = net.no_sync() if patches is not None and hasattr(net, "no_sync") else contextlib.nullcontext()
    with sync_later:
        source_loss = cross_entropy(_forward(net, labelled[0], precision), labelled[1])
        source_loss.backward()
    parts = {"loss": source_loss.item()}
    if patches is not None:
        weights = patches[2] if len(patches) > 2 else None  # the teacher's confidence (lse.confidence_weight)
        target_loss = lse_target_loss(_forward(net, patches[0], precision), patches[1], beta, gamma, weights)
        target_loss.backward()
        parts = {"loss": parts["loss"] + target_loss.item(), "source_ce": source_loss.item(),
                 "target_loss": target_loss.item()}
    optimizer.step()
    return parts


def final_target_statistics(spec: TrainSpec, published: torch.nn.Module, device: torch.device, rank: int,
                            world: int, metrics: dict) -> dict | None:
    """With `spec.target_bn`, on the first worker: the published model's state with BatchNorm
    statistics of the target-train images (its images used and skipped go into `metrics`). The other
    workers wait at the final report meanwhile, so their threads are used too."""
    if not spec.target_bn or rank != 0:
        return None
    torch.set_num_threads(spec.threads * world)
    try:
        adapted, seen, skipped = with_target_statistics(spec.config, copy.deepcopy(published), device)
    finally:
        torch.set_num_threads(spec.threads)
    metrics.update(target_bn_images=seen, target_bn_skipped=skipped)
    return adapted


def read_train_state(location: str | Path) -> dict:
    """train_state.pt (optimiser, scheduler, step) from a path or a URI."""
    return torch.load(io.BytesIO(storage.read_bytes(location)), map_location="cpu", weights_only=True)


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
    trained_ids, held_out_ids = holdout_split(len(dataset), cfg.train.holdout, cfg.seed)
    # without pseudo-labels (the continued-source control) a round trains as many steps on the source alone
    patches = (PatchDataset(spec.patches, cfg.data.target.size, cfg.lse.confidence_weight)
               if spec.patches and cfg.train.pseudo_labels else None)
    torch.manual_seed(cfg.seed)  # the same random initialisation on every rank and every run
    model = build_model(cfg.model.name, NUM_CLASSES, cfg.model.width, spec.init)
    if spec.classes is not None:
        model.label_space.restrict(spec.classes)
    carried = read_train_state(spec.carried_state)["optimizer"] if spec.carried_state else None
    optimizer, scheduler = make_optimizer(model, spec.lr, spec.schedule_steps or spec.steps, carried,
                                          spec.warmup_steps)
    average = moving_average(model, spec.ema_decay) if spec.ema_decay else None
    teacher = moving_average(model, spec.online_teacher) if spec.online_teacher and spec.patches else None
    start = 0
    holdout_curve: list[list[float]] = []  # [step, held-out loss] at every checkpoint
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as folder:
            trained = Path(folder) / (STUDENT if average is not None else MODEL)
            load_state(model, torch.load(trained, weights_only=True), "the restored checkpoint")
            if average is not None:
                load_state(average.module, torch.load(Path(folder) / MODEL, weights_only=True),
                           "the restored checkpoint's moving average")
            if teacher is not None:
                load_state(teacher.module, torch.load(Path(folder) / ONLINE_TEACHER, weights_only=True),
                           "the restored checkpoint's online teacher")
            state = torch.load(Path(folder) / TRAIN_STATE, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
        holdout_curve = state.get("holdout_loss", [])
        for moving in (average, teacher):
            if moving is not None:
                moving.n_averaged.fill_(start)  # already averaging: the next update must not restart it
    net = ray.train.torch.prepare_model(model)  # device placement, and DDP when world > 1
    for moving in (average, teacher):  # copies made before the placement: on the model's device too
        if moving is not None:
            moving.to(device)
    per_worker = cfg.train.batch_size // world
    mine = slice(rank * per_worker, (rank + 1) * per_worker)
    logged: dict[str, list[float]] = {}
    step_times: list[float] = []
    progress = Progress(f"{spec.stage} training", spec.steps, "steps", start) if rank == 0 else None
    def load_step(step: int) -> tuple[tuple, tuple | None]:
        """This rank's share of global batch `step`: labelled images, and the round's patches."""
        indices = labelled_batch(spec, step, len(trained_ids))
        labelled = load_batch(dataset, [trained_ids[i] for i in indices[mine]], device)
        if patches is None:
            return labelled, None
        indices = global_batch(step, cfg.train.batch_size, len(patches), stream_seed(cfg.seed, spec.round, 1))
        return labelled, load_batch(patches, indices[mine], device)

    def published_model() -> torch.nn.Module:
        """What model.pt holds: the moving average of the weights (lse.ema_decay), else the weights."""
        return average.module if average is not None else model

    batches = prefetched(load_step, range(start, spec.steps), spec.prefetch)
    for step in range(start, spec.steps):
        began = time.perf_counter()
        labelled, pseudo = next(batches)  # the wait for it counts in the step's time
        # dropout and augmentation draws: a function of (seed, round, step, rank)
        draws = cfg.seed * 1_000_003 + spec.round * 104_729 + step * 7919 + rank
        torch.manual_seed(draws)
        net.train()
        if spec.frozen_bn:
            freeze_batchnorm_statistics(net)
        augmentation = torch.Generator().manual_seed(draws)
        if pseudo is not None and cfg.lse.fourier_style:  # before the jitter, which then varies the target's look
            labelled = (fourier_style(labelled[0], pseudo[0], cfg.lse.fourier_style), labelled[1])
        if cfg.train.class_colours:
            labelled = (class_colours(labelled[0], labelled[1], augmentation), labelled[1])
        if cfg.train.photometric:
            labelled = (photometric(labelled[0], augmentation), labelled[1])
        if pseudo is not None:
            if teacher is not None:  # before mixing: the teacher labels the patch, not the pasted source
                pseudo = (pseudo[0], relabelled(teacher.module, pseudo[0], pseudo[1], cfg.lse.scale), *pseudo[2:])
            if cfg.lse.classmix:
                pseudo = class_mix(labelled, pseudo, augmentation)
            if cfg.train.photometric_patches:
                pseudo = (photometric(pseudo[0], augmentation), *pseudo[1:])
        parts = training_step(net, optimizer, labelled, pseudo, cfg.lse.beta, cfg.lse.gamma, cfg.model.precision)
        scheduler.step()
        for moving in (average, teacher):
            if moving is not None:
                moving.update_parameters(model)
        for key, value in parts.items():
            logged.setdefault(key, []).append(value)
        step_times.append(time.perf_counter() - began)
        done = step + 1
        if progress:
            progress.advance(1, f"loss {parts['loss']:.3f}")
        if rank == 0 and spec.logger and (done % cfg.train.log_every == 0 or done == spec.steps):
            spec.logger.metrics({**{f"{spec.stage}/{k}": sum(v) / len(v) for k, v in logged.items()},
                                 f"{spec.stage}/lr": scheduler.get_last_lr()[0]}, step=done)
            logged = {}
        if done % cfg.train.checkpoint_every == 0 or done == spec.steps:
            # steady-state throughput: the median step leaves out the warm-up of the first steps
            samples_per_s = cfg.train.batch_size / statistics.median(step_times)
            metrics = {"step": done, "loss": parts["loss"], "resumed_from": start, "samples_per_s": samples_per_s}
            if held_out_ids and rank == 0:  # the published model's loss on the labelled images it never saw
                holdout_curve.append([done, held_out_loss(published_model(), dataset, held_out_ids, device, per_worker)])
                metrics["holdout_loss"] = holdout_curve[-1][1]
                if spec.logger:
                    spec.logger.metrics({f"{spec.stage}/holdout_loss": holdout_curve[-1][1]}, step=done)
            adapted = final_target_statistics(spec, published_model(), device, rank, world, metrics) \
                if done == spec.steps else None
            _report(metrics, rank, model, optimizer, scheduler, done, cfg.seed, average, holdout_curve, teacher, adapted)
    if start >= spec.steps:  # resumed after the last step: hand the final checkpoint back again
        metrics = {"step": start, "loss": float("nan"), "resumed_from": start}
        adapted = final_target_statistics(spec, published_model(), device, rank, world, metrics)
        _report(metrics, rank, model, optimizer, scheduler, start, cfg.seed, average, holdout_curve, teacher, adapted)
    if rank == 0 and spec.logger:  # what a stopped tracking server did not take, sent or named
        spec.logger.close()
