from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SMALL_SPEC
from sisray.datasets.synthetic import (CLASSES, MANIFEST, SyntheticSource, SyntheticSpec, SyntheticTarget, describe,
                                       generate, render)
from sisray.datasets.synthetic.loaders import _object_heights
from sisray.datasets.synthetic.write import PARTIAL_MARKER
from sisray.errors import DatasetError
from sisray.labels import CITYSCAPES_ID_TO_TRAINID, train_id


def test_render_is_a_pure_function_of_seed_domain_and_index():
    spec = SyntheticSpec(seed=5)
    a_rgb, a_ids = render(spec, "train", 2)
    b_rgb, b_ids = render(spec, "train", 2)
    assert np.array_equal(a_rgb, b_rgb) and np.array_equal(a_ids, b_ids)
    c_rgb, _ = render(SyntheticSpec(seed=6), "train", 2)
    assert not np.array_equal(a_rgb, c_rgb)
    d_rgb, _ = render(spec, "train", 3)
    assert not np.array_equal(a_rgb, d_rgb)


def test_appearance_gap_changes_the_look_not_the_scene():
    plain, plain_ids = render(SyntheticSpec(appearance_gap=0.0), "train", 4)
    photo, photo_ids = render(SyntheticSpec(), "train", 4)
    source, _ = render(SyntheticSpec(), "source", 4)
    assert np.array_equal(plain_ids, photo_ids)  # the same scene and camera: only the look differs

    def roughness(rgb):  # mean absolute difference of horizontal neighbours: texture and noise
        return float(np.abs(np.diff(rgb.astype(np.float32), axis=1)).mean())

    assert roughness(plain) < 0.8 * roughness(photo)
    assert roughness(plain) < 1.25 * roughness(source)


def test_output_does_not_depend_on_the_number_of_processes(tmp_path, small_benchmark):
    generate(tmp_path / "two", SyntheticSpec(**SMALL_SPEC), processes=2)
    files = sorted(p.relative_to(small_benchmark) for p in small_benchmark.rglob("*.png"))
    assert len(files) == 2 * sum(v for k, v in SMALL_SPEC.items() if k.startswith("n_"))
    match, mismatch, errors = filecmp.cmpfiles(small_benchmark, tmp_path / "two", [str(f) for f in files], shallow=False)
    assert not mismatch and not errors


def test_a_job_writes_the_benchmark_where_a_synthetic_root_is_missing_and_only_there(tmp_path, monkeypatch,
                                                                                   fcn_checkpoint):
    """Every job's input check (before any work) generates the built-in benchmark into a synthetic root
    without a manifest: once, whichever domains share the root; never over a written one. The
    generator's default settings are stood in for by the tests' small ones (the job on a generated
    default benchmark: tests/test_adapt.py)."""
    from sisray import inputs
    from sisray.config import load_config
    from sisray.datasets import synthetic

    written = []

    def small(root):
        written.append(Path(root))
        return generate(root, SyntheticSpec(**SMALL_SPEC), processes=1)

    monkeypatch.setattr(synthetic, "generate", small)
    root = tmp_path / "data" / "synthetic"
    cfg = load_config(REPO / "configs" / "synthetic.yaml", [
        f"data.source.root={root}", f"data.target.root={root}", "model.name=fcn8s_vgg16",
        "model.width=0.0625", f"model.source_checkpoint={fcn_checkpoint}", "lse.target_bn=false"])
    inputs.check_inputs(cfg)
    assert written == [root] and (root / MANIFEST).is_file()
    inputs.check_inputs(cfg)
    assert written == [root]


