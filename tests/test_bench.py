"""Every benchmark runs here in a tiny mode, so that a bench that breaks fails the tests. Their
speed figures are read by people, not asserted: these tests check that each bench measures what it
says (sizes, counts, the same work on both sides). bench/selection.py is the exception: its --tiny
(three adaptation jobs, about 3 minutes) stays out of the suite's budget; its scoring is tested here.
bench/sweep.py runs jobs/tune.py and reads the sweep directory: that reading is tested on the smoke
sweep's (tests/test_sweep.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _last_json(script: str, *args: str, timeout: int = 600) -> dict:
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_sweep_bench_names_a_directory_that_holds_no_finished_sweep(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "sweep.py"), "--report", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and f"{tmp_path / 'sweep_summary.json'} not found" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_masking_bench_compares_like_with_like():
    figures = _last_json("masking.py", "--tiny")
    assert figures["labels_agree"] == 1.0  # both sides compute the same labels
    assert figures["sisray_s"] > figures["floor_s"] > 0 and figures["threads"] == 2


@pytest.mark.ray  # in the processes it starts
@pytest.mark.timeout(600, method="thread")
def test_the_scoring_bench_times_whole_runs_of_every_image():
    figures = _last_json("scoring.py", "--tiny")
    assert figures["images"] == [8] and "ray_marginal_images_per_s" not in figures  # one size: whole runs only
    assert figures["ray_whole_s"] > 0 and figures["bare_2x1_whole_s"] > 0 and figures["bare_1x2_whole_s"] > 0
    assert figures["whole_run_ratio_same_layout"] == pytest.approx(
        figures["bare_2x1_whole_s"] / figures["ray_whole_s"], rel=0.05)
    assert figures["bytes_per_selected_image"] > 0
    pass_sizes = _last_json("scoring.py", "--tiny", "--actors", "8")["actors_per_pass"]  # 1 and 2 actors
    assert pass_sizes["images"] == [8]
    assert all(len(pass_sizes[k]) == 1 and pass_sizes[k][0] > 0 for k in ("pass_s_1", "pass_s_2", "cpu_s_1", "cpu_s_2"))


@pytest.mark.ray
@pytest.mark.timeout(600, method="thread")
def test_the_training_bench_runs_the_same_steps_on_every_side():
    figures = _last_json("train_throughput.py", "--tiny")
    assert figures["steps"] == 3 and figures["batch_size"] == 2
    assert min(figures["ray_fit_s"], figures["plain_2x1_s"], figures["plain_1x2_s"]) > 0
    assert figures["steady_ratio_same_layout"] == pytest.approx(
        figures["ray_samples_per_s"] / figures["plain_2x1_samples_per_s"], rel=0.05)


@pytest.mark.ray
@pytest.mark.timeout(600, method="thread")
def test_the_startup_bench_measures_each_floor():
    figures = _last_json("startup.py", "--tiny")
    assert figures["reps"] == 1
    assert figures["import_worker_s"] > figures["import_torch_s"] > 0  # the worker's modules include torch
    assert min(figures["ray_init_s"], figures["actors_s"], figures["fit_to_loop_s"], figures["fit_after_loop_s"]) > 0
    # before the loop + after it = the whole fit, but for the loop itself, which only reports
    assert -0.02 <= figures["fit_s"] - figures["fit_to_loop_s"] - figures["fit_after_loop_s"] < 0.5


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900, method="thread")
def test_the_precision_bench_compares_one_model_at_two_precisions():
    figures = _last_json("precision.py", "--tiny")
    assert figures["images"] == 4 and figures["selected_fp32"] > 0 and figures["selected_bf16"] > 0
    assert 0 <= figures["selection_jaccard"] <= 1 and figures["tau_max_abs_difference"] >= figures["tau_mean_abs_difference"]
    assert 0.9 < figures["pixel_agreement"] < 1  # the same model: bf16 rounding moves a few pixels, not most


@pytest.mark.slow
@pytest.mark.ray  # in the job it starts
@pytest.mark.timeout(600, method="thread")
def test_the_growth_bench_runs_a_whole_round():
    figures = _last_json("growth.py", "--tiny")
    assert figures["n"] == [4] and "growth_2n" not in figures  # one size: no growth to measure
    assert figures["selected"] == [2]  # global selection of half the images
    assert figures["patches"] == [2 * s for s in figures["selected"]]
    # the round: patches, fit, evaluation; the source model's evaluation scores for the round
    assert figures["passes_per_round"] == 3 and figures["source_passes"] == 1
    assert all(w > sum(stages) > 0 for w, stages in zip(figures["wall_s"], zip(*figures["stage_s"].values())))


def test_the_growth_bench_fits_its_cost_model_to_the_wall_times():
    """On the figures of bench/README.md: the ratios to N and the line through the three sizes."""
    growth = _bench_module("growth")
    # (the README's figures came from the unrounded wall times)
    assert growth.cost_model([300, 600, 1200], [117.8, 161.8, 253.9]) == pytest.approx(
        {"growth_2n": 1.374, "growth_4n": 2.156, "per_image_s": 0.1516, "fixed_s": 71.7}, abs=2e-3)
    assert growth.cost_model([10, 20], [30.0, 50.0]) == {"growth_2n": 1.667, "per_image_s": 2.0, "fixed_s": 10.0}


def _bench_module(name: str):
    import importlib.util

    sys.path.insert(0, str(REPO / "bench"))  # the benches import their common module
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.ray
def test_the_ablation_reports_what_its_runs_measured(small_ablation, fcn_checkpoint):
    """On the tests' small job, the default variant of one seed (its run is shared with the s3 fault
    test; the other variants' settings are checked below without running them)."""
    out, figures = small_ablation
    run = json.loads((out / "seed_0" / "lse_fl" / "summary.json").read_text())
    assert figures["seeds"] == [0] and set(figures["variants"]) == {"source_only", "lse_fl"}  # no target BN here
    assert figures["variants"]["lse_fl"]["miou"] == [100 * run["final"]["miou"]]
    assert figures["variants"]["source_only"]["miou"] == [100 * run["source_only"]["miou"]]
    assert figures["variants"]["lse_fl"]["pseudo_label_accuracy_per_round"] == [
        round(100 * r["pseudo_label_accuracy"]["overall"], 1) for r in run["rounds"]]
    assert math.isnan(figures["variants"]["lse_fl"]["miou_mean_std"][1])  # one seed: no spread
    verdict = figures["verdicts"]["lse_fl > source_only"]
    assert verdict["difference"] == pytest.approx(100 * (run["final"]["miou"] - run["source_only"]["miou"]), abs=0.01)
    assert not verdict["beats"]  # one seed never shows anything
    from sisray.config import load_config

    # the source model given by --set is what every variant adapts; no seed's source model is trained
    assert load_config(out / "seed_0" / "lse_fl" / "config.yaml").model.source_checkpoint == str(fcn_checkpoint)
    assert not (out / "seed_0" / "source").exists()


