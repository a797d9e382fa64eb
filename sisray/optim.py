"""A training stage's optimisation from the model's recipe (`model.RECIPE`): parameter groups, the
optimiser and its schedule with warm-up, BatchNorm statistics held fixed, a moving average of the
weights."""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from sisray.models.common import batchnorm_layers


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


def moving_average(model: torch.nn.Module, decay: float) -> AveragedModel:
    """The exponential moving average of `model`'s weights and BatchNorm statistics."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
