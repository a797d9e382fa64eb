"""The label-free safeguard (lse.safeguard): its distance and verdicts (pure), and how the rounds
follow its verdicts, with every Ray stage stood in for so that each model's predictions are chosen
by the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sisray import rounds, run_state
from sisray.config import load_config
from sisray.datasets.synthetic import CLASSES as BENCHMARK
from sisray.safeguard import judge, judge_consistency, predicted_share, prior_distance, source_share
from sisray.storage import RunStore
from sisray.tracking import Tracking

CLASSES = (0, 2, 10, 13)  # road, building, sky, car
PRIOR = np.array([0.4, 0.3, 0.2, 0.1])


def counts_like(share, classes=CLASSES, images: int = 4) -> np.ndarray:
    """(images, 19) predicted-pixel counts whose class proportions are `share` over `classes`."""
    counts = np.zeros((images, 19), np.int64)
    counts[:, list(classes)] = np.round(np.asarray(share) * 1000).astype(np.int64)
    return counts


def test_the_distance_is_zero_for_the_source_proportions_and_counts_every_class_alike():
    assert predicted_share(counts_like(PRIOR), CLASSES) == pytest.approx(PRIOR)
    assert prior_distance(PRIOR, PRIOR) == 0.0
    road_halved = prior_distance(np.array([0.2, 0.4, 0.27, 0.13]), PRIOR)
    car_halved = prior_distance(np.array([0.42, 0.32, 0.21, 0.05]), PRIOR)
    assert car_halved > 0.15 and road_halved > 0.15  # a rare class counts as much as the road
    # a class never predicted is far, not infinitely far
    assert np.isfinite(prior_distance(np.array([0.5, 0.3, 0.2, 0.0]), PRIOR))
    assert source_share({"road": 40, "building": 30, "sky": 20, "car": 10, "person": 99}, CLASSES) == pytest.approx(PRIOR)


def test_a_candidate_further_from_the_source_proportions_than_the_tolerance_is_rejected():
    collapsed = counts_like([0.7, 0.25, 0.05, 0.0])
    near = counts_like([0.38, 0.31, 0.2, 0.11])
    kept = judge("round_02", collapsed, near, PRIOR, CLASSES, 0.05, "round 2's model", "round 1's model")
    assert not kept.accepted and kept.candidate["prior_distance"] > kept.incumbent["prior_distance"] + 0.05
    assert kept.reason.startswith("round 2's model rejected, keeping round 1's model: the distance")
    assert judge("round_02", near, collapsed, PRIOR, CLASSES, 0.05, "a", "b").accepted
    slightly = counts_like([0.39, 0.31, 0.2, 0.1])
    assert judge("round_02", near, slightly, PRIOR, CLASSES, 1.0, "a", "b").accepted  # within the tolerance


def _model_kind(checkpoint: str) -> str:
    """Which model a checkpoint location is: source, source_bn, round_01, round_01_bn, ..."""
    parts = Path(checkpoint).parts
    where = parts[-2] if parts[-1] in ("checkpoint", "target_bn", "model.pt") else parts[-1]
    if parts[-1] == "model.pt":
        parts = parts[:-1]
        where = parts[-2] if parts[-1] in ("checkpoint", "target_bn") else parts[-1]
    return where + ("_bn" if parts[-1] == "target_bn" else "")


@pytest.fixture
def stand_ins(monkeypatch):
    """Every stage of the rounds stood in for; `predicts[kind]` is the class proportions model
    `kind` predicts on the target, `miou[kind]` its evaluation, `consistent[kind]` its (flip agreement,
    ClassMix probe) validators. Returns (predicts, miou, calls, consistent)."""
    from sisray import patch_set
    from sisray.stages import evaluate, patch_pass, score, select, target_bn, train

    predicts: dict[str, list[float]] = {}
    miou: dict[str, float] = {}
    consistent: dict[str, tuple[float, float]] = {}
    calls: list[tuple[str, str]] = []

    def score_pass(cfg, checkpoint, out):
        calls.append(("score", _model_kind(str(checkpoint))))
        write_scores(_model_kind(str(checkpoint)), out)

    def write_scores(kind, out):
        counts = counts_like(predicts[kind], BENCHMARK)
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"index": np.arange(4), "sample_id": [str(i) for i in range(4)],
                                 "counts": counts.tolist(), "scores": np.ones((4, 19), np.float32).tolist(),
                                 "mean_entropy": np.zeros((4, 19), np.float32).tolist(),
                                 "histograms": np.zeros((4, 19, 2), np.int64).tolist(), "error": [""] * 4}), out)

    def evaluate_into(cfg, checkpoint, folder, prior=None, scores=None):
        kind = _model_kind(str(checkpoint))
        if scores:  # the evaluation's pass also scores the target-train images
            calls.append(("evaluate and score", kind))
            write_scores(kind, scores)
        folder.path.mkdir(parents=True, exist_ok=True)
        block = {"miou": miou[kind], "miou19": miou[kind], "per_class": {}}
        if kind in consistent:  # the evaluation computed the validators
            flip, mix, *spread = consistent[kind]  # (flip agreement, mix accuracy[, class entropy: 0.6])
            block["validators"] = {"flip_agreement": flip, "mix_accuracy": mix, "mean_entropy": 0.2,
                                   "information": (spread or [0.6])[0] - 0.2}
        folder.eval.write_text(json.dumps(block))
        return {"miou": miou[kind], "miou19": miou[kind], "miou16": None, "miou13": None, "pixel_accuracy": 0.0,
                "per_class": {}}

    def with_target_statistics(cfg, model, destination):
        calls.append(("target_bn", _model_kind(str(model))))
        destination.mkdir(parents=True, exist_ok=True)
        (destination / "model.pt").write_bytes(b"bn")

    def train_round(cfg, store, r, previous, logger, target_bn=False):
        calls.append((f"train round {r}", _model_kind(str(previous))))
        for folder in ("checkpoint", *(["target_bn"] if target_bn else [])):  # the fit's target statistics
            (store.local / f"round_{r:02d}" / folder).mkdir(parents=True, exist_ok=True)
            (store.local / f"round_{r:02d}" / folder / "model.pt").write_bytes(folder.encode())

    def select_and_threshold(cfg, tables, p, folder, skip):
        folder.selection.write_text(json.dumps({"selected_index": [0]}))
        folder.thresholds.write_text(json.dumps({"estimator": "cutoff_image", "tau": {}}))

    monkeypatch.setattr(score, "score_pass", score_pass)
    monkeypatch.setattr(evaluate, "evaluate_into", evaluate_into)
    monkeypatch.setattr(target_bn, "target_batchnorm", with_target_statistics)
    monkeypatch.setattr(train, "train_round", train_round)
    monkeypatch.setattr(select, "select_and_threshold", select_and_threshold)
    monkeypatch.setattr(select, "read_selection", lambda folder: ([0], np.zeros(19)))
    monkeypatch.setattr(patch_pass, "patch_pass", lambda *args, **kwargs: None)
    monkeypatch.setattr(patch_set, "report", lambda *args: {
        "images_scored": 4, "images_skipped": 0, "selected_images": 1, "patches": 2, "ignored_share": 0.5,
        "coverage": {}, "tau": {}})
    return predicts, miou, calls, consistent


COLLAPSED = [0.9] + [0.1 / 12] * 12  # road everywhere, the rest nearly never


def source_proportions(small_benchmark) -> list[float]:
    """The benchmark's 13 classes in the proportions of its source labels: what a good model predicts."""
    from sisray.datasets.synthetic import SyntheticSource

    pixels, _ = SyntheticSource(small_benchmark, "train", (64, 36)).class_counts()
    return list(pixels[list(BENCHMARK)] / pixels[list(BENCHMARK)].sum())


