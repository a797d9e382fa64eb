"""The pseudo-labelling stage gives the same records, selection, thresholds and patches whatever the
number of actors and the batch size."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from sisray.config import load_config
from sisray.patch_set import PatchDataset, count_rows, read_rows, report
from sisray.png import png_array
from sisray.rundir import RoundDir
from sisray.stages import score
from sisray.datasets import open_target
from sisray.stages.actors import ModelActor
from sisray.stages.patch_pass import Patcher, patch_pass
from sisray.stages.evaluate import evaluate, json_ready
from sisray.stages.score import Scorer, read_histograms, read_scores, score_pass
from sisray.stages.select import select_and_threshold
from sisray.validators import HIGHER_IS_BETTER

pytestmark = pytest.mark.ray


def _config(root, *extra):
    return load_config(None, [
        "data.target.name=synthetic", f"data.target.root={root}", "data.target.size=[64, 32]",
        "model.init=random", "model.width=0.0625", "lse.patches_per_image=2", "lse.threshold.bins=16",
        "lse.selection=global",  # 4 images: the class-wise floor(N_c p / 19) would select none
        "tracking.enabled=false", *extra])


@pytest.fixture
def checkpoint(fcn_checkpoint):
    return fcn_checkpoint


def test_same_results_with_one_or_two_actors_and_any_batch_size(ray_session, small_benchmark, checkpoint, tmp_path):
    outcomes = []
    for actors, batch in ((1, 1), (2, 3)):
        cfg = _config(small_benchmark, f"resources.num_actors={actors}", f"resources.actor_batch_size={batch}")
        folder = tmp_path / f"a{actors}b{batch}"
        tables = score_pass(cfg, checkpoint, folder / "scores.parquet")
        selected, tau = select_and_threshold(cfg, tables, 0.5, RoundDir(folder))
        count = patch_pass(cfg, checkpoint, selected, tau, 1, folder / "patches", folder / "figure.png")
        outcomes.append((folder, tables, selected, tau, count))
    (fa, ta, sa, taua, ca), (fb, tb, sb, taub, cb) = outcomes
    for key in ("counts", "scores", "mean_entropy"):
        assert np.array_equal(ta[key], tb[key]), key
    assert list(ta["sample_id"]) == list(tb["sample_id"])
    assert ta["counts"].sum(axis=1).tolist() == [64 * 32] * 4
    assert sa == sb and np.array_equal(taua, taub) and ca == cb
    assert json.loads((fa / "thresholds.json").read_text()) == json.loads((fb / "thresholds.json").read_text())
    assert ca == 2 * len(sa) > 0
    rows_a, rows_b = read_rows(fa / "patches"), read_rows(fb / "patches")
    assert count_rows(fa / "patches") == len(rows_a) == ca
    assert [(r["index"], r["top"], r["left"], r["label_png"]) for r in rows_a] == \
        [(r["index"], r["top"], r["left"], r["label_png"]) for r in rows_b]

    figure = png_array((fa / "figure.png").read_bytes())  # patch | own prediction | pseudo-label, per image
    assert figure.shape == (32 * min(3, len(sa)), 3 * 64, 3)
    assert np.array_equal(figure, png_array((fb / "figure.png").read_bytes()))
    assert "figure_png" not in pq.read_schema(next((fa / "patches").glob("*.parquet"))).names

    data = PatchDataset(fa / "patches", (64, 32))
    image, label = data[0]
    assert image.shape == (3, 32, 64) and label.shape == (32, 64)
    _check_confidence(cfg, checkpoint, rows_a, PatchDataset(fa / "patches", (64, 32), confidence=True))
    assert set(np.unique(label.numpy())) <= set(range(19)) | {255}
    block = report(ta, sa, fa / "patches", taua)
    assert block["patches"] == ca and block["images_scored"] == 4 and block["images_skipped"] == 0
    assert abs(sum(block["coverage"].values()) + block["ignored_share"] - 1) < 1e-9
    pixels = [np.bincount(png_array(r["label_png"]).ravel(), minlength=256) for r in rows_a]
    assert [r["class_pixels"] for r in rows_a] == [p[:19].tolist() for p in pixels]
    assert [r["ignored_pixels"] for r in rows_a] == [int(p[255]) for p in pixels]

    # The benchmark has train labels: pseudo-label accuracy is reported (a diagnostic only).
    truth = np.sum([r["truth_pixels"] for r in rows_a], axis=0)
    correct = np.sum([r["correct_pixels"] for r in rows_a], axis=0)
    assert (correct <= truth).all() and (truth <= np.sum([r["class_pixels"] for r in rows_a], axis=0)).all()
    assert truth.sum() > 0
    accuracy = block["pseudo_label_accuracy"]
    assert accuracy["overall"] == pytest.approx(correct.sum() / truth.sum())
    assert all((v is None) == (truth[c] == 0) for c, v in enumerate(accuracy["per_class"].values()))


def _check_confidence(cfg, checkpoint, rows, data) -> None:
    """Each patch's confidence map is the model's largest class probability on the working-size
    image, resampled with the box: at the box's corners it is the probability there (to 1/255)."""
    import torch

    from sisray.datasets import open_target
    from sisray.models import build_model
    from sisray.models.inference import predict_probs

    model = build_model(cfg.model.name, 19, cfg.model.width, str(checkpoint)).eval()
    target = open_target(cfg.data.target, "train", with_labels=False)
    for k, row in enumerate(rows):
        top = predict_probs(model, target.load_image(row["index"])[None])[0].max(0).values
        t, left, h, w = round(row["top"] * 32), round(row["left"] * 64), round(row["height"] * 32), round(row["width"] * 64)
        image, label, weights = data[k]
        assert weights.shape == label.shape and weights.dtype == torch.float32
        for (y, x), (sy, sx) in (((0, 0), (t, left)), ((-1, -1), (t + h - 1, left + w - 1))):
            assert abs(weights[y, x].item() - top[sy, sx].item()) <= 0.6 / 255 + 1e-6, (k, y, x)