def test_every_ablation_variant_is_a_valid_config_that_changes_the_default():
    from sisray.config import load_config

    ablation = _bench_module("ablation")
    default = load_config(REPO / "configs" / "synthetic.yaml")
    for name, overrides in {**ablation.ADAPTED, **ablation.SOURCE_TRAINED}.items():
        variant = load_config(REPO / "configs" / "synthetic.yaml", overrides)  # a renamed key fails here
        assert (variant == default) == (name == ablation.DEFAULT), name


def test_the_suite_adapts_every_domain_from_one_source_model_per_seed(tmp_path, monkeypatch):
    """bench/ablation.py --suite, its jobs stood in for: which job runs where, on which domain's data,
    from which source model (the seed's and a source-trained variant's, both trained on the first
    domain only); and each domain's figures come from its own runs."""
    from sisray.config import load_config, save_config
    from sisray.datasets.synthetic import SUITE

    ablation = _bench_module("ablation")
    calls = []

    def stand_in(script, run_dir, overrides):  # writes what a finished job leaves behind
        calls.append((script, run_dir, overrides))
        run_dir.mkdir(parents=True)
        save_config(load_config(REPO / "configs" / "synthetic.yaml", overrides), run_dir / "config.yaml")
        domain, seed = run_dir.parts[-3], int(run_dir.parts[-2].split("_")[1])
        score = list(SUITE).index(domain) + seed / 10 + (0.5 if run_dir.name != "lse_fl" else 0)  # particular to the run

        def block(miou):
            return {"miou": miou, "miou19": miou, "per_class": {"road": miou}}
        if script == "train_source.py":
            (run_dir / "source").mkdir()
            (run_dir / "source" / "eval.json").write_text(json.dumps(block(score / 100)))
            return
        (run_dir / "summary.json").write_text(json.dumps({
            "source_only": block(score / 100), "source_target_bn": block((score + 0.2) / 100),
            "final": block((score + 1) / 100), "rounds": [{"pseudo_label_accuracy": {"overall": 0.9}}]}))
    monkeypatch.setattr(ablation, "job", stand_in)

    variants = ["lse_fl", "source_high_lr", "lse_fl_high_lr"]
    results = ablation.run_suite(tmp_path / "suite", [0, 1], tmp_path / "out", variants, [], oracle=False)
    assert list(results) == list(SUITE) and all(list(r) == [0, 1] for r in results.values())
    adapted = [c for c in calls if c[1].name == "lse_fl"]
    assert [c[1].relative_to(tmp_path / "out").parts[:2] for c in adapted] == [
        (d, f"seed_{s}") for s in (0, 1) for d in SUITE]  # every domain of a seed, then the next seed
    trained = [c[1].relative_to(tmp_path / "out").parts for c in calls if c[0] == "train_source.py"]
    assert trained == [("day", f"seed_{s}", name) for s in (0, 1) for name in ("source", "source_high_lr")]
    for script, run_dir, overrides in calls:
        domain, seed = run_dir.parts[-3], run_dir.parts[-2]
        assert f"data.target.root={tmp_path / 'suite' / domain}" in overrides
        assert f"data.source.root={tmp_path / 'suite' / domain}" in overrides
        given = [o for o in overrides if o.startswith("model.source_checkpoint=")]
        day = (tmp_path / "out" / "day" / seed).resolve()
        if script == "train_source.py":
            assert given == ["model.source_checkpoint=null"]  # trains a source model (the seed's, or a variant's)
        elif run_dir.name == "lse_fl_high_lr":  # the day domain's model of the variant, in every domain
            assert given == [f"model.source_checkpoint={day / 'source_high_lr' / 'source' / 'checkpoint' / 'model.pt'}"]
        else:  # the day domain's source model of the same seed, in every domain
            assert given == [f"model.source_checkpoint={day / 'source' / 'source' / 'checkpoint' / 'model.pt'}"]
    figures = ablation.summarise(results["fog"], [0, 1], variants)["variants"]
    assert figures["source_only"]["miou"] == pytest.approx([2.0, 2.1])
    assert figures["lse_fl"]["miou"] == pytest.approx([3.0, 3.1])
    # the shared source model's figures on fog come from fog's adapted run, not from day's source run
    assert figures["source_high_lr"]["miou"] == pytest.approx([2.5, 2.6])
    assert figures["source_high_lr_target_bn"]["miou"] == pytest.approx([2.7, 2.8])
    assert figures["lse_fl_high_lr"]["miou"] == pytest.approx([3.5, 3.6])