def _run(tmp_path, small_benchmark, fcn_checkpoint, *extra):
    from sisray.stages.label_space import label_space

    cfg = load_config(None, [
        "data.source.name=synthetic", f"data.source.root={small_benchmark}", "data.target.name=synthetic",
        f"data.target.root={small_benchmark}", "model.name=fcn8s_vgg16", "model.width=0.0625",
        f"model.source_checkpoint={fcn_checkpoint}", "lse.p0=0.5", "lse.p_step=0.25", "lse.p_max=0.75",
        "lse.safeguard=true", "lse.safeguard_rule=prior", f"run_dir={tmp_path / 'run'}", "tracking.enabled=false",
        *extra])
    store = RunStore(tmp_path / "run")
    classes = label_space(cfg, store)
    return cfg, classes, rounds.run(cfg, run_state.RunState(store, cfg), Tracking(cfg, "adapt"))


def test_rejected_target_statistics_and_a_rejected_round_keep_the_incumbent(stand_ins, small_benchmark,
                                                                           fcn_checkpoint, tmp_path):
    predicts, miou, calls, _ = stand_ins
    good, collapsed = source_proportions(small_benchmark), COLLAPSED
    predicts.update(source=good, source_bn=collapsed, round_01=good, round_02=collapsed)
    miou.update(source=0.30, source_bn=0.20, round_01=0.35, round_02=0.10)
    cfg, classes, summary = _run(tmp_path, small_benchmark, fcn_checkpoint, "lse.target_bn=true")

    assert [v["decision"] for v in summary["safeguard"]] == ["source", "round_01", "round_02"]
    assert [v["accepted"] for v in summary["safeguard"]] == [False, True, False]
    # BN rejected: round 1 learns from the plain source model, from its scores (no second pass), and
    # no round model gets target statistics
    assert ("train round 1", "source") in calls and ("train round 2", "round_01") in calls
    assert [c for c in calls if c[0] == "target_bn"] == [("target_bn", "source")]
    # every model is scored once, in the pass of its evaluation
    assert [c for c in calls if "score" in c[0]] == [
        ("evaluate and score", kind) for kind in ("source", "source_bn", "round_01", "round_02")]
    run = tmp_path / "run"
    assert (run / "round_01" / "scores.parquet").read_bytes() == (run / "source" / "target_scores.parquet").read_bytes()
    assert (run / "round_02" / "scores.parquet").read_bytes() == (run / "round_01" / "target_scores.parquet").read_bytes()
    assert summary["final"]["miou"] == 0.35  # round 1's model: round 2's was rejected
    assert summary["rounds"][1]["safeguard"]["reason"].startswith("round 2's model rejected, keeping round 1's model")


