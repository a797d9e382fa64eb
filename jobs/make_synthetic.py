"""Generate the built-in synthetic benchmark and print its statistics.

    python jobs/make_synthetic.py --out data/synthetic [--seed 0] [--look dusk]
    python jobs/make_synthetic.py --suite --out data/suite      # every target domain of the suite

Writes OUT/source (GTA5 layout) and OUT/target (Cityscapes layout, train + val); with --suite, one
such benchmark per target domain, OUT/<domain> (day, dusk, fog, camera, small, drive, near), all
with the same source.
Re-running on a complete set with the same settings does nothing; a half-written set is redone.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from sisray.cli import add_config_arguments, run  # noqa: E402
from sisray.config import load_config  # noqa: E402
from sisray.datasets.synthetic import (SUITE, SyntheticSource, SyntheticSpec, SyntheticTarget, describe,  # noqa: E402
                                      generate, generate_suite)
from sisray.datasets.synthetic.scene import LOOKS, SCENERIES  # noqa: E402
from sisray.labels import CLASS_NAMES  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    d = SyntheticSpec()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/synthetic", help="benchmark directory (default: data/synthetic)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--n-source", type=int, default=d.n_source)
    p.add_argument("--n-target-train", type=int, default=d.n_target_train)
    p.add_argument("--n-target-val", type=int, default=d.n_target_val)
    p.add_argument("--appearance-gap", type=float, default=d.appearance_gap,
                   help="0: the target looks like the source (only the scale gap); 1: the full photo-like look")
    p.add_argument("--look", choices=LOOKS, default=d.look, help="the target domain's kind (default: day)")
    p.add_argument("--scenery", choices=SCENERIES, default=d.scenery,
                   help="what the target's scenes hold: street (the source's) or rural (other class proportions)")
    p.add_argument("--drives", type=int, default=d.drives,
                   help="target-train images as consecutive frames of this many drives (default 0: a scene each)")
    p.add_argument("--suite", action="store_true",
                   help=f"write every domain of the suite ({', '.join(SUITE)}) as OUT/<domain>")
    p.add_argument("--processes", type=int, default=None, help="generator processes (default: one per core)")
    p.add_argument("--no-stats", action="store_true", help="skip the statistics table")
    add_config_arguments(p)  # the working sizes the statistics are read at
    return p.parse_args(argv)


def print_stats(out: str, config: str, overrides: list[str]) -> None:
    cfg = load_config(config, overrides)
    domains = {
        "source": SyntheticSource(out, "train", cfg.data.source.size),
        "target train": SyntheticTarget(out, "train", cfg.data.target.size),
        "target val": SyntheticTarget(out, "val", cfg.data.target.val_size or cfg.data.target.size),
    }
    stats = {name: describe(ds) for name, ds in domains.items()}
    names = list(stats)
    print(f"\n{'class (pixel share %)':<22}" + "".join(f"{n:>14}" for n in names))
    for c in next(iter(stats.values()))["class_share"]:
        print(f"{CLASS_NAMES[c]:<22}" + "".join(f"{100 * stats[n]['class_share'][c]:>14.2f}" for n in names))
    print(f"{'ignored':<22}" + "".join(f"{100 * stats[n]['ignored_share']:>14.2f}" for n in names))
    for key, label in (("images", "images"), ("size", "working size")):
        print(f"{label:<22}" + "".join(f"{str(stats[n][key]):>14}" for n in names))
    for i, channel in enumerate("RGB"):
        print(f"{channel + ' mean / std':<22}" + "".join(
            f"{stats[n]['rgb_mean'][i]:>8.1f} /{stats[n]['rgb_std'][i]:>4.0f}" for n in names))
    for obj in ("person", "car"):
        print(f"{'median ' + obj + ' height':<22}" + "".join(
            f"{stats[n]['median_height_px'][obj]:>12.1f}px" for n in names))
    ratios = [stats["target train"]["median_height_px"][o] / stats["source"]["median_height_px"][o]
              for o in ("person", "car")]
    ratios = [r for r in ratios if math.isfinite(r)]
    if ratios:
        print(f"\nobjects appear {sum(ratios) / len(ratios):.2f}x larger in the target domain (scale gap)")


def main() -> None:
    args = parse_args()
    spec = SyntheticSpec(seed=args.seed, n_source=args.n_source, n_target_train=args.n_target_train,
                         n_target_val=args.n_target_val, appearance_gap=args.appearance_gap, look=args.look,
                         drives=args.drives, scenery=args.scenery)
    outs = ({name: str(Path(args.out) / name) for name in SUITE} if args.suite else {args.out: args.out})
    manifests = generate_suite(args.out, spec, args.processes) if args.suite else {
        args.out: generate(args.out, spec, processes=args.processes)}
    for name, manifest in manifests.items():
        counts, look = manifest["counts"], manifest["spec"]["look"]
        print(f"synthetic benchmark at {outs[name]}: {counts['source']} source, {counts['target_train']} target-train, "
              f"{counts['target_val']} target-val images ({look} look; seed {spec.seed}; "
              f"generated in {manifest['seconds']} s)")
        if not args.no_stats:
            print_stats(outs[name], args.config, args.overrides)


if __name__ == "__main__":
    run(main)
