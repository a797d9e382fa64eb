"""The self-training loop of LSE (docs/METHOD.md): a source model, then for each p of the schedule
score -> select + thresholds -> patches -> retrain -> evaluate (reporting only).

Every stage reads its inputs from the run directory and writes its outputs there atomically;
RUN/state.json records each finished stage with its wall time (sisray/run_state.py). Re-running the same command resumes
after the last finished stage, and since every random choice is seeded by (seed, round, ...), it
computes exactly what an uninterrupted run would. The reported model is always the last round's.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sisray.config import Config, LSEConfig
from sisray.labels import NUM_CLASSES
from sisray.metrics import MIOU_KEYS
from sisray.run_state import RunState
from sisray.rundir import MODEL, SAFEGUARD, ModelDir, RunDir
from sisray.storage import RunStore, atomic_write_json
from sisray.weights import checkpoint_location
from sisray.tracking import Tracking, evaluation_metrics

EVAL_KEYS = (*MIOU_KEYS, "pixel_accuracy", "per_class", "label_free", "class_share", "validators")
# Config keys that only the rounds' stages read (the schedule, selection, thresholds, retraining): runs
# that differ only in these share their source stages (a sweep's trials, sisray/stage_cache.py). A key
# the source stages read must never be here (tests/test_stage_cache.py runs them with every key changed).
ROUND_KEYS = ("lse.p0", "lse.p_step", "lse.p_max", "lse.selection", "lse.min_per_class", "lse.threshold.estimator",
              "lse.threshold.window", "lse.threshold.quantile", "lse.patches_per_image", "lse.zoom_out",
              "lse.entropy_gap", "lse.beta", "lse.gamma", "lse.confidence_weight", "lse.ema_decay", "lse.classmix",
              "lse.fourier_style", "lse.online_teacher", "train.round_lr", "train.round_warmup", "train.round_bn",
              "train.epochs_per_round", "train.photometric_patches")
SOURCE_STAGES = "source/"
SOURCE_EVALUATIONS = {"source/eval": "target_val", "source/target_bn_eval": "source_target_bn"}  # MLflow prefixes


def schedule(lse: LSEConfig) -> list[float]:
    """The portions p of the rounds: p0, p0 + step, ... up to p_max (one round if step is 0)."""
    portions = [lse.p0]
    while lse.p_step > 0 and portions[-1] + lse.p_step <= lse.p_max + 1e-9:
        portions.append(round(portions[-1] + lse.p_step, 10))
    return portions


def rounds_without_selection(cfg: Config, target_images: int) -> list[float]:
    """The portions p of the schedule at which class-wise selection without `lse.min_per_class`
    takes no image at all, whatever the scores: floor(N_c p / 19) is 0 when even a class present in
    every one of the N target images gets no quota."""
    if cfg.lse.selection != "classwise" or cfg.lse.min_per_class:
        return []
    return [p for p in schedule(cfg.lse) if math.floor(target_images * p / NUM_CLASSES + 1e-9) == 0]


def source_checkpoint(cfg: Config, store: RunStore) -> str:
    """Where workers read the source model: the source stage's, or the given checkpoint (its copy
    narrowed to the run's label space, once that stage has written one)."""
    folder = RunDir(store.local).source.checkpoint
    if cfg.model.source_checkpoint and not (folder / MODEL).is_file():
        return checkpoint_location(cfg.model.source_checkpoint)
    return store.shared(folder)