def test_accepted_target_statistics_carry_on_into_the_rounds(stand_ins, small_benchmark, fcn_checkpoint, tmp_path):
    predicts, miou, calls, _ = stand_ins
    collapsed, good = COLLAPSED, source_proportions(small_benchmark)
    predicts.update(source=collapsed, source_bn=good, round_01_bn=good, round_02_bn=collapsed)
    miou.update(source=0.1, source_bn=0.3, round_01_bn=0.35, round_02_bn=0.2)
    cfg, classes, summary = _run(tmp_path, small_benchmark, fcn_checkpoint, "lse.target_bn=true")
    assert [v["accepted"] for v in summary["safeguard"]] == [True, True, False]
    assert ("train round 1", "source_bn") in calls and ("train round 2", "round_01_bn") in calls
    # the source model's statistics are a task of their own, the rounds' come with their fit
    assert [c[1] for c in calls if c[0] == "target_bn"] == ["source"]
    assert summary["final"]["miou"] == 0.35


def test_without_rounds_accepted_the_final_model_is_the_source_model(stand_ins, small_benchmark, fcn_checkpoint,
                                                                     tmp_path):
    predicts, miou, calls, _ = stand_ins
    good, collapsed = source_proportions(small_benchmark), COLLAPSED
    predicts.update(source=good, round_01=collapsed, round_02=collapsed)
    miou.update(source=0.3, round_01=0.2, round_02=0.1)
    cfg, classes, summary = _run(tmp_path, small_benchmark, fcn_checkpoint, "lse.target_bn=false")
    assert [v["accepted"] for v in summary["safeguard"]] == [False, False]
    assert ("train round 2", "source") in calls  # round 2 learns from the model kept: the source model
    assert summary["final"]["miou"] == 0.3


def test_without_the_safeguard_only_the_teachers_are_scored_each_in_the_pass_of_its_evaluation(
        stand_ins, small_benchmark, fcn_checkpoint, tmp_path):
    """The default's rounds (target statistics, no safeguard): the source model with target statistics
    teaches round 1 and round 1's model round 2; the plain source model and the last model teach none."""
    predicts, miou, calls, _ = stand_ins
    predicts.update(source_bn=source_proportions(small_benchmark), round_01_bn=source_proportions(small_benchmark))
    miou.update(source=0.1, source_bn=0.2, round_01_bn=0.3, round_02_bn=0.4)
    cfg, classes, summary = _run(tmp_path, small_benchmark, fcn_checkpoint, "lse.target_bn=true", "lse.safeguard=false")
    assert [c for c in calls if "score" in c[0]] == [("evaluate and score", "source_bn"),
                                                     ("evaluate and score", "round_01_bn")]
    assert ("train round 1", "source_bn") in calls and ("train round 2", "round_01_bn") in calls
    assert summary["final"]["miou"] == 0.4


def _probes(flip: float, mix: float, class_entropy: float = 0.6) -> dict:
    """Validators with these probes and this class entropy (information + mean entropy)."""
    return {"flip_agreement": flip, "mix_accuracy": mix, "information": class_entropy - 0.2, "mean_entropy": 0.2}


def test_the_consistency_rule_rejects_a_candidate_only_when_both_probes_fall():
    kept = judge_consistency("source", _probes(0.90, 0.86, 0.65), _probes(0.93, 0.90), "the source model with target BN",
                             "the source model", spread=0.1)
    assert not kept.accepted and kept.rule == "consistency"
    assert kept.candidate == {"flip_agreement": 0.9, "mix_accuracy": 0.86, "class_entropy": 0.65}
    assert kept.reason == ("the source model with target BN rejected, keeping the source model: flip agreement 0.900 "
                           "against 0.930, mix accuracy 0.860 against 0.900, class entropy 0.650 against 0.600 for "
                           "the source model")
    for one_up in (_probes(0.94, 0.86), _probes(0.90, 0.90)):
        assert judge_consistency("round_01", one_up, _probes(0.93, 0.90), "a", "b", spread=0.1).accepted


