"""The ablation on the built-in benchmark, over seeds: what each part of the method is worth.

    python bench/ablation.py [--seeds 0 1 2] [--out runs/ablation] [--variants ...] [--oracle] [--set k=v ...]
    python bench/ablation.py --suite data/suite --out runs/suite [--domains day dusk ...] [...]   # the suite's domains

Per seed, `source` trains the seed's source model with the default's recipe (`jobs/train_source.py`,
configs/synthetic.yaml: 15 epochs, the converged schedule; the default itself adapts the shipped
model of seed 0) unless `--set model.source_checkpoint=...` gives one. `lse_fl` is the default config
as it is (`jobs/adapt.py`) adapting that model, and so does every other variant of that seed, so
variants differ only in what the rounds do:

    source_only          the source model (from lse_fl's run)
    source_target_bn     the source model with target BatchNorm statistics, no training (lse_fl's run)
    continued_source     the rounds' exact steps on source labels only: the control of "more training"
    plain_self_training  whole target images as examples (scale 1), no focal term
    lse                  scale-invariant examples, no focal term (beta 0)
    lse_fl               scale-invariant examples + focal loss: the default
    lse_fl_source_bn     the default without target BatchNorm statistics (the paper's method alone)
    lse_fl_confidence    the default + each pseudo-labelled pixel's loss weighted by the teacher's confidence
    lse_fl_ema           the default + a round's model (the next round's teacher) = EMA of its weights (decay 0.9)
    lse_fl_safeguard     the default + the label-free safeguard (target BN and each round's model judged)
    lse_fl_classmix      the default + ClassMix: half of a source image's classes pasted onto each patch (DACS)
    lse_fl_patch_jitter  the default + colour jitter and blur of the pseudo-labelled batches too
    lse_fl_classmix_jitter  both: DACS's student input (the mixed patches jittered)
    lse_fl_fused_teacher the default + the teacher averaged over 1/scale, 1, scale and their mirrors
    lse_fl_four_rounds   the default's schedule on to p = 0.8: four rounds instead of two
    source_no_photometric  a source model trained without photometric augmentation (its own run, no rounds)
    source_short         the previous default's source schedule: 2.5 epochs (188 steps), nothing held out
    lse_fl_short         the default's rounds from that source model (also gives its + target BN)
    source_high_lr       the default's source schedule at three times its rate (Adam 1.5e-3)
    lse_fl_high_lr       the default's rounds from that source model (also gives its + target BN)
    source_rare_class    the default's source schedule with rare-class sampling (DAFormer, T = 0.01)
    lse_fl_rare_class    the default's rounds from that source model (also gives its + target BN)
    source_class_colours the default's source schedule with each class recoloured on its own (train.class_colours)
    lse_fl_class_colours the default's rounds from that source model (also gives its + target BN)
    oracle               (--oracle) trained on target-train labels for as many steps as the source model

`--suite DIR` runs the same per target domain of the suite (`jobs/make_synthetic.py --suite --out
DIR`: day, dusk, fog, camera, small, drive, near, rural, rural_near): each seed's source model is trained in the
first domain, and every domain adapts it (the domains share their source); prints each domain's
table. Source-trained variants too are trained in the first domain only; every domain adapts
their models.

`--oracle --variants lse_fl` is the quick look at how much room the benchmark leaves for adaptation
(source-only, the default, and the oracle).

Every run directory is kept, so re-running resumes and adds seeds. Prints per variant the mean +-
std over seeds of the benchmark's mIoU (its 13 classes) and of mIoU19, per-class IoU, pseudo-label
accuracy per round, and verdicts: A beats B only when the difference of the means exceeds their
pooled std; and the issue's bar: the default over the better of its source model with and without
target BN, and the share of the gap from there to the oracle it closes. Last line: one JSON object
with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT = "lse_fl"
SOURCE = "source"  # the run that trains each seed's source model, with the default's recipe
ADAPTED = {  # variant -> overrides of jobs/adapt.py on top of the seed's source model
    "continued_source": ["train.pseudo_labels=false"],
    "plain_self_training": ["lse.scale=1", "lse.beta=0"],
    "lse": ["lse.beta=0"],
    DEFAULT: [],
    "lse_fl_source_bn": ["lse.target_bn=false"],
    "lse_fl_confidence": ["lse.confidence_weight=true"],
    "lse_fl_ema": ["lse.ema_decay=0.9"],  # rounds of ~25-30 steps: an average over the last ~10
    "lse_fl_safeguard": ["lse.safeguard=true"],
    "lse_fl_classmix": ["lse.classmix=true"],
    "lse_fl_patch_jitter": ["train.photometric_patches=true"],
    "lse_fl_classmix_jitter": ["lse.classmix=true", "train.photometric_patches=true"],  # DACS's student input
    "lse_fl_fused_teacher": ["lse.fused_teacher=true"],
    # FDA: the rounds' source images in the patches' look; beta 0.03 = 4 cycles on a 144-pixel side (FDA: 0.01 on 512)
    "lse_fl_fourier_style": ["lse.fourier_style=0.03"],
    "lse_fl_four_rounds": ["lse.p_max=0.8"],  # p = 0.2, 0.4, 0.6, 0.8: more of the target, more steps
    "lse_fl_long_rounds": ["train.epochs_per_round=4"],  # the control of the two below: as many steps
    # DACS's student input over rounds long enough to see each mixed patch four times
    "lse_fl_classmix_long": ["lse.classmix=true", "train.photometric_patches=true", "train.epochs_per_round=4"],
    # and its teacher: a mean teacher (~100 steps averaged) relabelling the patches at every step
    "lse_fl_online_teacher_long": ["lse.online_teacher=0.99", "lse.classmix=true", "train.photometric_patches=true",
                                   "train.epochs_per_round=4"],
}
SOURCE_TRAINED = {  # variant -> overrides of jobs/train_source.py: a source model of its own
    "source_no_photometric": ["train.photometric=false"],
    "source_short": ["train.source_epochs=2.5", "train.holdout=0"],  # the previous default: 7 points lower (README)
    # three times the recipe's rate: lower source-val loss at 2.5 and 5 epochs (day, seed 0)
    "source_high_lr": ["train.lr=1.5e-3"],
    "source_rare_class": ["train.rare_class_sampling=0.01"],  # DAFormer's temperature
    "source_class_colours": ["train.class_colours=true"],  # each class recoloured on its own
}
FROM_SOURCE = {  # variant -> the source-trained variant whose model it adapts with the default's rounds
    "lse_fl_short": "source_short",
    "lse_fl_high_lr": "source_high_lr",
    "lse_fl_rare_class": "source_rare_class",
    "lse_fl_class_colours": "source_class_colours",
}
FROM_DEFAULT_RUN = ("source_only", "source_target_bn")
COMPARISONS = [  # (A, B): does A beat B?
    (DEFAULT, "source_only"), (DEFAULT, "continued_source"), (DEFAULT, "source_target_bn"),
    (DEFAULT, "plain_self_training"), (DEFAULT, "lse"), (DEFAULT, "lse_fl_source_bn"),
    ("lse_fl_source_bn", "source_only"), ("source_target_bn", "source_only"),
    ("lse_fl_confidence", DEFAULT), ("lse_fl_ema", DEFAULT), ("source_only", "source_no_photometric"),
    ("lse_fl_safeguard", DEFAULT), ("lse_fl_safeguard", "source_only"), ("lse_fl_classmix", DEFAULT),
    ("lse_fl_patch_jitter", DEFAULT), ("lse_fl_classmix_jitter", DEFAULT), ("lse_fl_classmix_jitter", "lse_fl_classmix"),
    ("lse_fl_fused_teacher", DEFAULT), ("lse_fl_fourier_style", DEFAULT), ("lse_fl_four_rounds", DEFAULT),
    ("lse_fl_long_rounds", DEFAULT),
    ("lse_fl_classmix_long", "lse_fl_long_rounds"), ("lse_fl_online_teacher_long", "lse_fl_classmix_long"),
    ("source_only", "source_short"), (DEFAULT, "lse_fl_short"), ("lse_fl_short", "source_target_bn"),
    ("source_high_lr", "source_only"), ("lse_fl_high_lr", DEFAULT), ("lse_fl_high_lr", "source_high_lr_target_bn"),
    ("source_rare_class", "source_only"), ("lse_fl_rare_class", DEFAULT),
    ("source_class_colours", "source_only"), ("lse_fl_class_colours", DEFAULT),
]


def job(script: str, run_dir: Path, overrides: list[str]) -> None:
    """Run a job, unless `run_dir` already holds its finished run with this very config (re-running
    the ablation to add seeds or variants then costs no Ray start per finished run)."""
    if not finished(script, run_dir, overrides):
        subprocess.run([sys.executable, str(REPO / "jobs" / script), "--run-dir", str(run_dir), *sets(overrides)],
                       check=True, cwd=REPO)


def finished(script: str, run_dir: Path, overrides: list[str]) -> bool:
    """Whether `run_dir` holds this run, finished: the same fingerprint (the config keys that decide
    results, as a job compares them; paths compared where they lead, whether given relative or
    absolute) and its final file."""
    from sisray.config import load_config, with_absolute_paths
    from sisray.run_state import fingerprint

    done = run_dir / ("summary.json" if script == "adapt.py" else "source/eval.json")
    saved = run_dir / "config.yaml"
    if not (done.is_file() and saved.is_file()):
        return False
    if script == "adapt.py" and not json.loads(done.read_text()).get("complete"):
        return False
    expected = load_config(REPO / "configs" / "synthetic.yaml", overrides)
    return fingerprint(with_absolute_paths(load_config(saved))) == fingerprint(with_absolute_paths(expected))


def trained_model(run_dir: Path) -> Path:
    """The model file a finished jobs/train_source.py run trained."""
    return (run_dir / "source" / "checkpoint" / "model.pt").resolve()


def seed_source(base: list[str], folder: Path, first: bool) -> str:
    """The source model every variant of a seed adapts: the one the overrides give, else the seed's,
    trained with the default's recipe in `folder` when `first` (the first domain of a suite)."""
    given = [o for o in base if o.startswith("model.source_checkpoint=")]
    if given:
        return given[-1].split("=", 1)[1]
    if first:
        job("train_source.py", folder / SOURCE, [*base, "model.source_checkpoint=null"])
    return str(trained_model(folder / SOURCE))


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def run_seed(seed: int, out: Path, variants: list[str], common: list[str], oracle: bool,
             shared: Path | None = None) -> dict[str, dict]:
    """The evaluation blocks of one seed's variants (and its rounds' pseudo-label accuracy). The seed's
    source model and each source-trained variant's are trained here, unless `shared` (another
    domain's seed folder, of the same source) has them: they are adapted from there."""
    base = [*common, f"seed={seed}"]
    folder = out / f"seed_{seed}"
    source = seed_source(base, shared or folder, first=shared is None)
    job("adapt.py", folder / DEFAULT, [*base, f"model.source_checkpoint={source}"])
    results = {}
    default = json.loads((folder / DEFAULT / "summary.json").read_text())
    results["source_only"] = {"evaluation": default["source_only"]}
    if default.get("source_target_bn"):
        results["source_target_bn"] = {"evaluation": default["source_target_bn"]}
    for name in variants:
        if name in FROM_SOURCE:  # after its source variant (the order of `variants`)
            trained = trained_model((shared or folder) / FROM_SOURCE[name])
            job("adapt.py", folder / name, [*base, f"model.source_checkpoint={trained}"])
            summary = json.loads((folder / name / "summary.json").read_text())
            results[name] = {"evaluation": summary["final"]}
            results[f"{FROM_SOURCE[name]}_target_bn"] = {"evaluation": summary["source_target_bn"]}
            if shared:  # the shared source model on this domain's target val
                results[FROM_SOURCE[name]] = {"evaluation": summary["source_only"]}
            continue
        if name in SOURCE_TRAINED and shared:  # trained once, in the first domain
            continue
        if name in SOURCE_TRAINED:
            job("train_source.py", folder / name, [*base, "model.source_checkpoint=null", *SOURCE_TRAINED[name]])
            results[name] = {"evaluation": json.loads((folder / name / "source" / "eval.json").read_text())}
            continue
        if name != DEFAULT:
            job("adapt.py", folder / name, [*base, f"model.source_checkpoint={source}", *ADAPTED[name]])
        summary = json.loads((folder / name / "summary.json").read_text())
        results[name] = {"evaluation": summary["final"],
                         "pseudo_label_accuracy": [r.get("pseudo_label_accuracy", {}).get("overall")
                                                   for r in summary["rounds"]]}
        if summary.get("safeguard"):
            results[name]["safeguard"] = safeguard_record(summary)
    if oracle:  # as many steps as the seed's source model; all target-train labels (nothing held out)
        job("train_source.py", folder / "oracle", [*base, "model.source_checkpoint=null", "train.oracle=true",
                                                   f"train.source_epochs={oracle_epochs(base)}", "train.holdout=0"])
        results["oracle"] = {"evaluation": json.loads((folder / "oracle" / "source" / "eval.json").read_text())}
    return results