def test_a_finished_run_is_known_whether_its_paths_were_given_relative_or_absolute(tmp_path, monkeypatch):
    """Re-running the ablation with --out given another way must not run finished jobs again."""
    from sisray.config import load_config, save_config

    ablation = _bench_module("ablation")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "out" / "dusk" / "seed_0" / "lse_fl"
    run.mkdir(parents=True)
    relative = ["model.source_checkpoint=out/day/seed_0/lse_fl/source/checkpoint"]
    save_config(load_config(REPO / "configs" / "synthetic.yaml", relative), run / "config.yaml")
    (run / "summary.json").write_text(json.dumps({"complete": True}))
    absolute = [f"model.source_checkpoint={tmp_path / 'out' / 'day' / 'seed_0' / 'lse_fl' / 'source' / 'checkpoint'}"]
    assert ablation.finished("adapt.py", run, relative) and ablation.finished("adapt.py", run, absolute)
    assert not ablation.finished("adapt.py", run, [*absolute, "lse.p0=0.3"])


def test_the_safeguard_record_says_which_verdicts_target_labels_bear_out():
    def ev(miou):
        return {"miou": miou}
    summary = {"source_only": ev(0.30), "source_target_bn": ev(0.25),
               "rounds": [{"round": 1, "evaluation": ev(0.35)}, {"round": 2, "evaluation": ev(0.33)}],
               "safeguard": [{"decision": "source", "accepted": True}, {"decision": "round_01", "accepted": True},
                             {"decision": "round_02", "accepted": True}]}
    record = _bench_module("ablation").safeguard_record(summary)
    # BN accepted though worse (wrong); round 1 (0.35 against the BN model's 0.25) right; round 2 (0.33
    # against round 1's 0.35) accepted: wrong
    assert [(r["right"], r["gain"]) for r in record] == [(False, -5.0), (True, 10.0), (False, -2.0)]
    summary["safeguard"][0]["accepted"] = False  # BN rejected: round 1 is compared with the source model
    record = _bench_module("ablation").safeguard_record(summary)
    assert [(r["right"], r["gain"]) for r in record] == [(True, -5.0), (True, 5.0), (False, -2.0)]