def run(cfg: Config, state: RunState, tracking: Tracking, on_round: Callable[[dict], None] | None = None,
        shared_source: Path | None = None) -> dict:
    """The whole method; returns (and writes) RUN/summary.json. `on_round` receives each finished
    round's block, in order, those finished before a resume included (a Tune trial reports them).
    With `shared_source` (a cache folder) the source stages are taken from there when a run of the
    same config but for ROUND_KEYS finished them, and put there otherwise."""
    from sisray.patch_set import report
    from sisray.stages.evaluate import evaluate_into
    from sisray.stages.label_space import label_space, narrowed_source, unlabelled
    from sisray.stages.patch_pass import patch_pass
    from sisray.stages.safeguard import judge_candidate, read_verdict
    from sisray.stages.score import read_scores, score_pass
    from sisray.stages.select import read_selection, select_and_threshold
    from sisray.safeguard import source_share
    from sisray.stage_cache import adopt, entry_key, publish
    from sisray.stages.target_bn import target_batchnorm
    from sisray.stages.train import train_round, train_source

    store = state.store
    run_dir = RunDir(store.local)
    entry = shared_source / entry_key(cfg, ROUND_KEYS) if shared_source else None
    if entry:
        adopt(state, entry, on_copied=lambda stages: log_adopted(stages, run_dir, tracking))
    state.run("source/classes", lambda: label_space(cfg, store))
    classes = label_space(cfg, store)
    if cfg.model.source_checkpoint:
        state.run("source/narrow", lambda: narrowed_source(cfg, store, classes))
    else:
        state.run("source/train", lambda: train_source(cfg, store, tracking.logger))
    source = source_checkpoint(cfg, store)

    prior = source_share(json.loads(run_dir.label_space.read_text())["pixels"], classes), classes

    def evaluation(checkpoint: str, folder: ModelDir, step: int, prefix: str = "target_val",
                   scores: Path | None = None) -> None:
        """Evaluate on target val; with `scores`, the same pass scores the target-train images there."""
        block = evaluate_into(cfg, checkpoint, folder, prior, scores)
        tracking.metrics(evaluation_metrics(block, prefix), step=step)
        tracking.artifact(folder.overlay, folder.name)

    def on_target_statistics(model: str, folder: ModelDir, stage: str, by_the_fit: bool = False) -> str:
        """With lse.target_bn: the model with BatchNorm statistics of the target train images. A
        round's retraining wrote them after its last step (`by_the_fit`): no pass of their own."""
        def estimate() -> None:
            if not (by_the_fit and (folder.checkpoint / MODEL).is_file()):
                target_batchnorm(cfg, model, folder.checkpoint)
        state.run(stage, estimate)
        return store.shared(folder.checkpoint)

    def target_scores(model: str, folder: ModelDir, stage: str) -> None:
        """FOLDER/target_scores.parquet: the model's scores of the target-train images. Its evaluation
        wrote them in the same pass (unless the run began with an earlier sisray): no pass of its own."""
        def score() -> None:
            if not folder.target_scores.is_file():
                score_pass(cfg, model, folder.target_scores)
        state.run(stage, score)

    def judged(where: str, kind: str, candidate: tuple[str, ModelDir, str, Path], incumbent_scores: Path,
               incumbent: tuple[str, Path]) -> bool:
        """With lse.safeguard: judge the candidate model against the incumbent on the target-train
        images (RUN/<where>/safeguard.json), by their validators (both evaluations computed them: the
        consistency rule) or their scores (the candidate's scored here if its evaluation did not: the
        prior rule); whether it is accepted."""
        model, scored, name, evaluated = candidate
        if cfg.lse.safeguard_rule == "prior":
            target_scores(model, scored, f"{where}/{kind}")
        verdict = run_dir.path / where / SAFEGUARD
        state.run(f"{where}/safeguard", lambda: judge_candidate(
            cfg, where, (scored.target_scores, evaluated), (incumbent_scores, incumbent[1]), run_dir.label_space,
            classes, verdict, name, incumbent[0]))
        return read_verdict(verdict).accepted

    # a model's evaluation also scores the target-train images when it may teach the next round or the
    # safeguard's prior rule reads its scores: one pass where there were two. The consistency rule reads
    # the evaluations' validators; a source model it keeps (target BN rejected) is scored by round 1.
    scored_for_safeguard = cfg.lse.safeguard and cfg.lse.safeguard_rule == "prior"
    source_teaches = not cfg.lse.target_bn or scored_for_safeguard
    state.run("source/eval", lambda: evaluation(
        source, run_dir.source, 0, SOURCE_EVALUATIONS["source/eval"],
        scores=run_dir.source.target_scores if source_teaches else None))
    # the model the next round learns from: (checkpoint, folder of its scores, name, its evaluation)
    teacher = (source, run_dir.source, "the source model", run_dir.source.eval)
    use_target_bn = cfg.lse.target_bn
    if cfg.lse.target_bn:
        adapted = on_target_statistics(source, run_dir.source.target_bn, "source/target_bn")
        state.run("source/target_bn_eval", lambda: evaluation(
            adapted, run_dir.source.target_bn, 0, SOURCE_EVALUATIONS["source/target_bn_eval"],
            run_dir.source.target_bn.target_scores))
        candidate = (adapted, run_dir.source.target_bn, "the source model with target BatchNorm statistics",
                     run_dir.source.target_bn.eval)
        if cfg.lse.safeguard:
            if cfg.lse.safeguard_rule == "prior":
                target_scores(source, run_dir.source, "source/target_scores")
            use_target_bn = judged("source", "target_bn_scores", candidate, run_dir.source.target_scores,
                                   ("the source model", run_dir.source.eval))
        teacher = candidate if use_target_bn else teacher
    if entry:
        publish(state, SOURCE_STAGES, entry)
    skip = unlabelled(classes)
    portions = schedule(cfg.lse)
    for r, p in enumerate(portions, start=1):
        folder = run_dir.round(r)
        previous, teacher_folder, teacher_name, teacher_eval = teacher

        def score() -> None:  # the teacher's evaluation scored the images already: no second pass
            if not teacher_folder.target_scores.is_file():
                score_pass(cfg, previous, folder.scores)
                return
            folder.path.mkdir(exist_ok=True)
            shutil.copyfile(teacher_folder.target_scores, folder.scores)
        state.run(f"{folder.name}/score", score)
        state.run(f"{folder.name}/select",
                  lambda: select_and_threshold(cfg, read_scores(folder.scores), p, folder, skip))
        state.run(f"{folder.name}/patches",
                  lambda: patch_pass(cfg, previous, *read_selection(folder), r, folder.patches,
                                     folder.pseudo_label_figure))

        def pseudo_labels() -> None:  # the round's pseudo-label report, before retraining
            selected, tau = read_selection(folder)
            atomic_write_json(folder.pseudo_labels, report(read_scores(folder.scores), selected, folder.patches, tau))
            for artifact in (folder.thresholds, folder.pseudo_labels, folder.pseudo_label_figure):
                if artifact.is_file():
                    tracking.artifact(artifact, folder.name)
        state.run(f"{folder.name}/report", pseudo_labels)
        state.run(f"{folder.name}/train", lambda: train_round(cfg, store, r, previous, tracking.logger, use_target_bn))
        trained, trained_folder = store.shared(folder.checkpoint), folder
        if use_target_bn:
            trained = on_target_statistics(trained, folder.target_bn, f"{folder.name}/target_bn", by_the_fit=True)
            trained_folder = folder.target_bn
        teaches = r < len(portions) or scored_for_safeguard
        state.run(f"{folder.name}/eval", lambda: evaluation(
            trained, folder, r, scores=trained_folder.target_scores if teaches else None))
        candidate = (trained, trained_folder, f"round {r}'s model", folder.eval)
        if not cfg.lse.safeguard or judged(folder.name, "target_scores", candidate, folder.scores,
                                           (teacher_name, teacher_eval)):
            teacher = candidate
        # once per round (a resumed job does not log it twice), with the eval stage's time known
        state.run(f"{folder.name}/log",
                  lambda: tracking.metrics(round_metrics(round_block(run_dir, state, r, p)), step=r))
        write_summary(cfg, run_dir, state)
        if on_round:
            on_round(round_block(run_dir, state, r, p))
    block = write_summary(cfg, run_dir, state)  # the job pushes it with the run (job.Job.started)
    tracking.artifact(run_dir.summary)
    return block