def test_zoom_out_and_entropy_gap_options(ray_session, small_benchmark, checkpoint, tmp_path):
    cfg = _config(small_benchmark, "resources.num_actors=1", "lse.zoom_out=true")
    tables = score_pass(cfg, checkpoint, RoundDir(tmp_path).scores)
    selected, tau = select_and_threshold(cfg, tables, 0.5, RoundDir(tmp_path))
    assert patch_pass(cfg, checkpoint, selected, tau, 1, tmp_path / "both") == 4 * len(selected)
    rows = read_rows(tmp_path / "both")
    assert [r["zoom_out"] for r in rows if r["index"] == selected[0]] == [False, False, True, True]
    # A gap no prediction can reach keeps nothing: an empty but complete patch set.
    strict = _config(small_benchmark, "resources.num_actors=1", "lse.entropy_gap=100")
    assert patch_pass(strict, checkpoint, selected, tau, 1, tmp_path / "none") == 0
    assert (tmp_path / "none").is_dir() and report(tables, selected, tmp_path / "none", tau)["patches"] == 0


def test_a_corrupt_target_image_fails_the_stage_naming_it_and_writes_nothing(ray_session, tmp_path, checkpoint):
    from sisray.datasets.synthetic import SyntheticSpec, generate
    from sisray.errors import DatasetError

    root = tmp_path / "bench"
    generate(root, SyntheticSpec(n_source=1, n_target_train=3, n_target_val=1), processes=1)
    image = sorted((root / "target" / "leftImg8bit" / "train").rglob("*.png"))[1]
    data = bytearray(image.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start:start + 40] = bytes(40)  # header and trailer intact: only decoding finds it
    image.write_bytes(bytes(data))
    out = tmp_path / "run" / "scores.parquet"
    with pytest.raises(DatasetError, match=rf"scoring: {image}: cannot decode image"):
        score_pass(_config(root), checkpoint, out)
    assert not out.exists() and not list(out.parent.glob("*"))

    # With skip_bad_pairs the image is skipped and counted, and never selected.
    cfg = _config(root, "data.target.skip_bad_pairs=true")
    tables = score_pass(cfg, checkpoint, out)
    bad = image.name.removesuffix("_leftImg8bit.png")
    assert list(tables["skipped"]) == [bad] and str(image) in tables["skipped"][bad]
    row = list(tables["sample_id"]).index(bad)
    assert tables["counts"][row].sum() == 0 and (tables["counts"].sum(axis=1) > 0).sum() == 2
    selected, _ = select_and_threshold(cfg, tables, 1.0, RoundDir(out.parent))
    assert row not in selected and len(selected) == 2


