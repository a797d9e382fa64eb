"""Rare-class sampling of the labelled images (train.rare_class_sampling)."""

from __future__ import annotations

import json
import math

import pytest

from sisray.cluster import Workers
from sisray.config import load_config
from sisray.errors import SisrayError
from sisray.sampling import rare_class_sampler
from sisray.stages.train import labelled_sampler, round_spec
from sisray.stages.train_loop import TrainSpec, global_batch, labelled_batch, stream_seed
from sisray.storage import RunStore

# six labelled images: road everywhere, pole in images 1 and 4, car in image 2
COUNTED = {"labels": 6, "class_ids": [0, 5, 13], "pixels": {"road": 9000, "pole": 90, "car": 910},
           "image_classes": [[0], [0, 5], [0, 13], [0], [0, 5], [0]]}


def test_rare_classes_are_drawn_far_more_often_and_only_from_images_that_hold_them():
    sampler = rare_class_sampler(COUNTED, list(range(6)), temperature=0.01)
    share = {"road": 0.9, "pole": 0.009, "car": 0.091}
    expected = [math.exp((1 - share[c]) / 0.01) for c in ("road", "pole", "car")]
    assert sampler.probabilities == pytest.approx([e / sum(expected) for e in expected])
    assert sampler.holders == ((0, 1, 2, 3, 4, 5), (1, 4), (2,))
    draws = [i for step in range(200) for i in sampler.batch(step, 8, seed=3)]
    pole = sum(i in (1, 4) for i in draws) / len(draws)
    assert pole > 0.9  # the rarest class: ~99.96% of the class draws (its images also hold road)
    assert sampler.batch(7, 8, seed=3) == sampler.batch(7, 8, seed=3)  # a function of (seed, step)
    assert sampler.batch(7, 8, seed=3) != sampler.batch(8, 8, seed=3)
    # a high temperature is near uniform over classes: road's images come back
    warm = rare_class_sampler(COUNTED, list(range(6)), temperature=100.0)
    assert warm.probabilities == pytest.approx([1 / 3] * 3, abs=0.01)


def test_held_out_images_are_never_drawn_and_positions_index_the_trained_ones():
    trained = [0, 2, 3, 4, 5]  # image 1 held out: pole is held by image 4 only, at position 3
    sampler = rare_class_sampler(COUNTED, trained, temperature=0.01)
    assert sampler.holders == ((0, 1, 2, 3, 4), (3,), (1,))
    assert all(0 <= i < len(trained) for step in range(20) for i in sampler.batch(step, 4, seed=0))


def test_a_label_space_counted_by_an_earlier_sisray_asks_to_be_counted_again():
    old = {k: v for k, v in COUNTED.items() if k != "image_classes"}
    with pytest.raises(SisrayError, match="delete it to have it counted again"):
        rare_class_sampler(old, list(range(6)), 0.01)


def test_every_stage_draws_its_labelled_images_as_configured(tmp_path):
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "classes.json").write_text(json.dumps(COUNTED))
    store = RunStore(tmp_path)
    plain = load_config(None, [f"run_dir={tmp_path}"])
    assert labelled_sampler(plain, store) is None
    rcs = load_config(None, [f"run_dir={tmp_path}", "train.rare_class_sampling=0.01", "train.holdout=0.34",
                             "train.batch_size=4"])
    sampler = labelled_sampler(rcs, store)
    assert len(sampler.holders[0]) == 4  # the two held-out images are not drawn
    spec = round_spec(rcs, 2, 10, "m", None, "p", Workers(1, False, 0.5, 1), None, sampler)
    assert spec.sampler is sampler
    assert labelled_batch(spec, 5, 4) == sampler.batch(5, 4, stream_seed(rcs.seed, 2, 0))
    epochs = TrainSpec(plain, "source", 10, "random", 1, None)
    assert labelled_batch(epochs, 5, 6) == global_batch(5, 1, 6, plain.seed)