def test_both_layouts_are_read_by_the_real_loaders(small_benchmark):
    source = SyntheticSource(small_benchmark, "train", (96, 54))
    train = SyntheticTarget(small_benchmark, "train", (96, 48))
    val = SyntheticTarget(small_benchmark, "val", (96, 48))
    assert (len(source), len(train), len(val)) == (6, 4, 3)
    assert (small_benchmark / "source" / "images" / "00001.png").is_file()
    assert next((small_benchmark / "target" / "gtFine" / "val").rglob("*_000019_gtFine_labelIds.png"))
    allowed = set(CLASSES) | {255}
    for ds in (source, train, val):
        image, label = ds[0]
        assert image.shape[1:] == label.shape == (ds.size[1], ds.size[0])
        assert set(np.unique(label.numpy())) <= allowed
    assert not bool((source.load_label(0) == 255).any())  # game frames have no ego vehicle
    assert bool((train.load_label(0, native=True)[-1] == 255).any())  # the target's ego-vehicle hood is ignored
    assert train.eval_classes == CLASSES


def test_manifest_and_rerun_is_a_no_op(small_benchmark):
    manifest = json.loads((small_benchmark / MANIFEST).read_text())
    assert manifest["counts"] == {"source": 6, "target_train": 4, "target_val": 3}
    before = {p: p.stat().st_mtime_ns for p in small_benchmark.rglob("*")}
    again = generate(small_benchmark, SyntheticSpec(**SMALL_SPEC))
    assert again == manifest
    assert {p: p.stat().st_mtime_ns for p in small_benchmark.rglob("*")} == before


