"""How much room the synthetic benchmark leaves for adaptation: source-only vs target-trained ("oracle")
mIoU on target val, with the same small fully-convolutional network trained the same way.

    python bench/domain_gap.py [--root data/synthetic] [--iters 600]

Last line: {"source_only_miou": ..., "oracle_miou": ..., "gap_points": ...} (percent, the benchmark's classes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sisray.datasets.synthetic import SyntheticSource, SyntheticTarget  # noqa: E402
from sisray.metrics import ConfusionMatrix  # noqa: E402


def small_fcn(num_classes: int = 19) -> nn.Module:
    def block(cin, cout, stride=1, dilation=1):
        return [nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*block(3, 32, 2), *block(32, 64, 2), *block(64, 96, 2), *block(96, 96, dilation=2),
                         *block(96, 96, dilation=4), nn.Conv2d(96, num_classes, 1))


def forward(model: nn.Module, images: torch.Tensor, size) -> torch.Tensor:
    logits = model(images.float() / 255 - 0.5)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def preload(ds):
    pairs = [ds[i] for i in range(len(ds))]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def train(images, labels, iters: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = small_fcn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(iters):
        idx = torch.randint(len(images), (8,), generator=g)
        loss = F.cross_entropy(forward(model, images[idx], labels.shape[-2:]), labels[idx], ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def evaluate(model, val) -> float:
    cm = ConfusionMatrix()
    for i in range(len(val)):
        label = val.load_label(i, native=True)
        cm.update(forward(model, val.load_image(i)[None], label.shape).argmax(1)[0], label)
    return cm.miou(val.eval_classes)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="data/synthetic")
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(2)
    source = SyntheticSource(args.root, "train", (256, 144))
    target_train = SyntheticTarget(args.root, "train", (256, 128))
    val = SyntheticTarget(args.root, "val", (256, 128))
    start = time.perf_counter()
    results = {}
    for name, ds in (("source_only", source), ("oracle", target_train)):
        model = train(*preload(ds), args.iters, args.seed)
        results[f"{name}_miou"] = round(100 * evaluate(model, val), 2)
        print(f"{name}: mIoU {results[f'{name}_miou']:.2f} on target val ({time.perf_counter() - start:.0f} s)")
    results["gap_points"] = round(results["oracle_miou"] - results["source_only_miou"], 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
