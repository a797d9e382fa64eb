"""How much bf16 logits move what LSE decides, against fp32 (`model.precision`; the reference
computes in fp32). The same model scores every target-train image twice, in fp32 and under bf16
autocast (CPU bf16 serves for the measurement), with the scoring pass's own functions (the softmax
is fp32 either way: `models.inference.predict_probs`); then the first round's selection and class
thresholds are drawn from each. Prints the share of the selected images both pick, the largest and
the mean |tau difference| over the classes, and the share of pixels whose predicted class agrees.

    python bench/precision.py [--checkpoint MODEL (default: the default's source model)] [--root data/synthetic] [--tiny]

`--tiny` (4 generated images, a random model) is the test suite's smoke run. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import CONFIG, REPO, TINY, make_set, random_checkpoint, source_model

sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sisray.config import load_config  # noqa: E402
from sisray.datasets import open_target  # noqa: E402
from sisray.labels import NUM_CLASSES  # noqa: E402
from sisray.lse.records import image_records  # noqa: E402
from sisray.lse.selection import select  # noqa: E402
from sisray.lse.thresholds import class_thresholds  # noqa: E402
from sisray.models import build_model  # noqa: E402
from sisray.models.common import autocast  # noqa: E402
from sisray.models.inference import predict_probs  # noqa: E402
from sisray.rounds import schedule  # noqa: E402


@torch.no_grad()
def decisions(cfg, model, dataset, precision: str) -> dict:
    """The first round's selection and thresholds, and every pixel's predicted class, at `precision`."""
    tables, predictions = [], []
    for i in range(len(dataset)):
        with autocast(precision, torch.device("cpu")):
            probs = predict_probs(model, dataset.load_image(i)[None])
        tables.append(image_records(probs, cfg.lse.threshold.bins))
        predictions.append(probs.argmax(1))
    counts, scores, entropy, histograms = (torch.cat([getattr(t, k) for t in tables]).numpy()
                                           for k in ("counts", "scores", "mean_entropy", "histograms"))
    selection = select(counts, scores, schedule(cfg.lse)[0], cfg.lse.selection, (), cfg.lse.min_per_class)
    threshold = cfg.lse.threshold
    tau = class_thresholds(selection, entropy, histograms, threshold.estimator, threshold.window,
                           threshold.quantile, threshold.fallback)
    return {"selected": set(selection.selected), "tau": tau, "prediction": torch.cat(predictions)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", help="the model to score with (default: the demo's source model)")
    p.add_argument("--root", default="data/synthetic")
    p.add_argument("--tiny", action="store_true", help="4 generated images and a random model (the tests' smoke run)")
    args = p.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_set(Path(tmp) / "data", target_train=4) if args.tiny else Path(args.root)
        checkpoint = random_checkpoint(Path(tmp) / "model.pt") if args.tiny else source_model(args.checkpoint)
        cfg = load_config(CONFIG, [f"data.source.root={root}", f"data.target.root={root}", *(TINY if args.tiny else [])])
        dataset = open_target(cfg.data.target, "train", with_labels=False)
        model = build_model(cfg.model.name, NUM_CLASSES, cfg.model.width, checkpoint).eval()
        fp32, bf16 = (decisions(cfg, model, dataset, precision) for precision in ("fp32", "bf16"))
    both = fp32["selected"] & bf16["selected"]
    shared = len(both) / max(len(fp32["selected"] | bf16["selected"]), 1)
    difference = np.abs(fp32["tau"] - bf16["tau"])
    agreement = float((fp32["prediction"] == bf16["prediction"]).double().mean())
    print(f"{len(dataset)} target-train images: fp32 selects {len(fp32['selected'])}, bf16 {len(bf16['selected'])}, "
          f"{len(both)} in common ({100 * shared:.1f}% of either's); tau differs by at most {difference.max():.4f} "
          f"(mean {difference.mean():.4f}); the predicted class agrees on {100 * agreement:.2f}% of pixels")
    print(json.dumps({"images": len(dataset), "selected_fp32": len(fp32["selected"]),
                      "selected_bf16": len(bf16["selected"]), "selection_jaccard": round(shared, 4),
                      "tau_max_abs_difference": round(float(difference.max()), 5),
                      "tau_mean_abs_difference": round(float(difference.mean()), 5),
                      "pixel_agreement": round(agreement, 5)}))


if __name__ == "__main__":
    main()
