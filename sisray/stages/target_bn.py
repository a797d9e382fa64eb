"""Target BatchNorm statistics (`lse.target_bn`, beyond the paper): a model's BatchNorm running
means and variances re-estimated on the target train images before it scores them.

A source model normalises target features with source statistics; recomputing them on the target
(AdaBN, Li et al. 2016) is a label-free correction that costs one forward pass over the target set.
Every BatchNorm layer's statistics are reset and then set to the plain average of the batch
statistics over all target train images (fixed order, batches of `train.batch_size`, no gradient;
every other layer in eval mode). One Ray task does it, on a GPU where the cluster has one; the driver
writes the checkpoint: the model with the new statistics and, unchanged, the previous stage's
optimiser state, so the next round continues from it as from any checkpoint.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import torch

from sisray import storage
from sisray.cluster import inference_actors, stage_errors
from sisray.config import Config, with_absolute_paths
from sisray.errors import DatasetError, ModelError
from sisray.labels import NUM_CLASSES
from sisray.models import build_model, checkpoint_file
from sisray.models.common import batchnorm_layers
from sisray.rundir import MODEL, TRAIN_STATE
from sisray.stages.train import publish_checkpoint


@torch.no_grad()
def reestimate(model: torch.nn.Module, batches) -> int:
    """Replace every BatchNorm layer's running statistics by their average over `batches` (uint8 or
    float RGB, (N, 3, H, W)); returns the number of images seen. The model is left in eval mode."""
    layers = batchnorm_layers(model)
    if not layers:
        raise ModelError(f"lse.target_bn: {type(model).__name__} has no BatchNorm layer to re-estimate")
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the batches
        layer.train()
    seen = 0
    for images in batches:
        model(images)
        seen += len(images)
    for layer in layers:
        layer.momentum = 0.1
        layer.eval()
    return seen


def _target_statistics(cfg: Config, checkpoint: str, threads: int, use_gpu: bool) -> tuple[bytes, int, list[str]]:
    """Inside the Ray task: the re-estimated state dict (bytes), images used, images skipped."""
    from sisray.datasets import open_target

    torch.set_num_threads(threads)
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    dataset = open_target(cfg.data.target, "train", with_labels=False)
    model = build_model(cfg.model.name, NUM_CLASSES, cfg.model.width, checkpoint).to(device)
    skipped: list[str] = []

    def batches():
        size = cfg.train.batch_size
        for start in range(0, len(dataset), size):
            images = []
            for i in range(start, min(start + size, len(dataset))):
                try:
                    images.append(dataset.load_image(i))
                except DatasetError as exc:
                    if not cfg.data.target.skip_bad_pairs:
                        raise
                    skipped.append(str(exc))
            if images:
                yield torch.stack(images).to(device)

    seen = reestimate(model, batches())
    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue(), seen, skipped


def target_batchnorm(cfg: Config, checkpoint: str, destination: Path) -> Path:
    """Write DESTINATION/model.pt (statistics from the target train images) and, if the checkpoint
    directory has one, its train_state.pt."""
    import ray

    cfg = with_absolute_paths(cfg)
    model_file = checkpoint_file(checkpoint)
    actor = inference_actors(cfg, 1)
    task = ray.remote(_target_statistics).options(num_gpus=1 if actor.use_gpu else 0, num_cpus=1)
    with stage_errors("target BatchNorm statistics"):
        state, seen, skipped = ray.get(task.remote(cfg, model_file, actor.threads_each * actor.count, actor.use_gpu))
    for problem in skipped:
        print(f"warning: target BatchNorm statistics: skipped {problem}", flush=True)
    print(f"target BatchNorm statistics: re-estimated on {seen} target train images", flush=True)
    train_state = storage.join(checkpoint, TRAIN_STATE) if storage.is_dir(checkpoint) else None
    carried = [train_state] if train_state and storage.is_file(train_state) else []
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{destination.name}.", dir=destination.parent) as tmp:
        (Path(tmp) / MODEL).write_bytes(state)
        publish_checkpoint([Path(tmp) / MODEL, *carried], destination)
    return destination
