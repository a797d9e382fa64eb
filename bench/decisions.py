"""Would a label-free rule have decided a run's risky changes right? Measured on the suite's runs.

    python bench/decisions.py --runs runs/suite [--domains day rural ...] [--variant lse_fl] [--images 64]

A default run (bench/ablation.py: RUNS/<domain>/seed_<s>/lse_fl) adopts changes that carry a risk:
target BatchNorm statistics for the source model, then each round's model in place of the one before.
For each such change, both models' validators on the run's validation subset of target-train images
(sisray/validators.py: the images a user has, without labels) and what target-val mIoU says of it: a
change helped when it did not lower mIoU. A rule accepts or rejects each change from the two models'
figures alone, and is right when it accepts a change that helped or rejects one that hurt. Rules:
- accept: every change (what a run without the safeguard does);
- each validator: accept when the candidate scores at least as well, in the validator's direction;
- prior: lse.safeguard_rule "prior" (the predicted class shares may move away from the source labels'
  by at most lse.safeguard_tolerance; here from the mean softmax, the run's rule counts predicted pixels);
- probes: flip agreement and the ClassMix probe alone (rejected when both fall);
- consistency: lse.safeguard_rule "consistency" as the run's config sets it (the probes, unless the
  class entropy rises by more than lse.safeguard_spread: sisray/safeguard.py).
Each model's validators are kept in RUN/validators_<images>.json, so re-running adds runs for free.
Last line: one JSON object, {"rules": {NAME: {"right": k, "decisions": n, "hurt": h, "hurt_rejected":
r, "helped_rejected": a}, ...}, "decisions": [...]}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import REPO

sys.path.insert(0, str(REPO))

from ablation import DEFAULT  # noqa: E402

from sisray.safeguard import judge_consistency  # noqa: E402
from sisray.validators import HIGHER_IS_BETTER  # noqa: E402


def changes(run_dir: Path) -> list[dict]:
    """The risky changes a finished run adopted, in order: {"decision", "incumbent", "candidate"}, the
    models as files or checkpoint folders, and both models' target-val mIoU."""
    from sisray.config import load_config
    from sisray.weights import checkpoint_location

    cfg = load_config(run_dir / "config.yaml")
    incumbent = (checkpoint_location(cfg.model.source_checkpoint), run_dir / "source" / "eval.json")
    out = []
    if cfg.lse.target_bn:
        candidate = (run_dir / "source" / "target_bn", run_dir / "source" / "target_bn" / "eval.json")
        out.append(("target_bn", incumbent, candidate))
        incumbent = candidate
    for folder in sorted(run_dir.glob("round_[0-9][0-9]")):
        model = folder / "target_bn" if cfg.lse.target_bn else folder / "checkpoint"
        candidate = (model, folder / "eval.json")
        out.append((folder.name, incumbent, candidate))
        incumbent = candidate
    return [{"decision": name, "incumbent": str(old[0]), "candidate": str(new[0]),
             "incumbent_miou": _miou(old[1]), "candidate_miou": _miou(new[1])} for name, old, new in out]


def _miou(eval_file: Path) -> float:
    return round(100 * json.loads(eval_file.read_text())["miou"], 2)


def validators(run_dir: Path, models: list[str], images: int) -> dict[str, dict[str, float]]:
    """Each model's validators on the run's validation subset (`images` target-train images), cached
    in RUN/validators_<images>.json."""
    from sisray.config import load_config
    from sisray.safeguard import source_share
    from sisray.stages.validation import validate_model

    cache_file = run_dir / f"validators_{images}.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    missing = [m for m in models if m not in cache]
    if missing:
        cfg = load_config(run_dir / "config.yaml", [f"validation.images={images}"])
        space = json.loads((run_dir / "source" / "classes.json").read_text())
        classes = tuple(space["class_ids"])
        prior = source_share(space["pixels"], classes)
        for model in missing:
            cache[model] = validate_model(cfg, model, prior, classes)
            cache_file.write_text(json.dumps(cache, indent=1))
    return cache


def prior_distance(squashed: float) -> float:
    """The raw distance d from the validator's d / (1 + d)."""
    return squashed / (1 - squashed)


