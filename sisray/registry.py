"""Every name a config can choose, with where it is implemented: one table per kind.

The config takes its allowed values from these tables (`config.py`), and the code that builds a
model or opens a dataset looks it up here; the implementation is imported only then (a model pulls
in torch). Threshold estimators and selections live beside their code (`lse.thresholds.ESTIMATORS`,
`lse.selection.SELECTIONS`), which is pure and light.
"""

from __future__ import annotations

import importlib
from typing import Any

MODELS = {
    "fcn8s_vgg16": "sisray.models.fcn8s:FCN8s",  # the paper's GTA5/SYNTHIA -> Cityscapes VGG16 model
    "deeplabv2_r101": "sisray.models.deeplabv2:DeepLabV2",  # the paper's ResNet-101 model
    "lraspp_lite0": "sisray.models.lraspp:LRASPPLite0",  # the CPU default: EfficientNet-Lite0 + LR-ASPP
}
SOURCE_DATASETS = {
    "gta5": "sisray.datasets.gta5:GTA5",
    "synthia": "sisray.datasets.synthia:SYNTHIA",
    "synthetic": "sisray.datasets.synthetic:SyntheticSource",  # the built-in benchmark
}
TARGET_DATASETS = {
    "cityscapes": "sisray.datasets.cityscapes:Cityscapes",
    "synthetic": "sisray.datasets.synthetic:SyntheticTarget",
}


def implementation(table: dict[str, str], name: str) -> Any:
    """The class registered under `name` (a KeyError for an unknown name: the caller says what it is)."""
    module, _, attribute = table[name].partition(":")
    return getattr(importlib.import_module(module), attribute)