def test_a_manifest_made_before_looks_existed_is_the_day_look(small_benchmark, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(small_benchmark, old)
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["spec"]["look"], manifest["spec"]["drives"]  # as the generator wrote it before
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert generate(old, SyntheticSpec(**SMALL_SPEC)) == manifest  # the same set: not refused, not redone
    with pytest.raises(DatasetError, match="made with other settings"):
        generate(old, SyntheticSpec(**SMALL_SPEC, look="fog"))


def test_the_suite_looks_change_the_light_weather_or_camera_not_the_source():
    day, day_ids = render(SyntheticSpec(), "train", 4)
    source = render(SyntheticSpec(), "source", 4)
    for look in ("dusk", "fog", "camera"):
        other = SyntheticSpec(look=look)
        assert all(np.array_equal(a, b) for a, b in zip(render(other, "source", 4), source)), look
    dusk, dusk_ids = render(SyntheticSpec(look="dusk"), "train", 4)
    fog, fog_ids = render(SyntheticSpec(look="fog"), "train", 4)
    assert np.array_equal(dusk_ids, day_ids) and np.array_equal(fog_ids, day_ids)  # the same scene and camera
    assert dusk.mean() < 0.5 * day.mean()  # low light
    def blue_to_red(rgb):
        return rgb[..., 2].mean() / rgb[..., 0].mean()
    assert blue_to_red(dusk) > 1.15 * blue_to_red(day)  # a blue cast
    sky = day_ids == 23
    assert fog[sky].std() < 0.5 * day[sky].std() or fog[sky].mean() > day[sky].mean()  # the sky lost in grey
    far = (day_ids == 11)  # building: farther than the road, more veiled
    assert fog[far].std() < day[far].std()  # flat contrast
    camera, camera_ids = render(SyntheticSpec(look="camera"), "train", 4)
    assert not (camera_ids == 1).any() and (day_ids == 1).any()  # no ego hood (label ID 1)

    def person_heights(look: str) -> list[int]:
        return [h for i in range(12) for h in _object_heights(
            CITYSCAPES_ID_TO_TRAINID[render(SyntheticSpec(look=look), "train", i)[1]], train_id("person"))]
    assert np.median(person_heights("camera")) < 0.85 * np.median(person_heights("day"))  # a wider field of view


def test_drives_are_consecutive_frames_of_one_street_and_leave_val_alone():
    spec = SyntheticSpec(n_target_train=8, drives=2)  # frames 0-3 of drive 0, then of drive 1
    labels = [render(spec, "train", i)[1] for i in range(8)]
    same = np.mean(labels[0] == labels[1])
    assert 0.6 < same < 1.0  # the camera moved on: nearly, not exactly, the same view
    assert np.mean(labels[0] == labels[4]) < same  # another drive, another street
    assert np.mean(labels[0] == labels[3]) < same  # further down the street: less alike
    assert np.array_equal(render(spec, "val", 2)[1], render(SyntheticSpec(), "val", 2)[1])
    with pytest.raises(DatasetError, match="drives = 9: expected 0 to n_target_train"):
        SyntheticSpec(n_target_train=8, drives=9).validate()


def test_street_draws_are_pinned():
    """The street scenes (the source of every domain, the shipped source model's data) are fixed draws:
    a change of the scene sampler that moves them changes every benchmark already made."""
    from sisray.datasets.synthetic.scene import sample_scene
    scene = sample_scene(np.random.default_rng([0, 1, 7]))
    assert (scene.road_half, scene.sidewalk, scene.far_z) == (
        4.908528664873325, (2.9249683095312338, 3.799638659580917), 74.32325000753298)
    assert len(scene.things) == 16 and scene.layers[0].materials.tolist() == [8, 255, 255, 8, 8, 255]


def _shares(spec: SyntheticSpec, domain: str, n: int = 12) -> np.ndarray:
    pixels = sum(np.bincount(CITYSCAPES_ID_TO_TRAINID[render(spec, domain, i)[1]].ravel(), minlength=256)
                 for i in range(n))
    return pixels / pixels.sum()


def test_rural_scenery_changes_the_class_proportions_of_the_target_only():
    street, rural = SyntheticSpec(), SyntheticSpec(scenery="rural")
    for index in (0, 3):
        assert all(np.array_equal(a, b) for a, b in zip(render(street, "source", index), render(rural, "source", index)))
    shares = {"street": _shares(street, "train"), "rural": _shares(rural, "train")}
    assert shares["rural"][train_id("building")] < 0.4 * shares["street"][train_id("building")]
    assert shares["rural"][train_id("vegetation")] > 2 * shares["street"][train_id("vegetation")]
    assert shares["rural"][train_id("fence")] > 1.5 * shares["street"][train_id("fence")]
    assert shares["rural"][train_id("car")] < shares["street"][train_id("car")]
    with pytest.raises(DatasetError, match="scenery = 'moon': expected one of street, rural"):
        SyntheticSpec(scenery="moon").validate()


def test_the_suite_writes_one_benchmark_per_domain(tmp_path):
    from sisray.datasets.synthetic import SUITE, generate_suite

    tiny = SyntheticSpec(n_source=2, n_target_train=2, n_target_val=1, source_size=(48, 32), target_size=(64, 32))
    manifests = generate_suite(tmp_path, tiny, processes=1)
    assert list(manifests) == list(SUITE) == ["day", "dusk", "fog", "camera", "small", "drive", "near", "rural",
                                              "rural_near"]
    assert [m["spec"]["look"] for m in manifests.values()] == ["day", "dusk", "fog", "camera"] + ["day"] * 5
    assert [m["spec"]["scenery"] for m in manifests.values()] == ["street"] * 7 + ["rural"] * 2
    assert manifests["rural_near"]["spec"]["appearance_gap"] == 0.2 and manifests["rural"]["spec"]["appearance_gap"] == 1
    assert manifests["near"]["spec"]["appearance_gap"] == 0.2 and manifests["near"]["spec"]["zoom"] == [1.0, 1.2]
    assert manifests["drive"]["spec"]["drives"] == 4 and manifests["drive"]["counts"]["target_train"] == 48
    assert manifests["small"]["counts"]["target_train"] == 48 and manifests["day"]["counts"]["target_train"] == 2
    assert filecmp.cmp(tmp_path / "day" / "source" / "images" / "00002.png",
                       tmp_path / "fog" / "source" / "images" / "00002.png", shallow=False)  # one source
    assert len(SyntheticTarget(tmp_path / "camera", "train", (64, 32))) == 2


def test_other_settings_are_refused(small_benchmark):
    with pytest.raises(DatasetError, match="made with other settings"):
        generate(small_benchmark, SyntheticSpec(**{**SMALL_SPEC, "seed": 99}))


def test_half_written_set_is_redone(tmp_path):
    spec = SyntheticSpec(seed=1, n_source=2, n_target_train=2, n_target_val=1)
    (tmp_path / "source" / "images").mkdir(parents=True)
    (tmp_path / "source" / "images" / "00001.png").write_bytes(b"half")
    (tmp_path / PARTIAL_MARKER).write_text("")
    with pytest.raises(DatasetError, match="is half-written"):
        SyntheticSource(tmp_path, "train", (64, 36))
    generate(tmp_path, spec, processes=1)
    assert not (tmp_path / PARTIAL_MARKER).exists()
    assert len(SyntheticSource(tmp_path, "train", (64, 36))) == 2


def test_foreign_folder_is_never_overwritten(tmp_path):
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "mine.txt").write_text("precious")
    with pytest.raises(DatasetError, match="not part of a sisray synthetic benchmark"):
        generate(tmp_path, SyntheticSpec(n_source=1, n_target_train=1, n_target_val=1))
    assert (tmp_path / "source" / "mine.txt").read_text() == "precious"