def test_decisions_count_each_rule_right_when_it_keeps_what_helped_and_rejects_what_hurt():
    decisions = _bench_module("decisions")
    base = {"mean_entropy": 0.2, "information": 0.4, "bnm": 0.5, "snd": 0.7, "flip_agreement": 0.93,
            "scale_agreement": 0.8, "prior_distance": 0.3, "mix_accuracy": 0.90}
    less_consistent = {**base, "mean_entropy": 0.1, "flip_agreement": 0.91, "mix_accuracy": 0.87, "prior_distance": 0.5}
    more_consistent = {**base, "flip_agreement": 0.94, "mix_accuracy": 0.89}
    # less consistent, but spread over the classes: class entropy 0.6 -> 0.85 (a collapse undone, as on dusk)
    spread = {**less_consistent, "information": 0.75}
    harmful = {"incumbent_miou": 57.8, "candidate_miou": 50.4,
               "verdicts": decisions.verdicts(base, less_consistent, tolerance=0.15, spread=0.1)}
    helpful = {"incumbent_miou": 50.4, "candidate_miou": 56.5,
               "verdicts": decisions.verdicts(base, more_consistent, tolerance=0.15, spread=0.1)}
    uncollapsed = {"incumbent_miou": 7.6, "candidate_miou": 31.3,
                   "verdicts": decisions.verdicts(base, spread, tolerance=0.15, spread=0.1)}
    assert harmful["verdicts"]["mean_entropy"] and not harmful["verdicts"]["consistency"]  # lower entropy, yet worse
    assert uncollapsed["verdicts"]["consistency"] and not uncollapsed["verdicts"]["probes"]
    # prior: 0.3 -> 0.5 squashed is 0.43 -> 1.0 raw, beyond the tolerance
    assert not harmful["verdicts"]["prior"] and helpful["verdicts"]["prior"]
    rules = decisions.tally([harmful, helpful, uncollapsed])
    assert rules["accept"] == {"right": 2, "decisions": 3, "hurt": 1, "hurt_rejected": 0, "helped_rejected": 0}
    assert rules["consistency"] == {"right": 3, "decisions": 3, "hurt": 1, "hurt_rejected": 1, "helped_rejected": 0}
    assert rules["probes"] == {"right": 2, "decisions": 3, "hurt": 1, "hurt_rejected": 1, "helped_rejected": 1}
    assert rules["mean_entropy"]["right"] == 2 and rules["flip_agreement"]["right"] == 2


