"""Datasets by name (`registry.SOURCE_DATASETS`, `registry.TARGET_DATASETS`): each opened at its working size."""

from __future__ import annotations

from sisray.config import Config, DomainConfig, TargetConfig
from sisray.datasets.base import Sample, SegmentationDataset
from sisray.errors import DatasetError
from sisray.labels import EVAL_SETS
from sisray.registry import SOURCE_DATASETS, TARGET_DATASETS, implementation

__all__ = ["Sample", "SegmentationDataset", "headline_metrics", "open_source", "open_target", "target_eval_classes"]


def _lookup(registry: dict, name: str, role: str) -> type[SegmentationDataset]:
    if name not in registry:
        raise DatasetError(f"unknown {role} dataset {name!r}; expected one of {', '.join(registry)}")
    return implementation(registry, name)


def open_source(cfg: DomainConfig) -> SegmentationDataset:
    """The labelled source training set at its working size."""
    cls = _lookup(SOURCE_DATASETS, cfg.name, "source")
    return cls(cfg.root, "train", cfg.size, with_labels=True, skip_bad_pairs=cfg.skip_bad_pairs)


def target_eval_classes(cfg: TargetConfig) -> tuple[int, ...]:
    """The trainIds a target benchmark evaluates (without opening and checking the dataset again)."""
    return _lookup(TARGET_DATASETS, cfg.name, "target").eval_classes


def headline_metrics(cfg: Config) -> tuple[str, ...]:
    """The evaluation keys papers report for this source/target pair: from SYNTHIA (16 labelled
    classes) mIoU16 and mIoU13; otherwise the target benchmark's own mIoU (`miou`: 19 classes for
    Cityscapes, the built-in benchmark's 13)."""
    if _lookup(SOURCE_DATASETS, cfg.data.source.name, "source").eval_classes == EVAL_SETS[16]:
        return ("miou16", "miou13")
    return ("miou",)


def open_target(cfg: TargetConfig, split: str, with_labels: bool) -> SegmentationDataset:
    """A target split: `train` is used without labels for adaptation; `val` at `val_size` if given."""
    cls = _lookup(TARGET_DATASETS, cfg.name, "target")
    size = cfg.val_size if split != "train" and cfg.val_size else cfg.size
    return cls(cfg.root, split, size, with_labels=with_labels, skip_bad_pairs=cfg.skip_bad_pairs)
