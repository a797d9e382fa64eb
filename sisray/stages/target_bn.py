"""Target BatchNorm statistics of a model without a fit of its own (the source model, a round that
trained nothing): one Ray task, on a GPU where the cluster has one (sisray/target_statistics.py). The
driver writes the checkpoint: the model with the new statistics and, unchanged, the previous stage's
optimiser state, so the next round continues from it as from any checkpoint. A round's retraining
writes its own in the same form (sisray/stages/train.py).
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import torch

from sisray import storage
from sisray.cluster import inference_actors, stage_errors
from sisray.config import Config, with_absolute_paths
from sisray.labels import NUM_CLASSES
from sisray.models import build_model, checkpoint_file
from sisray.rundir import MODEL, TRAIN_STATE
from sisray.stages.train import publish_checkpoint
from sisray.target_statistics import report, with_target_statistics


def _target_statistics(cfg: Config, checkpoint: str, threads: int, use_gpu: bool) -> tuple[bytes, int, list[str]]:
    """Inside the Ray task: the re-estimated state dict (bytes), images used, images skipped."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model.name, NUM_CLASSES, cfg.model.width, checkpoint).to(device)
    state, seen, skipped = with_target_statistics(cfg, model, device)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue(), seen, skipped


def target_batchnorm(cfg: Config, checkpoint: str, destination: Path) -> Path:
    """Write DESTINATION/model.pt (statistics from the target train images) and, if the checkpoint
    directory has one, its train_state.pt."""
    import ray

    cfg = with_absolute_paths(cfg)
    model_file = checkpoint_file(checkpoint)
    actor = inference_actors(cfg, 1)
    # scheduled as Ray Data's actors and Ray Train's workers are, outside any placement group the caller
    # runs in: a sweep trial's holds only the trial's own 0.5 CPU (sisray/sweep/trial.py)
    task = ray.remote(_target_statistics).options(num_gpus=1 if actor.use_gpu else 0, num_cpus=1,
                                                  scheduling_strategy="DEFAULT")
    with stage_errors("target BatchNorm statistics"):
        state, seen, skipped = ray.get(task.remote(cfg, model_file, actor.threads_each * actor.count, actor.use_gpu))
    report(seen, skipped)
    train_state = storage.join(checkpoint, TRAIN_STATE) if storage.is_dir(checkpoint) else None
    carried = [train_state] if train_state and storage.is_file(train_state) else []
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{destination.name}.", dir=destination.parent) as tmp:
        (Path(tmp) / MODEL).write_bytes(state)
        publish_checkpoint([Path(tmp) / MODEL, *carried], destination)
    return destination
