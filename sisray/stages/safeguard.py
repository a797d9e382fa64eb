"""The safeguard's stage on the driver (sisray/safeguard.py): the verdict on a candidate model from
what both models' evaluations or scoring passes wrote, written to RUN/<folder>/safeguard.json and said
on the terminal."""

from __future__ import annotations

import json
from pathlib import Path

from sisray.config import Config
from sisray.errors import ConfigError
from sisray.safeguard import Verdict, judge, judge_consistency, source_share
from sisray.stages.score import read_scores
from sisray.storage import atomic_write_json


def judge_candidate(cfg: Config, decision: str, candidate_files: tuple[Path, Path], incumbent_files: tuple[Path, Path],
                    label_space_file: Path, classes: tuple[int, ...], out: Path, candidate: str,
                    incumbent: str) -> Verdict:
    """Judge a candidate against the incumbent by lse.safeguard_rule from each model's (scoring records
    on the target-train images, evaluation): the validators its evaluation holds (consistency), or its
    scores' predicted class counts (prior). Write and say the verdict."""
    if cfg.lse.safeguard_rule == "consistency":
        figures = [validators_of(evaluation) for _, evaluation in (candidate_files, incumbent_files)]
        verdict = judge_consistency(decision, *figures, candidate, incumbent, cfg.lse.safeguard_spread)
    else:
        prior = source_share(json.loads(label_space_file.read_text())["pixels"], classes)
        verdict = judge(decision, read_scores(candidate_files[0])["counts"], read_scores(incumbent_files[0])["counts"],
                        prior, classes, cfg.lse.safeguard_tolerance, candidate, incumbent)
    atomic_write_json(out, verdict.as_dict())
    print(f"safeguard: {verdict.reason}", flush=True)
    return verdict


def validators_of(evaluation: Path) -> dict:
    """The validators a model's evaluation computed; a run whose evaluations have none (begun before
    the consistency rule, or with the prior rule) cannot be judged by consistency."""
    block = json.loads(evaluation.read_text())
    if "validators" not in block:
        raise ConfigError(f"{evaluation} holds no validators, which lse.safeguard_rule = consistency reads: "
                          "the run began without them. Resume it with --set lse.safeguard_rule=prior, or start a "
                          "new run directory")
    return block["validators"]


def read_verdict(path: Path) -> Verdict:
    return Verdict(**json.loads(path.read_text()))