def verdicts(incumbent: dict[str, float], candidate: dict[str, float], tolerance: float, spread: float | None) -> dict:
    """Each rule's accept (True) or reject (False) of one change."""
    out = {"accept": True}
    for name, higher in HIGHER_IS_BETTER.items():
        sign = 1 if higher else -1
        out[name] = sign * candidate[name] >= sign * incumbent[name]
    out["prior"] = prior_distance(candidate["prior_distance"]) <= prior_distance(incumbent["prior_distance"]) + tolerance
    out["probes"] = judge_consistency("", candidate, incumbent, "candidate", "incumbent", None).accepted
    out["consistency"] = judge_consistency("", candidate, incumbent, "candidate", "incumbent", spread).accepted
    return out


def tally(decisions: list[dict]) -> dict[str, dict[str, int]]:
    """Per rule: decisions right, decisions, changes that hurt, of those rejected, helpful ones rejected."""
    out = {}
    for rule in decisions[0]["verdicts"]:
        right = hurt = hurt_rejected = helped_rejected = 0
        for d in decisions:
            helped = d["candidate_miou"] >= d["incumbent_miou"]
            accepted = d["verdicts"][rule]
            right += accepted == helped
            hurt += not helped
            hurt_rejected += not helped and not accepted
            helped_rejected += helped and not accepted
        out[rule] = {"right": right, "decisions": len(decisions), "hurt": hurt, "hurt_rejected": hurt_rejected,
                     "helped_rejected": helped_rejected}
    return out


def run_decisions(run_dir: Path, images: int, label: str) -> list[dict]:
    from sisray.config import load_config

    lse = load_config(run_dir / "config.yaml").lse
    found = changes(run_dir)
    figures = validators(run_dir, sorted({m for c in found for m in (c["incumbent"], c["candidate"])}), images)
    return [{**c, "run": label, "gain": round(c["candidate_miou"] - c["incumbent_miou"], 2),
             "validators": {"incumbent": figures[c["incumbent"]], "candidate": figures[c["candidate"]]},
             "verdicts": verdicts(figures[c["incumbent"]], figures[c["candidate"]], lse.safeguard_tolerance,
                                 lse.safeguard_spread)} for c in found]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "suite")
    parser.add_argument("--domains", nargs="+", help="these domains' runs only (default: every domain found)")
    parser.add_argument("--variant", default=DEFAULT, help="the runs judged (default: the default, lse_fl)")
    parser.add_argument("--images", type=int, default=64, help="target-train images validated per model")
    args = parser.parse_args()
    decisions = []
    # a suite's runs (RUNS/<domain>/seed_<s>/<variant>) or one benchmark's (RUNS/seed_<s>/<variant>)
    for run_dir in sorted([*args.runs.glob(f"*/seed_*/{args.variant}"), *args.runs.glob(f"seed_*/{args.variant}")]):
        domain, seed = run_dir.parts[-3], run_dir.parts[-2]
        if (run_dir / "summary.json").is_file() and (not args.domains or domain in args.domains):
            decisions += run_decisions(run_dir, args.images, f"{domain}/{seed}")
    if not decisions:
        sys.exit(f"error: no finished {args.variant} runs under {args.runs} (bench/ablation.py --suite makes them)")
    rules = tally(decisions)
    print(f"{'change':<26}{'mIoU':>16}{'gain':>7}   rejected by")
    for d in decisions:
        rejected = [r for r, accepted in d["verdicts"].items() if not accepted]
        print(f"{d['run'] + ' ' + d['decision']:<26}{d['incumbent_miou']:>7.1f} -> {d['candidate_miou']:<5.1f}"
              f"{d['gain']:>+7.1f}   {', '.join(rejected) or '-'}")
    print(f"\n{'rule':<16}{'right':>8}{'hurt rejected':>16}{'helped rejected':>18}")
    for rule, t in rules.items():
        print(f"{rule:<16}{t['right']:>4} / {t['decisions']:<3}{t['hurt_rejected']:>8} / {t['hurt']:<5}"
              f"{t['helped_rejected']:>12}")
    print(json.dumps({"rules": rules, "decisions": decisions}))


if __name__ == "__main__":
    main()
