"""How well each label-free validator chooses among adaptation trials, measured against target-val mIoU.

    python bench/selection.py --suite data/suite --out runs/selection [--domains day dusk fog near] [--seeds 0 1] [--set k=v ...]
    python bench/selection.py --tiny      # the tests' smoke run: 3 trials on a generated 6-image set

Per domain and seed, every trial of a fixed grid (`TRIALS`: threshold estimator, LSE's scale, the p
schedule, the focal weight beta, the rounds' rate and target BatchNorm, one or two at a time around the
default) adapts the seed's source model (bench/ablation.py's default run of the first domain, trained
here if missing, or the one `--set model.source_checkpoint=...` gives) with `jobs/adapt.py`, computing the final model's validators on 64 target-train
images (`validation.images`, sisray/validators.py), and the sweep's default objective as a trial
reports it (`val_information`: information on the target-val images). Per validator, signed so that
higher is better:
- spearman: the rank correlation of the validator with the trials' final target-val mIoU;
- regret: the best trial's mIoU minus the mIoU of the trial the validator picks (points of mIoU);
both averaged over (domain, seed). Finished runs are reused (the same run directory and config), so
re-running adds domains or seeds. Last line: one JSON object,
{"validators": {NAME: {"spearman": .., "regret": ..}, ...}, "domains": [...], "trials": N, ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import REPO, TINY, make_set, random_checkpoint

sys.path.insert(0, str(REPO))

from ablation import SOURCE, job, seed_source  # noqa: E402

from sisray.sweep.driver import spearman  # noqa: E402
from sisray.validators import HIGHER_IS_BETTER  # noqa: E402

TRIALS = {  # name -> overrides of jobs/adapt.py on top of configs/synthetic.yaml
    "default": [],
    "estimator_quantile": ["lse.threshold.estimator=quantile"],
    "scale_1.5": ["lse.scale=1.5"],
    "scale_3": ["lse.scale=3"],
    "p_0.1_0.3": ["lse.p0=0.1", "lse.p_max=0.3"],
    "p_0.4": ["lse.p0=0.4", "lse.p_max=0.4"],
    "beta_0": ["lse.beta=0"],
    "beta_1": ["lse.beta=1"],
    "round_lr_3e-4": ["train.round_lr=3e-4"],
    "round_lr_3e-5": ["train.round_lr=3e-5"],
    "no_target_bn": ["lse.target_bn=false"],
    "no_target_bn_scale_1.5": ["lse.target_bn=false", "lse.scale=1.5"],
}
TINY_TRIALS = ("default", "beta_0", "scale_1.5")
# what is ranked: the validators on target-train images, and the sweep's default objective as a trial
# reports it to Tune (`information` of the final evaluation's softmax on the target-val images, no label)
RANKED = {**HIGHER_IS_BETTER, "val_information": True}


def scores(trials: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """Per validator over one (domain, seed)'s trials {name: {"miou": .., "validators": {..}}}: the
    Spearman correlation with mIoU and the regret of its pick (points), the validator signed so that
    higher is better; trials whose validator is not a number are left out."""
    best = max(t["miou"] for t in trials.values())
    out = {}
    for name, higher in RANKED.items():
        pairs = [((1 if higher else -1) * t["validators"][name], t["miou"]) for t in trials.values()
                 if np.isfinite(t["validators"].get(name, np.nan))]
        if not pairs:
            out[name] = {"spearman": None, "regret": None}
            continue
        pick = max(pairs, key=lambda p: p[0])[1]
        out[name] = {"spearman": spearman([p[0] for p in pairs], [p[1] for p in pairs]),
                     "regret": round(100 * (best - pick), 2)}
    return out


def averaged(per_run: list[dict[str, dict]]) -> dict[str, dict[str, float | None]]:
    """The mean Spearman and regret of each validator over (domain, seed) runs."""
    def mean(values):
        values = [v for v in values if v is not None]
        return round(float(np.mean(values)), 3) if values else None

    return {name: {key: mean([run[name][key] for run in per_run]) for key in ("spearman", "regret")}
            for name in RANKED}


def run_trials(folder: Path, source: str | Path, common: list[str], names: tuple[str, ...]) -> dict[str, dict]:
    """Each trial adapts `source` in FOLDER/<trial>: its final mIoU and validators."""
    out = {}
    for name in names:
        run_dir = folder / name
        job("adapt.py", run_dir, [*common, f"model.source_checkpoint={source}", *TRIALS[name]])
        final = json.loads((run_dir / "summary.json").read_text())["final"]
        out[name] = {"miou": final["miou"],
                     "validators": {**final["validators"], "val_information": final["label_free"]["information"]}}
    return out


def suite_runs(suite: Path, out: Path, domains: list[str], seeds: list[int], common: list[str]) -> dict:
    """(domain, seed) -> its trials, from each seed's source model (bench/ablation.py's, when it
    trained one in the first domain; else trained here)."""
    runs = {}
    for seed in seeds:
        first = [f"data.source.root={suite / domains[0]}", f"data.target.root={suite / domains[0]}", f"seed={seed}"]
        folder = REPO / "runs" / "suite" / domains[0] / f"seed_{seed}"
        if not (folder / SOURCE).is_dir():
            folder = out / "sources" / f"seed_{seed}"
        source = seed_source([*[o for o in common if not o.startswith("validation.")], *first], folder, first=True)
        for domain in domains:
            roots = [f"data.source.root={suite / domain}", f"data.target.root={suite / domain}", f"seed={seed}"]
            runs[(domain, seed)] = run_trials(out / domain / f"seed_{seed}", source, [*common, *roots], tuple(TRIALS))
    return runs


def tiny_runs(folder: Path) -> dict:
    root = make_set(folder / "data", target_train=6, target_val=2, source=2)
    source = random_checkpoint(folder / "source.pt")
    common = [*TINY, f"data.source.root={root}", f"data.target.root={root}", "tracking.enabled=false",
              "validation.images=4"]
    return {("tiny", 0): run_trials(folder / "trials", Path(source), common, TINY_TRIALS)}


def main() -> None:
    from sisray.datasets.synthetic import SUITE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", type=Path, default=REPO / "data" / "suite")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "selection")
    parser.add_argument("--domains", nargs="+", choices=list(SUITE), default=["day", "dusk", "fog", "near"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config overrides of every trial (and of the source model it adapts)")
    args = parser.parse_args()
    common = [*args.overrides, "tracking.experiment=sisray-selection", "validation.images=64"]
    if args.tiny:
        with tempfile.TemporaryDirectory() as tmp:
            runs = tiny_runs(Path(tmp))
    else:
        runs = suite_runs(args.suite.resolve(), args.out.resolve(), args.domains, args.seeds, common)
    per_run = {key: scores(trials) for key, trials in runs.items()}
    for (domain, seed), figures in per_run.items():
        print(f"\n{domain}, seed {seed}: trials' mIoU " + ", ".join(
            f"{name} {100 * t['miou']:.1f}" for name, t in runs[(domain, seed)].items()))
        for name, f in figures.items():
            print(f"  {name:<16} spearman {f['spearman'] if f['spearman'] is None else round(f['spearman'], 2)!s:>6}"
                  f"  regret {f['regret']!s:>6}")
    domains = sorted({d for d, _ in runs})
    print(json.dumps({"validators": averaged(list(per_run.values())), "domains": domains,
                      "seeds": sorted({s for _, s in runs}), "trials": len(next(iter(runs.values()))),
                      "per_run": {f"{d}/{s}": f for (d, s), f in per_run.items()},
                      "miou": {f"{d}/{s}": {n: round(100 * t["miou"], 2) for n, t in trials.items()}
                               for (d, s), trials in runs.items()}}))


if __name__ == "__main__":
    main()