def log_adopted(stages: list[str], run_dir: RunDir, tracking: Tracking) -> None:
    """Log the source model's evaluations a run adopted (sisray/stage_cache.py) as its own are (step 0)."""
    folders = {"source/eval": run_dir.source, "source/target_bn_eval": run_dir.source.target_bn}
    for stage in stages:
        if stage in SOURCE_EVALUATIONS:
            tracking.metrics(evaluation_metrics(_read(folders[stage].eval), SOURCE_EVALUATIONS[stage]), step=0)
            tracking.artifact(folders[stage].overlay, folders[stage].name)


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def evaluation_block(path: Path) -> dict:
    return {k: v for k, v in _read(path).items() if k in EVAL_KEYS}


ROUND_STAGES = ("score", "select", "patches", "report", "train", "target_bn", "eval", "target_scores", "safeguard")


def round_block(run_dir: RunDir, state: RunState, r: int, p: float) -> dict:
    """A finished round in summary.json: p, selection, patches, thresholds, evaluation, timings."""
    folder = run_dir.round(r)
    report = _read(folder.pseudo_labels)
    thresholds = _read(folder.thresholds)
    block = {"round": r, "p": p, "selected_images": report["selected_images"], "patches": report["patches"],
             "images_scored": report["images_scored"], "images_skipped": report["images_skipped"],
             "thresholds": thresholds["tau"], "threshold_estimator": thresholds["estimator"],
             "pseudo_label_coverage": 1.0 - report["ignored_share"], "coverage": report["coverage"],
             "evaluation": evaluation_block(folder.eval),
             "timings_s": {s: state.seconds(f"{folder.name}/{s}") for s in ROUND_STAGES},
             "ray_passes": sum(state.passes(f"{folder.name}/{s}") for s in ROUND_STAGES)}
    if "pseudo_label_accuracy" in report:
        block["pseudo_label_accuracy"] = report["pseudo_label_accuracy"]  # diagnostic: target labels
    if folder.safeguard.is_file():
        block["safeguard"] = _read(folder.safeguard)
    return block


