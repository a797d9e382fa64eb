"""The safeguard's stages on the driver (sisray/safeguard.py): a model's scores on the target-train
images, the verdict on a candidate model, written to RUN/<folder>/safeguard.json and said on the
terminal."""

from __future__ import annotations

import json
from pathlib import Path

from sisray.config import Config
from sisray.safeguard import Verdict, judge, source_share
from sisray.stages.score import read_scores
from sisray.storage import atomic_write_json


def judge_candidate(cfg: Config, decision: str, candidate_scores: Path, incumbent_scores: Path,
                    label_space_file: Path, classes: tuple[int, ...], out: Path, candidate: str,
                    incumbent: str) -> Verdict:
    """Compare two models' scoring records on the target-train images; write and say the verdict."""
    prior = source_share(json.loads(label_space_file.read_text())["pixels"], classes)
    verdict = judge(decision, read_scores(candidate_scores)["counts"], read_scores(incumbent_scores)["counts"],
                    prior, classes, cfg.lse.safeguard_tolerance, candidate, incumbent)
    atomic_write_json(out, verdict.as_dict())
    print(f"safeguard: {verdict.reason}", flush=True)
    return verdict


def read_verdict(path: Path) -> Verdict:
    return Verdict(**json.loads(path.read_text()))