@pytest.mark.ray
@pytest.mark.timeout(600, method="thread")
def test_the_decisions_bench_judges_every_change_of_a_finished_run(small_ablation, tmp_path):
    """The small job's run (no target BN: its two rounds are the changes), copied so that the
    validators' cache stays out of the shared run."""
    import shutil

    out, _ = small_ablation
    shutil.copytree(out / "seed_0" / "lse_fl", tmp_path / "seed_0" / "lse_fl")
    figures = _last_json("decisions.py", "--runs", str(tmp_path), "--images", "3")
    run = json.loads((tmp_path / "seed_0" / "lse_fl" / "summary.json").read_text())
    mious = [100 * run["source_only"]["miou"], *(100 * r["evaluation"]["miou"] for r in run["rounds"])]
    assert [d["decision"] for d in figures["decisions"]] == ["round_01", "round_02"]
    assert [(d["incumbent_miou"], d["candidate_miou"]) for d in figures["decisions"]] == [
        (round(a, 2), round(b, 2)) for a, b in zip(mious, mious[1:])]
    first, second = figures["decisions"]
    assert second["validators"]["incumbent"] == first["validators"]["candidate"]  # round 1's model, computed once
    assert len(json.loads((tmp_path / "seed_0" / "lse_fl" / "validators_3.json").read_text())) == 3
    helped = sum(d["candidate_miou"] >= d["incumbent_miou"] for d in figures["decisions"])
    assert figures["rules"]["accept"] == {"right": helped, "decisions": 2, "hurt": 2 - helped, "hurt_rejected": 0,
                                          "helped_rejected": 0}


def test_selection_scores_rank_correlation_and_regret_per_validator():
    selection = _bench_module("selection")
    names = list(selection.RANKED)
    assert "val_information" in names  # the sweep's default objective, ranked beside the validators
    trials = {}
    for k, miou in enumerate([0.30, 0.40, 0.35, 0.20]):
        validators = {name: float(k) for name in names}
        validators["bnm"] = miou  # tracks mIoU exactly
        validators["mean_entropy"] = miou  # lower is better: ranks them upside down
        validators["snd"] = float("nan")  # not computed: left out
        trials[f"t{k}"] = {"miou": miou, "validators": validators}
    figures = selection.scores(trials)
    assert figures["bnm"] == {"spearman": pytest.approx(1.0), "regret": 0.0}
    assert figures["mean_entropy"]["spearman"] == pytest.approx(-1.0) and figures["mean_entropy"]["regret"] == 20.0
    assert figures["information"]["regret"] == 20.0  # picks t3 (the highest value), mIoU 20 against the best 40
    assert figures["snd"] == {"spearman": None, "regret": None}
    assert selection.averaged([figures, figures])["bnm"] == {"spearman": 1.0, "regret": 0.0}
    assert len(selection.TRIALS) >= 12


def test_the_oracle_trains_as_many_steps_as_the_source_model_and_the_bar_is_reported(small_benchmark):
    """The oracle's epochs over the 4 target-train images match the default source model's steps over
    the 90% of the 6 source images it trains on; the issue's bar (the rounds over the better of the
    source model with and without target BN, and the share of the gap to the oracle) is computed from
    the seeds' figures."""
    ablation = _bench_module("ablation")
    roots = [f"data.source.root={small_benchmark}", f"data.target.root={small_benchmark}"]
    assert ablation.oracle_epochs(roots) == pytest.approx(15 * 0.9 * 6 / 4)
    assert ablation.oracle_epochs([*roots, *ablation.SOURCE_TRAINED["source_short"]]) == pytest.approx(2.5 * 6 / 4)

    def block(miou: float) -> dict:
        return {"evaluation": {"miou": miou / 100, "miou19": miou / 100, "per_class": {"road": miou / 100}}}

    figures = {"source_only": 32, "source_target_bn": 42, "lse_fl": 47, "source_short": 30,
               "source_short_target_bn": 36, "lse_fl_short": 40, "oracle": 62}
    per_seed = {s: {n: block(v + s) for n, v in figures.items()} for s in (0, 1)}
    verdicts = ablation.summarise(per_seed, [0, 1], ["lse_fl", "source_short", "lse_fl_short"])["verdicts"]
    bar = verdicts["lse_fl over source_target_bn"]
    assert bar["difference"] == pytest.approx(5.0) and bar["gap_closed"] == pytest.approx(0.25)
    assert verdicts["lse_fl_short over source_target_bn"]["difference"] == pytest.approx(-2.0)
