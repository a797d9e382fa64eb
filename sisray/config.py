"""Typed configuration of a sisray job: YAML file + dotted overrides, validated before any work.

Dataclass defaults are the paper's reference values (docs/METHOD.md); presets in `configs/` override
what they must and say why. Every value is checked against its type and range when loaded, and an
unknown key, a wrong type or an out-of-range value is a `ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sisray.errors import ConfigError
from sisray.lse.selection import SELECTIONS
from sisray.lse.thresholds import ESTIMATORS
from sisray.registry import MODELS, SOURCE_DATASETS, TARGET_DATASETS
from sisray.storage import absolute
from sisray.validate import bounded, build_dataclass
from sisray.weights import checkpoint_location, is_shipped, shipped_model

Size = tuple[int, int]
# allowed names: the registries' (Literal of a tuple = Literal of its items)
MODEL_NAMES, ESTIMATOR_NAMES, SELECTION_NAMES = tuple(MODELS), tuple(ESTIMATORS), tuple(SELECTIONS)


@dataclass
class DomainConfig:
    name: str = "gta5"
    root: str = "data/gta5"
    size: Size = (1280, 720)  # working size [width, height]: images bicubic, labels nearest
    skip_bad_pairs: bool = False  # report and skip bad image/label pairs instead of stopping


@dataclass
class TargetConfig(DomainConfig):
    name: str = "cityscapes"
    root: str = "data/cityscapes"
    size: Size = (1024, 512)
    val_size: Size | None = None  # evaluation input size when it differs from `size`


@dataclass
class DataConfig:
    source: DomainConfig = field(default_factory=DomainConfig)
    target: TargetConfig = field(default_factory=TargetConfig)


@dataclass
class ModelConfig:
    name: Literal[MODEL_NAMES] = "fcn8s_vgg16"
    width: float = bounded(1.0, 0.0, 1.0, lo_open=True)  # channel multiplier; 1 = the paper's
    init: str = "imagenet"  # "random", "imagenet", or the path of a checkpoint file
    source_checkpoint: str | None = None  # a trained source model to adapt (a path, or shipped:NAME: sisray/weights); None: the source stage trains one
    # autocast of training and inference: auto = bf16 under CUDA, fp32 on CPU (the reference: fp32).
    # Softmax, entropies and thresholds are computed in fp32 whatever the logits' precision.
    precision: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass
class ThresholdConfig:
    estimator: Literal[ESTIMATOR_NAMES] = "cutoff_image"
    window: int = bounded(5, 1)  # images after the cutoff averaged by `window`
    quantile: float = bounded(0.5, 0.0, 1.0, lo_open=True, hi_open=True)
    bins: int = bounded(64, 2, 4096)  # histogram bins of normalised entropy
    fallback: float = bounded(0.5, 0.0, 1.0)  # tau of a class with no candidate image


@dataclass
class LSEConfig:
    p0: float = bounded(0.10, 0.0, 1.0, lo_open=True)
    p_step: float = bounded(0.05, 0.0, 1.0)
    p_max: float = bounded(0.40, 0.0, 1.0, lo_open=True)
    scale: float = bounded(2.0, 1.0)  # patch = (H/scale, W/scale), upsampled by scale
    patches_per_image: int = bounded(4, 1)
    beta: float = bounded(0.1, 0.0)  # weight of the focal term; 0 = LSE without focal loss
    gamma: float = bounded(3.0, 0.0)  # focal exponent
    selection: Literal[SELECTION_NAMES] = "classwise"
    min_per_class: int = bounded(0, 0)  # class-wise selection takes at least this many images of each class (reference: 0)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    # Beyond the reference (docs/METHOD.md steps 1 and 4), off by default:
    zoom_out: bool = False  # also draw patches_per_image zoom-out examples (image shrunk into a patch)
    entropy_gap: float | None = None  # keep a patch only if the model's entropy on it exceeds the label's by this
    target_bn: bool = False  # re-estimate BatchNorm statistics on the target train images before each scoring
    confidence_weight: bool = False  # scale each pseudo-labelled pixel's loss by the teacher's confidence
    ema_decay: float | None = bounded(None, 0.0, 1.0, lo_open=True, hi_open=True)  # a round's model (teacher of the next) = EMA of its weights
    classmix: bool = False  # DACS's ClassMix: half of a source image's classes pasted onto each pseudo-labelled patch (sisray/augment.py)
    # EMA decay of an online teacher that re-draws the patches' pseudo-labels at every step of a round
    # (sisray/lse/online.py; DACS/DAFormer's mean teacher inside LSE's label transfer); None: the patch pass's labels
    online_teacher: float | None = bounded(None, 0.0, 1.0, lo_open=True, hi_open=True)
    # FDA's beta (sisray/augment.py): the rounds' labelled images take the lowest frequencies of the step's
    # patches' amplitude spectra, the target's look; the band is floor(beta * min(H, W)) cycles. None: off
    fourier_style: float | None = bounded(None, 0.0, 0.5, lo_open=True)
    fused_teacher: bool = False  # the teacher's softmax averaged over the image at 1/scale, 1 and scale (LSE's zoom) and their mirrors
    # keep the incumbent model when target BN statistics or a round's model look worse on the target-train
    # images by safeguard_rule, without a label (sisray/safeguard.py)
    safeguard: bool = False
    # "consistency": the candidate agrees less with itself than the incumbent, mirrored and under ClassMix
    # (on validation.images target-train images, 64 when that is 0); "prior": its predicted class proportions
    # move further from the source labels' than safeguard_tolerance
    safeguard_rule: Literal["consistency", "prior"] = "consistency"
    # the consistency rule accepts a candidate whose class entropy H(mean p)/log C rises by more than this,
    # whatever its probes: it undoes a collapse (dusk: +0.25; every other decision of the suite moved it by
    # at most 0.03; chosen before the held-out domains were run). None: the probes alone
    safeguard_spread: float | None = bounded(0.1, 0.0)
    # how much further (mean |log ratio| of class shares) the "prior" rule tolerates: good rounds on the suite
    # moved up to +0.1 (the target's framing holds more car and person pixels, which the rounds learn)
    safeguard_tolerance: float = bounded(0.15, 0.0)


@dataclass
class TrainConfig:
    source_epochs: float = bounded(1.0, 0.0, lo_open=True)  # passes over the source set (source-only stage)
    # the length of the source stage's rate schedule (poly) in epochs; None: source_epochs. The lineage stops
    # its DeepLab source training at 150000 steps of a 250000-step poly schedule (configs/*_source.yaml)
    source_schedule_epochs: float | None = bounded(None, 0.0, lo_open=True)
    epochs_per_round: float = bounded(2.0, 0.0, lo_open=True)  # passes over the patch set per round
    batch_size: int = bounded(1, 1)  # global batch, split evenly over the workers
    num_workers: int = bounded(0, 0)  # Ray Train workers; 0 = one per GPU, else as the CPUs allow (the cluster as the job found it)
    lr: float | None = bounded(None, 0.0, lo_open=True)  # None: the model's preset (docs/METHOD.md)
    round_lr: float | None = bounded(None, 0.0, lo_open=True)  # base rate of the retraining rounds; None: as lr
    round_warmup: float = bounded(0.0, 0.0, 1.0)  # share of a round's steps over which its rate rises linearly from 0
    round_bn: Literal["train", "frozen"] = "train"  # frozen: BatchNorm statistics stay as they are during the rounds
    photometric: bool = False  # colour jitter and blur of the labelled batches (sisray/augment.py); the reference: none
    # each class of a labelled image recoloured on its own (brightness, saturation, hue; sisray/augment.py),
    # before the photometric jitter: the source's per-class colours are not the target's
    class_colours: bool = False
    photometric_patches: bool = False  # the same on the pseudo-labelled batches of the rounds (after ClassMix, as in DACS)
    # DAFormer's rare-class sampling of the labelled images at this temperature (DAFormer: 0.01); None: each image once an epoch
    rare_class_sampling: float | None = bounded(None, 0.0, lo_open=True)
    # batches loaded ahead, on as many threads, while the model trains (the seeded order is kept); None: 2 on
    # GPU workers, 0 on CPU workers, whose cores the training step already takes
    prefetch: int | None = bounded(None, 0)
    log_every: int = bounded(10, 1)  # steps between logged losses
    checkpoint_every: int = bounded(200, 1)  # steps between checkpoints (and at the end)
    pseudo_labels: bool = True  # false: the control of "more training": rounds take as many steps on the source alone
    oracle: bool = False  # train on the target's train labels instead of the source: the upper bound
    # a seeded share of the labelled images kept out of training: their loss at every checkpoint is the
    # source-val loss (no target label), the curve that says when source training has converged
    holdout: float = bounded(0.0, 0.0, 0.5)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db here)
    experiment: str = "sisray"


@dataclass
class ResourcesConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present
    num_actors: int = bounded(0, 0)  # Ray Data inference actors; 0 = from the resources of the cluster as the job found it
    cpus_per_actor: float = bounded(0.5, 0.0, lo_open=True)
    actor_batch_size: int = bounded(4, 1)  # images per inference batch in an actor
    cpus_per_worker: float = bounded(0.5, 0.0, lo_open=True)  # fractional: leaves room for Ray Data tasks


@dataclass
class ValidationConfig:
    # target-train images (a seeded subset, the same for every model of a run and every trial of a sweep)
    # on which each evaluated model's label-free validators are computed (sisray/validators.py); 0: none
    images: int = bounded(0, 0)


@dataclass
class Config:
    seed: int = 0
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lse: LSEConfig = field(default_factory=LSEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


def _check_relations(cfg: Config) -> None:
    """Constraints between keys, checked after each value is valid on its own."""
    if cfg.data.source.name not in SOURCE_DATASETS:
        raise ConfigError(f"data.source.name = {cfg.data.source.name!r}: expected one of {', '.join(SOURCE_DATASETS)}")
    if cfg.data.target.name not in TARGET_DATASETS:
        raise ConfigError(f"data.target.name = {cfg.data.target.name!r}: expected one of {', '.join(TARGET_DATASETS)}")
    if cfg.lse.p0 > cfg.lse.p_max:
        raise ConfigError(f"lse.p0 = {cfg.lse.p0} is above lse.p_max = {cfg.lse.p_max}: the schedule would be empty")
    if not cfg.model.init:
        raise ConfigError("model.init is empty: expected 'random', 'imagenet' or a checkpoint path")
    if is_shipped(cfg.model.source_checkpoint):
        shipped_model(cfg.model.source_checkpoint)  # a known name
    if cfg.model.init == "imagenet" and cfg.model.width != 1.0 and not cfg.model.source_checkpoint:
        raise ConfigError(f"model.init = imagenet needs model.width = 1 (got {cfg.model.width}): "
                          "ImageNet weights exist only at full width; use random or a checkpoint")
    if cfg.train.num_workers and cfg.train.batch_size % cfg.train.num_workers:
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} does not split evenly over "
                          f"train.num_workers = {cfg.train.num_workers}")
    if cfg.lse.online_teacher is not None and cfg.lse.zoom_out:
        raise ConfigError("lse.online_teacher re-draws zoomed patches only: set lse.zoom_out: false with it")
    if not cfg.run_dir:
        raise ConfigError("run_dir is empty: expected a directory path")


def key_type(dotted: str) -> Any:
    """The type of a dotted config key's value; an unknown key or a section is a ConfigError."""
    cls: Any = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the configuration"
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown key {dotted!r}: {where} is a value, not a section")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise ConfigError(f"unknown key {dotted!r}; {where} allows: {', '.join(hints)}")
        cls = hints[part]
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"{dotted!r} is a section, not a value")
    return cls