def test_the_consistency_rule_accepts_a_less_consistent_candidate_that_undoes_a_collapse():
    """Dusk: the source model labels nearly everything as a few classes, the same way mirrored or mixed;
    target BN agrees a little less with itself and spreads its predictions (class entropy +0.25)."""
    collapsed, spread = _probes(0.867, 0.896, 0.40), _probes(0.862, 0.860, 0.65)
    undone = judge_consistency("source", spread, collapsed, "the source model with target BN", "the source model",
                               spread=0.1)
    assert undone.accepted and "undoes a collapse" in undone.reason
    assert not judge_consistency("source", spread, collapsed, "a", "b", spread=0.3).accepted  # +0.25 is not > 0.3
    assert not judge_consistency("source", spread, collapsed, "a", "b", spread=None).accepted  # the probes alone


def test_by_consistency_the_rounds_read_each_models_validators_from_its_evaluation(
        stand_ins, small_benchmark, fcn_checkpoint, tmp_path):
    """Target BN that makes the model less consistent is rejected; round 1 then learns from the plain
    source model, and is judged against it; round 2 against round 1's model. The rule reads no scores:
    only a model that may teach is scored (the plain source model by round 1, once BN is rejected)."""
    predicts, miou, calls, consistent = stand_ins
    for kind in ("source", "source_bn", "round_01", "round_02"):
        predicts[kind] = source_proportions(small_benchmark)
    miou.update(source=0.58, source_bn=0.50, round_01=0.60, round_02=0.55)
    consistent.update(source=(0.93, 0.90), source_bn=(0.91, 0.87), round_01=(0.94, 0.89), round_02=(0.92, 0.88))
    cfg, classes, summary = _run(tmp_path, small_benchmark, fcn_checkpoint, "lse.target_bn=true",
                                 "lse.safeguard_rule=consistency")
    assert [(v["decision"], v["accepted"], v["rule"]) for v in summary["safeguard"]] == [
        ("source", False, "consistency"), ("round_01", True, "consistency"), ("round_02", False, "consistency")]
    assert summary["safeguard"][1]["incumbent"] == {"flip_agreement": 0.93, "mix_accuracy": 0.9,
                                                    "class_entropy": 0.6}  # the source model
    assert summary["safeguard"][2]["incumbent"] == {"flip_agreement": 0.94, "mix_accuracy": 0.89,
                                                    "class_entropy": 0.6}  # round 1's
    assert ("train round 1", "source") in calls and ("train round 2", "round_01") in calls
    assert [c for c in calls if "score" in c[0]] == [("evaluate and score", "source_bn"), ("score", "source"),
                                                     ("evaluate and score", "round_01")]
    assert summary["final"]["miou"] == 0.60


@pytest.mark.parametrize("spread, accepted", [("0.1", True), ("null", False)])
def test_the_run_accepts_target_bn_that_undoes_a_collapse_by_lse_safeguard_spread(
        stand_ins, small_benchmark, fcn_checkpoint, tmp_path, spread, accepted):
    """Dusk's case: target BN agrees less with itself and spreads the predictions (class entropy +0.25)."""
    predicts, miou, calls, consistent = stand_ins
    round_models = ("round_01_bn", "round_02_bn", "round_01", "round_02")
    for kind in ("source", "source_bn", *round_models):
        predicts[kind] = source_proportions(small_benchmark)
        consistent[kind] = (0.88, 0.89, 0.65)  # the rounds' models: accepted
    miou.update(source=0.08, source_bn=0.31, round_01_bn=0.34, round_02_bn=0.35, round_01=0.09, round_02=0.10)
    consistent.update(source=(0.867, 0.896, 0.40), source_bn=(0.862, 0.860, 0.65))
    _, _, summary = _run(tmp_path, small_benchmark, fcn_checkpoint, "lse.target_bn=true",
                         "lse.safeguard_rule=consistency", f"lse.safeguard_spread={spread}")
    assert summary["safeguard"][0]["accepted"] is accepted
    assert ("train round 1", "source_bn" if accepted else "source") in calls


def test_an_evaluation_without_validators_cannot_be_judged_by_consistency_and_says_how_to_go_on(tmp_path):
    from sisray.errors import ConfigError
    from sisray.stages.safeguard import validators_of

    old = tmp_path / "eval.json"
    old.write_text(json.dumps({"miou": 0.5}))
    with pytest.raises(ConfigError, match=r"eval.json holds no validators.*--set lse.safeguard_rule=prior"):
        validators_of(old)
    old.write_text(json.dumps({"miou": 0.5, "validators": {"flip_agreement": 0.9}}))
    assert validators_of(old) == {"flip_agreement": 0.9}