def test_an_evaluation_that_also_scores_and_validates_equals_an_evaluation_and_a_scoring_pass_alone(
        ray_session, small_benchmark, checkpoint, tmp_path):
    """One pass over target val, target train and the validation subset, its batches mixing the
    three (3 val, 4 train and 4 validated images in batches of 2): the evaluation block, the overlay
    figure and the scores file are those of the passes each alone; the block adds the validators
    (equal to a validation pass's: tests/test_validation_pass.py)."""
    cfg = _config(small_benchmark, "resources.num_actors=2", "resources.actor_batch_size=2", "validation.images=4")
    alone = evaluate(cfg, checkpoint, figure=tmp_path / "alone.png")
    scored = score_pass(cfg, checkpoint, tmp_path / "alone.parquet")
    prior = (np.full(19, 1 / 19), tuple(range(19)))
    both = evaluate(cfg, checkpoint, figure=tmp_path / "both.png", scores=tmp_path / "both.parquet", prior=prior)
    assert set(both.pop("validators")) == set(HIGHER_IS_BETTER) and "validators" not in alone
    assert json_ready(both) == json_ready(alone) and alone["images"] == 3
    assert (tmp_path / "both.png").read_bytes() == (tmp_path / "alone.png").read_bytes()
    merged = read_scores(tmp_path / "both.parquet")
    for key in ("counts", "scores", "mean_entropy"):
        assert np.array_equal(merged[key], scored[key]), key
    assert list(merged["sample_id"]) == list(scored["sample_id"]) and merged["counts"].sum() == 4 * 64 * 32
    assert np.array_equal(read_histograms(tmp_path / "both.parquet", [0, 1, 2, 3], 16),
                          read_histograms(tmp_path / "alone.parquet", [0, 1, 2, 3], 16))


class DyingScorer(Scorer):
    """Kills its own process on its first batch, once per test (a marker file remembers)."""
    marker = ""  # set by the test; the class travels to the actors by value

    def __call__(self, batch):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().__call__(batch)


def test_a_dying_scoring_actor_is_replaced_without_losing_or_duplicating_records(
        ray_session, small_benchmark, checkpoint, tmp_path, monkeypatch):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules
    marker = tmp_path / "died"
    monkeypatch.setattr(DyingScorer, "marker", str(marker))
    monkeypatch.setattr(score, "Scorer", DyingScorer)
    cfg = _config(small_benchmark, "resources.num_actors=2", "resources.actor_batch_size=1")
    tables = score_pass(cfg, checkpoint, tmp_path / "scores.parquet")
    assert marker.exists()  # an actor did die
    assert tables["counts"].sum(axis=1).tolist() == [64 * 32] * 4
    written = pq.read_table(tmp_path / "scores.parquet").column("index").to_pylist()
    assert sorted(written) == [0, 1, 2, 3]


class IdealPatcher(Patcher):
    """A patch pass whose teacher is right everywhere: its prediction is the one-hot ground truth.
    (Swapped in for Patcher, which then travels by value: its zero-argument super() would not.)"""

    def __init__(self, spec):
        ModelActor.__init__(self, spec)
        self.truth = open_target(self.cfg.data.target, "train", with_labels=True)
        self.truth_index = {s.id: k for k, s in enumerate(self.truth.samples)}

    def teacher_probabilities(self, indices):
        import torch

        images = torch.stack([self.dataset.load_image(i) for i in indices])
        truth = torch.stack([self.truth.load_label(i) for i in indices])
        return images, torch.nn.functional.one_hot(truth, 19).permute(0, 3, 1, 2).float()