def test_missing_benchmark_says_how_to_make_it(tmp_path):
    with pytest.raises(DatasetError, match="jobs/make_synthetic.py --out"):
        SyntheticTarget(tmp_path, "train", (64, 32))


def test_bad_spec_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="n_source = 0"):
        generate(tmp_path, SyntheticSpec(n_source=0))
    with pytest.raises(DatasetError, match="zoom"):
        generate(tmp_path, SyntheticSpec(zoom=(2.0, 1.5)))
    with pytest.raises(DatasetError, match="appearance_gap = 1.5"):
        generate(tmp_path, SyntheticSpec(appearance_gap=1.5))
    with pytest.raises(DatasetError, match="look = 'night': expected one of day, dusk, fog, camera"):
        generate(tmp_path, SyntheticSpec(look="night"))


def test_class_statistics_are_plausible():
    spec = SyntheticSpec(seed=0)
    shares, present, heights = {}, {}, {}
    for domain in ("source", "train"):
        pixels = np.zeros(256, np.int64)
        sizes = {"person": [], "car": []}
        for i in range(24):
            _, ids = render(spec, domain, i)
            label = CITYSCAPES_ID_TO_TRAINID[ids]
            pixels += np.bincount(label.ravel(), minlength=256)
            for name in sizes:
                sizes[name] += [h / label.shape[0] for h in _object_heights(label, train_id(name))]
        shares[domain] = pixels / pixels.sum()
        present[domain] = {c for c in range(19) if pixels[c] > 0}
        heights[domain] = {k: np.median(v) for k, v in sizes.items()}
    for domain in shares:
        assert set(CLASSES) <= present[domain], f"{domain} misses {set(CLASSES) - present[domain]}"
        assert present[domain] <= set(CLASSES)
        assert 0.15 < shares[domain][train_id("road")] < 0.5
        assert shares[domain][train_id("sky")] > 0.03
        assert shares[domain][train_id("building")] > 0.1
    # The target camera sees objects larger: apparent height relative to the frame height.
    for name in ("person", "car"):
        assert heights["train"][name] > 1.3 * heights["source"][name], name


def test_describe_reports_through_the_loader(small_benchmark):
    stats = describe(SyntheticTarget(small_benchmark, "val", (128, 64)))
    assert stats["images"] == 3 and stats["size"] == [128, 64]
    assert abs(sum(stats["class_share"].values()) + stats["ignored_share"] - 1) < 1e-9
    assert stats["ignored_share"] > 0  # the ego hood