def final_evaluation(cfg: Config, run_dir: RunDir, rounds: list[dict]) -> dict:
    """The evaluation of the run's final model: the last round's, or with lse.safeguard the last
    model it accepted (the source model, with target BatchNorm statistics if those were accepted)."""
    if not cfg.lse.safeguard:
        return rounds[-1]["evaluation"]
    accepted = [b for b in rounds if b["safeguard"]["accepted"]]
    if accepted:
        return accepted[-1]["evaluation"]
    target_bn = cfg.lse.target_bn and _read(run_dir.source.safeguard)["accepted"]
    return evaluation_block(run_dir.source.target_bn.eval if target_bn else run_dir.source.eval)


def round_metrics(block: dict) -> dict[str, float]:
    """One round as flat MLflow metrics (logged at step = round; the source model is step 0)."""
    taus = [v for v in block["thresholds"].values() if v is not None]
    metrics = {"round/p": block["p"], "round/selected_images": block["selected_images"],
               "round/patches": block["patches"], "round/mean_threshold": float(np.mean(taus)),
               "round/pseudo_label_coverage": block["pseudo_label_coverage"], "round/ray_passes": block["ray_passes"]}
    metrics.update({f"round/time_s/{k}": v for k, v in block["timings_s"].items() if v is not None})
    if "pseudo_label_accuracy" in block:
        metrics["round/pseudo_label_accuracy"] = block["pseudo_label_accuracy"]["overall"]
    return metrics


def write_summary(cfg: Config, run_dir: RunDir, state: RunState) -> dict:
    """RUN/summary.json from the finished stages: source_only, rounds, the safeguard's verdicts, final
    (the last round's model, or the last model the safeguard accepted)."""
    rounds = [round_block(run_dir, state, r, p) for r, p in enumerate(schedule(cfg.lse), start=1)
              if state.finished(f"{run_dir.round(r).name}/{'safeguard' if cfg.lse.safeguard else 'eval'}")]
    block = {"source_only": evaluation_block(run_dir.source.eval) if state.finished("source/eval") else None,
             "source_target_bn": evaluation_block(run_dir.source.target_bn.eval)
             if state.finished("source/target_bn_eval") else None,
             "rounds": rounds,
             "safeguard": [_read(f) for f in (run_dir.source.safeguard, *(run_dir.round(b["round"]).safeguard
                                                                       for b in rounds)) if f.is_file()],
             "final": final_evaluation(cfg, run_dir, rounds) if len(rounds) == len(schedule(cfg.lse)) else None,
             "complete": len(rounds) == len(schedule(cfg.lse)),
             "timings_s": dict(state.data["finished"]),
             "ray_passes": {stage: state.passes(stage) for stage in state.data["finished"]},
             "wall_s": round(sum(state.data["finished"].values()), 2)}
    if state.data.get("adopted"):  # stages another run finished (a sweep's shared source stages)
        block["adopted_from"] = dict(state.data["adopted"])
    atomic_write_json(run_dir.summary, block)
    return block


def stage_shares(summary: dict) -> dict[str, float]:
    """The share of the wall time spent in each kind of stage (source training, scoring, ...)."""
    totals: dict[str, float] = {}
    for stage, seconds in summary["timings_s"].items():
        where, kind = stage.split("/")
        if kind == "log":
            continue
        name = f"source {kind}" if where == "source" else kind
        totals[name] = totals.get(name, 0.0) + seconds
    wall = max(sum(totals.values()), 1e-9)
    return {k: v / wall for k, v in totals.items()}
