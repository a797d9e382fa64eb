"""Keep-mask + scale-invariant patch labels on one prediction-like 19x512x1024 softmax map, on CPU:
sisray's (sisray.lse) against a loop built as the reference code builds it, and against the memory
floor of reading the map once.

    python bench/masking.py [--tiny]

The reference computes entropy and the per-class min-max normalisation with numpy, loops in Python
only over the threshold test (pixel by pixel), and resamples each patch with torch; so does
`reference_structured` here. Both sides run with the same torch threads (2). The floor is the time
of one read of the 40 MB map at the memory bandwidth measured on a 1 GB buffer (a sum over it, too
large for any cache): the least any pass over a map that is not already in cache can take.
`--tiny` (19x64x128, one repeat) is the test suite's smoke run. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sisray.lse.entropy import normalise_per_class, pixel_entropy  # noqa: E402
from sisray.lse.patches import draw_boxes, keep_mask, transfer_label  # noqa: E402
from sisray.lse.records import image_records  # noqa: E402

C, SCALE, PATCHES, THREADS = 19, 2.0, 4, 2


def sisray_labels(probs: torch.Tensor, tau: torch.Tensor, boxes) -> list[torch.Tensor]:
    prediction = probs.max(0).indices
    normalised = normalise_per_class(pixel_entropy(probs[None]), prediction[None], C)[0]
    keep = keep_mask(normalised, prediction, tau)
    size = tuple(probs.shape[-2:])
    channels_last = probs.permute(1, 2, 0).contiguous()
    return [transfer_label(probs, keep, box, size, prediction, channels_last) for box in boxes]


def reference_structured(probs: torch.Tensor, tau: np.ndarray, boxes) -> list[torch.Tensor]:
    """numpy entropy and per-class min-max, a Python loop over pixels for the threshold test, torch
    for each patch's resampling (bilinear, align_corners=True) and argmax."""
    p = probs.numpy()
    entropy = -(p * np.log(p + 1e-12)).sum(axis=0)
    prediction = p.argmax(axis=0)
    normalised = np.zeros_like(entropy)
    for c in range(C):
        mine = prediction == c
        if mine.any():
            low, high = entropy[mine].min(), entropy[mine].max()
            normalised[mine] = (entropy[mine] - low) / (high - low) if high > low else 0.0
    height, width = entropy.shape
    keep = np.zeros((height, width), dtype=np.float32)
    for y in range(height):
        row_n, row_p, row_k = normalised[y], prediction[y], keep[y]
        for x in range(width):
            if row_n[x] < tau[row_p[x]]:
                row_k[x] = 1.0
    keep_t = torch.from_numpy(keep)
    labels = []
    for box in boxes:
        top, left, h, w = box.pixels(height, width)
        crop = F.interpolate(probs[None, :, top:top + h, left:left + w], size=(height, width), mode="bilinear",
                             align_corners=True)[0]
        mask = F.interpolate(keep_t[None, None, top:top + h, left:left + w], size=(height, width), mode="bilinear",
                             align_corners=True)[0, 0]
        labels.append(torch.where(mask == 0, torch.full((height, width), 255), crop.argmax(0)))
    return labels


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def memory_bandwidth(repeats: int) -> float:
    """Bytes/s of one read of a 1 GB buffer (too large for any cache)."""
    buffer = torch.ones(2 ** 28)
    return buffer.numel() * 4 / best_of(lambda: buffer.sum(), repeats)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="a 19x64x128 map, one repeat (the tests' smoke run)")
    args = p.parse_args()
    height, width, repeats = (64, 128, 1) if args.tiny else (512, 1024, 3)
    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(0)
    # A prediction-like map: smooth logits (random at 1/32 resolution, upsampled), so classes form
    # regions with boundaries, as in a real segmentation, rather than per-pixel noise.
    coarse = torch.randn(1, C, height // 32, width // 32, generator=g) * 4
    probs = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0].softmax(0)
    tau = torch.full((C,), 0.5)
    boxes = draw_boxes(height, width, [SCALE], PATCHES, torch.Generator().manual_seed(0))

    ours = sisray_labels(probs, tau, boxes)
    theirs = reference_structured(probs, tau.numpy(), boxes)
    agree = float(np.mean([(a == b).float().mean().item() for a, b in zip(ours, theirs)]))
    sisray_s = best_of(lambda: sisray_labels(probs, tau, boxes), repeats)
    reference_s = best_of(lambda: reference_structured(probs, tau.numpy(), boxes), repeats)
    bandwidth = memory_bandwidth(max(repeats, 3))
    floor_s = probs.numel() * 4 / bandwidth  # one read of the map
    record_s = best_of(lambda: image_records(probs[None], bins=64), repeats)
    megabytes = probs.numel() * 4 / 1e6
    print(f"one {C}x{height}x{width} map ({megabytes:.0f} MB), keep-mask + {PATCHES} patch labels, "
          f"{THREADS} torch threads both sides:")
    print(f"  reference-structured loop {reference_s:.3f} s; sisray {sisray_s:.3f} s: {reference_s / sisray_s:.1f}x "
          f"(labels agree on {100 * agree:.2f}% of pixels)")
    print(f"  one read of the map {1000 * floor_s:.1f} ms (memory bandwidth {bandwidth / 1e9:.1f} GB/s): sisray takes "
          f"{sisray_s / floor_s:.0f} reads' time; a per-image record {1000 * record_s:.0f} ms")
    print(json.dumps({"speedup_vs_reference_structured": round(reference_s / sisray_s, 1),
                      "reference_structured_s": round(reference_s, 4), "sisray_s": round(sisray_s, 4),
                      "floor_s": round(floor_s, 5), "bandwidth_gb_s": round(bandwidth / 1e9, 1), "sisray_over_floor": round(sisray_s / floor_s, 1),
                      "record_s": round(record_s, 4), "labels_agree": round(agree, 5),
                      "map": [C, height, width], "threads": THREADS, "patches": PATCHES}))


if __name__ == "__main__":
    main()