def set_value(raw: dict, dotted: str, value: Any) -> None:
    """Set a dotted key in a raw config dict to an already-parsed value."""
    apply_override(raw, f"{dotted}={json.dumps(value)}")  # JSON is YAML: the value round-trips exactly


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """The config with dotted keys set to already-parsed values, validated as a whole."""
    raw = config_to_dict(cfg)
    for key, value in values.items():
        set_value(raw, key, value)
    return config_from_dict(raw)


def config_from_dict(raw: Any) -> Config:
    cfg = build_dataclass(Config, raw, "")
    _check_relations(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Plain YAML-ready dict (tuples become lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return plain(dataclasses.asdict(cfg))


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` to a raw config dict; the value is parsed as YAML."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. lse.scale=2.0")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({exc})") from None
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file, or a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, validated as a whole."""
    raw = read_yaml(path) if path is not None else {}
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        if path is None:
            raise
        raise ConfigError(f"{path}: {exc}") from None


def save_config(cfg: Config, path: str | Path) -> None:
    from sisray.storage import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def with_absolute_paths(cfg: Config) -> Config:
    """The config with dataset roots, run_dir and checkpoint paths made absolute: Ray workers and
    actors do not run in the driver's working directory."""
    data = dataclasses.replace(
        cfg.data, source=dataclasses.replace(cfg.data.source, root=absolute(cfg.data.source.root)),
        target=dataclasses.replace(cfg.data.target, root=absolute(cfg.data.target.root)))
    init = cfg.model.init if cfg.model.init in ("random", "imagenet") else absolute(cfg.model.init)
    source = cfg.model.source_checkpoint and checkpoint_location(cfg.model.source_checkpoint)
    return dataclasses.replace(cfg, data=data, run_dir=absolute(cfg.run_dir),
                               model=dataclasses.replace(cfg.model, init=init, source_checkpoint=source))