def test_the_patch_pass_writes_examples_that_show_their_pseudo_labels(ray_session, checkpoint, tmp_path, monkeypatch):
    """The real path: patch pass (Ray Data) -> Parquet -> PatchDataset, on class-coded Cityscapes-layout
    images at twice the working size. With an ideal teacher every rebuilt example shows its
    pseudo-label's class, and the pseudo-label accuracy diagnostic says 100%."""
    from ray import cloudpickle

    from layouts import CITYSCAPES_TO_TRAIN, save_gray_label, save_rgb
    from scenes import agreement, class_coded_scene
    from sisray.stages import patch_pass as module

    to_label_id = np.zeros(256, np.uint8)
    for label_id, train_id in CITYSCAPES_TO_TRAIN.items():
        to_label_id[train_id] = label_id
    for k in range(3):
        label, full, _ = class_coded_scene(k)  # working 32 x 64, files at 64 x 128
        stem = f"aachen_{k:06d}_000019"
        save_rgb(tmp_path / "cs" / "leftImg8bit" / "train" / "aachen" / f"{stem}_leftImg8bit.png",
                 full.permute(1, 2, 0).numpy())
        full_label = label.repeat_interleave(2, 0).repeat_interleave(2, 1).numpy()
        save_gray_label(tmp_path / "cs" / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_labelIds.png",
                        to_label_id[full_label])
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules
    monkeypatch.setattr(module, "Patcher", IdealPatcher)
    cfg = _config(tmp_path / "cs", "data.target.name=cityscapes", "resources.num_actors=1")
    count = patch_pass(cfg, checkpoint, [0, 1, 2], np.full(19, 0.5), 1, tmp_path / "patches", tmp_path / "figure.png")
    assert count == 6
    data = PatchDataset(tmp_path / "patches", (64, 32))
    for k in range(count):
        image, label = data[k]
        assert (label != 255).all() and agreement(image, label) >= 0.97, k
    # the round figure shows (and the entropy-gap option predicts on) the very image training rebuilds
    figure = png_array((tmp_path / "figure.png").read_bytes())
    for k, row in enumerate(r for r in read_rows(tmp_path / "patches") if r["patch"] == 0):
        shown = figure[32 * k: 32 * (k + 1), :64]
        assert np.array_equal(shown, data[2 * k][0].clamp(0, 255).byte().permute(1, 2, 0).numpy()), row["index"]
    block = report({"counts": np.zeros((3, 19))}, [0, 1, 2], tmp_path / "patches", np.full(19, 0.5))
    assert block["pseudo_label_accuracy"]["overall"] == 1.0


def direct_records(probs: np.ndarray, bins: int) -> dict[str, np.ndarray]:
    """One image's records from its softmax (C, H, W), class by class with numpy (no sisray code)."""
    classes = probs.shape[0]
    prediction, confidence = probs.argmax(0), probs.max(0)
    entropy = -(probs * np.log(probs + 1e-12)).sum(0)
    out = {"counts": np.zeros(classes, np.int64), "scores": np.zeros(classes), "mean_entropy": np.zeros(classes),
           "histograms": np.zeros((classes, bins), np.int64)}
    for c in range(classes):
        mine = prediction == c
        if not mine.any():
            continue
        values = entropy[mine]
        span = values.max() - values.min()
        normalised = (values - values.min()) / span if span > 0 else np.zeros_like(values)
        out["counts"][c], out["scores"][c], out["mean_entropy"][c] = mine.sum(), confidence[mine].mean(), normalised.mean()
        out["histograms"][c] = np.bincount(np.minimum((normalised * bins).astype(int), bins - 1), minlength=bins)
    return out


def test_scoring_records_equal_a_direct_computation_on_the_driver(ray_session, small_benchmark, checkpoint, tmp_path):
    import torch

    from sisray.models import build_model

    cfg = _config(small_benchmark, "resources.num_actors=2", "resources.actor_batch_size=3")
    tables = score_pass(cfg, checkpoint, tmp_path / "scores.parquet")
    model = build_model("fcn8s_vgg16", width=0.0625, init=str(checkpoint)).eval()
    dataset = open_target(cfg.data.target, "train", with_labels=False)
    assert list(tables["sample_id"]) == [s.id for s in dataset.samples]
    histograms = pq.read_table(tmp_path / "scores.parquet").sort_by("index").column("histograms").to_pylist()
    for index in range(len(dataset)):
        with torch.no_grad():
            probs = model(dataset.load_image(index)[None].float()).softmax(1)[0].numpy()
        expected = direct_records(probs, cfg.lse.threshold.bins)
        assert np.array_equal(tables["counts"][index], expected["counts"]), index
        assert np.allclose(tables["scores"][index], expected["scores"], atol=1e-5)
        assert np.allclose(tables["mean_entropy"][index], expected["mean_entropy"], atol=1e-4)
        assert np.abs(np.asarray(histograms[index]) - expected["histograms"]).sum() <= 2  # float32 at bin edges
        assert np.asarray(histograms[index]).sum() == 64 * 32
