"""Keep-mask + scale-invariant patch construction: vectorised (sisray.lse) vs a per-pixel Python loop
doing the same work (as the reference code does), on one prediction-like 19x512x1024 softmax map
on CPU.

    python bench/masking.py [--rows 8]

The loop is timed on the first --rows rows of the mask and of each patch label and scaled to the
whole map (its cost is linear in the pixels). Last line: {"speedup", "loop_s", "vectorised_s", "record_s"}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sisray.lse.entropy import normalise_per_class, pixel_entropy  # noqa: E402
from sisray.lse.patches import draw_boxes, keep_mask, scale_invariant_examples  # noqa: E402
from sisray.lse.records import image_records  # noqa: E402

C, H, W, SCALE, PATCHES = 19, 512, 1024, 2.0, 4


def vectorised(image, probs, tau, seed):
    prediction = probs.max(0).indices
    normalised = normalise_per_class(pixel_entropy(probs[None]), prediction[None], C)[0]
    keep = keep_mask(normalised, prediction, tau)
    return scale_invariant_examples(image, probs, keep, [SCALE], PATCHES, torch.Generator().manual_seed(seed))


def loop_mask_rows(probs: np.ndarray, tau: np.ndarray, rows: int) -> np.ndarray:
    """Entropy, per-class min-max and the threshold test, pixel by pixel (the first `rows` rows)."""
    entropy = np.zeros((rows, W))
    prediction = np.zeros((rows, W), dtype=np.int64)
    low, high = {}, {}
    for y in range(rows):
        for x in range(W):
            p = probs[:, y, x]
            k = int(p.argmax())
            e = -sum(float(v) * math.log(float(v) + 1e-12) for v in p)
            entropy[y, x], prediction[y, x] = e, k
            low[k], high[k] = min(low.get(k, e), e), max(high.get(k, e), e)
    keep = np.zeros((rows, W), dtype=bool)
    for y in range(rows):
        for x in range(W):
            k = prediction[y, x]
            span = high[k] - low[k]
            keep[y, x] = ((entropy[y, x] - low[k]) / span if span > 0 else 0.0) < tau[k]
    return keep


def loop_patch_rows(probs: np.ndarray, keep: np.ndarray, box, rows: int) -> np.ndarray:
    """Bilinear (align_corners) upsampling of the crop and its mask, argmax, ignore: pixel by pixel."""
    top, left, h, w = box.pixels(H, W)
    label = np.zeros((rows, W), dtype=np.int64)
    for y in range(rows):
        sy = top + y * (h - 1) / (H - 1)
        y0 = int(sy)
        y1, fy = min(y0 + 1, H - 1), sy - y0
        for x in range(W):
            sx = left + x * (w - 1) / (W - 1)
            x0 = int(sx)
            x1, fx = min(x0 + 1, W - 1), sx - x0
            best, best_k = -1.0, 0
            for k in range(C):
                v = ((1 - fy) * ((1 - fx) * probs[k, y0, x0] + fx * probs[k, y0, x1])
                     + fy * ((1 - fx) * probs[k, y1, x0] + fx * probs[k, y1, x1]))
                if v > best:
                    best, best_k = v, k
            m = ((1 - fy) * ((1 - fx) * keep[y0, x0] + fx * keep[y0, x1])
                 + fy * ((1 - fx) * keep[y1, x0] + fx * keep[y1, x1]))
            label[y, x] = 255 if m == 0 else best_k
    return label


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    # A prediction-like map: smooth logits (random at 1/32 resolution, upsampled), so classes form
    # regions with boundaries, as in a real segmentation, rather than per-pixel noise.
    coarse = torch.randn(1, C, H // 32, W // 32, generator=g) * 4
    probs = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)[0].softmax(0)
    image = torch.rand(3, H, W, generator=g) * 255
    tau = torch.full((C,), 0.5)

    vectorised_s = best_of(lambda: vectorised(image, probs, tau, 0))
    record_s = best_of(lambda: image_records(probs[None], bins=64))

    probs_np, tau_np = probs.numpy().astype(np.float64), tau.numpy()
    began = time.perf_counter()
    keep_rows = loop_mask_rows(probs_np, tau_np, args.rows)
    mask_s = (time.perf_counter() - began) * H / args.rows
    keep_full = np.ones((H, W), dtype=bool)
    keep_full[:args.rows] = keep_rows
    boxes = draw_boxes(H, W, [SCALE], PATCHES, torch.Generator().manual_seed(0))
    began = time.perf_counter()
    loop_patch_rows(probs_np, keep_full, boxes[0], args.rows)
    patch_s = (time.perf_counter() - began) * H / args.rows * PATCHES
    loop_s = mask_s + patch_s
    print(f"per-pixel loop (extrapolated from {args.rows} rows): mask {mask_s:.1f} s + {PATCHES} patches "
          f"{patch_s:.1f} s = {loop_s:.1f} s")
    print(f"vectorised: {vectorised_s * 1000:.0f} ms; per-image record: {record_s * 1000:.0f} ms")
    print(json.dumps({"speedup": round(loop_s / vectorised_s, 1), "loop_s": round(loop_s, 2),
                      "vectorised_s": round(vectorised_s, 4), "record_s": round(record_s, 4),
                      "map": [C, H, W], "scale": SCALE, "patches": PATCHES}))


if __name__ == "__main__":
    main()