def oracle_epochs(overrides: list[str]) -> float:
    """The oracle's epochs over the target-train images for as many steps as the source model that
    the default's recipe with these overrides trains (on the source images it does not hold out)."""
    from sisray.config import load_config
    from sisray.datasets import open_source, open_target

    cfg = load_config(REPO / "configs" / "synthetic.yaml", overrides)
    trained = len(open_source(cfg.data.source)) * (1 - cfg.train.holdout)
    return cfg.train.source_epochs * trained / len(open_target(cfg.data.target, "train", with_labels=False))


def safeguard_record(summary: dict) -> list[dict]:
    """Each verdict of the safeguard beside what target-val mIoU says of it: `right` when it accepted a
    candidate at least as good as the model it replaced, or rejected a worse one."""
    incumbent = summary["source_only"]
    candidates = {"source": summary["source_target_bn"],
                  **{f"round_{b['round']:02d}": b["evaluation"] for b in summary["rounds"]}}
    record = []
    for verdict in summary["safeguard"]:
        candidate = candidates[verdict["decision"]]
        better = candidate["miou"] >= incumbent["miou"]
        record.append({"decision": verdict["decision"], "accepted": verdict["accepted"],
                       "gain": round(100 * (candidate["miou"] - incumbent["miou"]), 2),
                       "right": better == verdict["accepted"]})
        incumbent = candidate if verdict["accepted"] else incumbent
    return record


def mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else float("nan")


def beats(a: list[float], b: list[float]) -> bool:
    """The difference of the means exceeds the pooled standard deviation."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    return ma - mb > math.sqrt((sa ** 2 + sb ** 2) / 2)


def run_suite(suite: Path, seeds: list[int], out: Path, variants: list[str], common: list[str],
              oracle: bool, domains: list[str] | None = None) -> dict[str, dict[int, dict]]:
    """Every domain of the suite (SUITE[d] at SUITE/<d>), or those in `domains` (the first of them
    first), per seed: one source model per seed, trained in the first domain (the domains share
    their source) and adapted in every domain; so are the source-trained variants' models
    (`lse_fl_short` adapts the first domain's `source_short` in every domain)."""
    from sisray.datasets.synthetic import SUITE

    domains = domains or list(SUITE)
    first = domains[0]
    results: dict[str, dict[int, dict]] = {domain: {} for domain in domains}
    for seed in seeds:  # every domain of a seed before the next seed: a first look comes early
        for domain in domains:
            roots = [f"data.source.root={suite / domain}", f"data.target.root={suite / domain}"]
            shared = None if domain == first else out / first / f"seed_{seed}"
            results[domain][seed] = run_seed(seed, out / domain, variants, [*common, *roots], oracle, shared)
    return results


def summarise(per_seed: dict[int, dict], seeds: list[int], variants: list[str]) -> dict:
    """Per variant the mean +- std over seeds and per class; the verdicts; printed as a table."""
    names = [n for n in (*FROM_DEFAULT_RUN, *variants, *(f"{v}_target_bn" for v in SOURCE_TRAINED), "oracle")
             if all(n in r for r in per_seed.values())]
    figures: dict[str, dict] = {}
    for name in names:
        blocks = [per_seed[s][name] for s in seeds]
        miou = [100 * b["evaluation"]["miou"] for b in blocks]
        miou19 = [100 * b["evaluation"]["miou19"] for b in blocks]
        classes = blocks[0]["evaluation"]["per_class"]
        per_class = {c: round(float(np.mean([100 * (b["evaluation"]["per_class"][c] or 0) for b in blocks])), 1)
                     for c in classes if any(b["evaluation"]["per_class"][c] is not None for b in blocks)}
        figures[name] = {"miou": miou, "miou_mean_std": [round(v, 2) for v in mean_std(miou)],
                         "miou19_mean_std": [round(v, 2) for v in mean_std(miou19)], "per_class": per_class}
        if all("safeguard" in b for b in blocks):
            decisions = [d for b in blocks for d in b["safeguard"]]
            figures[name]["safeguard"] = {"decisions": len(decisions), "right": sum(d["right"] for d in decisions),
                                          "rejected": sum(not d["accepted"] for d in decisions), "per_seed": [
                                              b["safeguard"] for b in blocks]}
        accuracy = [b.get("pseudo_label_accuracy") for b in blocks]
        if accuracy[0]:
            figures[name]["pseudo_label_accuracy_per_round"] = [
                round(100 * float(np.mean([a[r] for a in accuracy])), 1) for r in range(len(accuracy[0]))]

    print(f"\n{len(seeds)} seeds {seeds}; mean +- std over seeds; benchmark mIoU = its 13 classes\n")
    print(f"{'':<28}{'mIoU':>14}{'mIoU19':>14}   pseudo-label accuracy per round (%)")
    for name, f in figures.items():
        (m, s), (m19, s19) = f["miou_mean_std"], f["miou19_mean_std"]
        accuracy = " / ".join(f"{a:.1f}" for a in f.get("pseudo_label_accuracy_per_round", []))
        print(f"{name:<28}{m:>8.1f} +-{s:>4.1f}{m19:>8.1f} +-{s19:>4.1f}   {accuracy}")
        if "safeguard" in f:
            g = f["safeguard"]
            print(f"{'':<28}safeguard: {g['right']} of {g['decisions']} verdicts right ({g['rejected']} rejections)")
    verdicts = {}
    print("\nverdicts (A beats B: mean difference > pooled std):")
    for a, b in COMPARISONS:
        if a in figures and b in figures:
            won = beats(figures[a]["miou"], figures[b]["miou"])
            diff = float(np.mean(figures[a]["miou"]) - np.mean(figures[b]["miou"]))
            per_seed_diff = [round(x - y, 1) for x, y in zip(figures[a]["miou"], figures[b]["miou"])]
            verdicts[f"{a} > {b}"] = {"beats": won, "difference": round(diff, 2), "per_seed": per_seed_diff}
            print(f"  {a} vs {b}: {diff:+.1f} (per seed {per_seed_diff}) -> {'beats' if won else 'not shown'}")
    if "oracle" in figures:
        source, final, oracle = (float(np.mean(figures[n]["miou"])) for n in ("source_only", DEFAULT, "oracle"))
        share = (final - source) / (oracle - source) if oracle > source else float("nan")
        verdicts["gap_closed"] = round(share, 3)
        print(f"\nthe default closes {100 * share:.0f}% of the source-only -> oracle gap "
              f"({source:.1f} -> {final:.1f} of {oracle:.1f})")
    sources = [n for n in FROM_DEFAULT_RUN if n in figures]
    if "oracle" in figures and sources:  # the bar: the source model with its better choice of target BN
        best = max(sources, key=lambda n: np.mean(figures[n]["miou"]))
        floor, ceiling = (float(np.mean(figures[n]["miou"])) for n in (best, "oracle"))
        for name in (n for n in (DEFAULT, "lse_fl_short") if n in figures):
            final = float(np.mean(figures[name]["miou"]))
            verdicts[f"{name} over {best}"] = {"difference": round(final - floor, 2),
                                               "gap_closed": round((final - floor) / (ceiling - floor), 3)}
            print(f"{name}: {final - floor:+.1f} over {best} ({floor:.1f}), "
                  f"{100 * (final - floor) / (ceiling - floor):.0f}% of its gap to the oracle ({ceiling:.1f})")
    return {"variants": figures, "verdicts": verdicts}


def main() -> None:
    from sisray.datasets.synthetic import SUITE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--variants", nargs="+", default=[*ADAPTED, *SOURCE_TRAINED, *FROM_SOURCE],
                        choices=[*ADAPTED, *SOURCE_TRAINED, *FROM_SOURCE])
    parser.add_argument("--oracle", action="store_true", help="also train the oracle of each seed")
    parser.add_argument("--suite", type=Path, help="run every target domain of the suite written there "
                                                   "(python jobs/make_synthetic.py --suite --out DIR)")
    parser.add_argument("--domains", nargs="+", choices=list(SUITE),
                        help="with --suite: these domains only; the first trains the source models (default: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    common = [*args.overrides, "tracking.experiment=sisray-ablation"]
    order = [*ADAPTED, *SOURCE_TRAINED, *FROM_SOURCE]
    variants = sorted(set(args.variants) | {DEFAULT} | {FROM_SOURCE[v] for v in args.variants if v in FROM_SOURCE},
                      key=order.index)
    if args.suite:
        domains = run_suite(args.suite.resolve(), args.seeds, Path(args.out), variants, common, args.oracle,
                            args.domains)
        figures = {}
        for domain, per_seed in domains.items():
            print(f"\n==== target domain: {domain}")
            figures[domain] = summarise(per_seed, args.seeds, variants)
        print(json.dumps({"seeds": args.seeds, "domains": figures}))
        return
    per_seed = {seed: run_seed(seed, Path(args.out), variants, common, args.oracle) for seed in args.seeds}
    print(json.dumps({"seeds": args.seeds, **summarise(per_seed, args.seeds, variants)}))


if __name__ == "__main__":
    main()
