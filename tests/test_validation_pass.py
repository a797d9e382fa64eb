"""The validation pass over target-train images: figures known for a constant model, and the same
figures however the images are batched and spread over actors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sisray.config import load_config
from sisray.labels import NUM_CLASSES
from sisray.models import build_model
from sisray.stages.evaluate import evaluate
from sisray.stages.validation import (SAFEGUARD_IMAGES, ValidationSpec, Validator, images_validated, validate_model,
                                      validation_subset, views_per_image, zoom_validated)

CAR = 13


def _config(root, *extra):
    return load_config(None, ["data.target.name=synthetic", f"data.target.root={root}", "data.target.size=[64, 32]",
                              "model.name=deeplabv2_r101", "model.width=0.0625", "model.init=random",
                              "validation.images=4", *extra])


def _checkpoint(path, constant: bool) -> None:
    torch.manual_seed(0)
    model = build_model("deeplabv2_r101", width=0.0625)
    for conv in model.layer5.conv2d_list:
        if constant:  # zero weights, one positive bias: the same softmax at every pixel
            torch.nn.init.zeros_(conv.weight)
            torch.nn.init.zeros_(conv.bias)
            conv.bias.data[CAR] = 1.0
        else:
            torch.nn.init.normal_(conv.weight, std=0.3)
    torch.save(model.state_dict(), path)


def test_the_consistency_safeguard_has_its_models_validated_even_when_validation_images_is_0():
    assert images_validated(_config("d", "validation.images=0")) == 0
    assert images_validated(_config("d", "validation.images=0", "lse.safeguard=true")) == SAFEGUARD_IMAGES == 64
    assert len(validation_subset(_config("d", "validation.images=0", "lse.safeguard=true"), 300)) == 64
    assert images_validated(_config("d", "validation.images=8", "lse.safeguard=true")) == 8  # the user's count
    assert images_validated(_config("d", "validation.images=0", "lse.safeguard=true",
                                    "lse.safeguard_rule=prior")) == 0  # the prior rule reads the scores


def test_the_safeguard_alone_validates_without_zooming(small_benchmark, tmp_path):
    """The consistency rule reads flips and the ClassMix probe: its pass skips the four zoomed tiles
    (4 of 7 forward passes per image: the mix partner, the next image, is predicted once, in its own
    row), and what it does compute is what the full pass computes."""
    _checkpoint(tmp_path / "varied.pt", constant=False)
    safeguard_only = _config(small_benchmark, "validation.images=0", "lse.safeguard=true")
    assert not zoom_validated(safeguard_only) and zoom_validated(_config(small_benchmark))
    passes = {}
    for zoom in (True, False):
        validator = Validator(ValidationSpec(safeguard_only, str(tmp_path / "varied.pt"), 1, False, (0, 1), zoom))
        calls, predict = [], validator.predict
        validator.predict = lambda images, *a: calls.append(len(images)) or predict(images, *a)
        passes[zoom] = (validator.rows([0, 1]), len(calls))
    (full, full_calls), (lean, lean_calls) = passes[True], passes[False]
    assert (full_calls, lean_calls) == (2 * views_per_image(True), 2 * views_per_image(False)) == (14, 6)
    assert (lean["scale"] == 0).all() and (full["scale"][:, 1] > 0).all()
    for key in ("flip", "mix", "entropy"):
        assert np.array_equal(lean[key], full[key]), key
    alone = validator.rows([0])  # image 1, its partner, predicted for the probe
    assert len(calls) == lean_calls + views_per_image(False) + 1
    assert np.array_equal(alone["mix"][0], lean["mix"][0]) and np.array_equal(alone["flip"][0], lean["flip"][0])
    partners, mix = [], validator.mix_agreement
    validator.mix_agreement = lambda view, partner, draws: partners.append(partner[0]) or mix(view, partner, draws)
    validator.rows([0, 1])
    assert [p.tolist() for p in partners] == [validator.dataset.load_image(i).tolist() for i in (1, 0)]  # the next


def test_the_subset_is_seeded_and_shared_by_every_model():
    cfg = _config("d")
    assert validation_subset(cfg, 300) == validation_subset(cfg, 300) and len(validation_subset(cfg, 300)) == 4
    assert validation_subset(cfg, 300) != validation_subset(_config("d", "seed=1"), 300)
    assert validation_subset(cfg, 3) == (0, 1, 2)


@pytest.mark.ray
def test_a_constant_model_agrees_with_itself_everywhere(ray_session, small_benchmark, tmp_path):
    _checkpoint(tmp_path / "constant.pt", constant=True)
    classes = tuple(range(NUM_CLASSES))
    figures = validate_model(_config(small_benchmark), tmp_path / "constant.pt", np.full(NUM_CLASSES, 1 / NUM_CLASSES),
                             classes)
    p = np.full(NUM_CLASSES, 1.0)
    p[CAR] = math.exp(4)  # the four ASPP branches' biases
    p /= p.sum()
    assert figures["flip_agreement"] == figures["scale_agreement"] == figures["mix_accuracy"] == 1.0
    assert figures["mean_entropy"] == pytest.approx(-(p * np.log(p)).sum() / math.log(NUM_CLASSES), rel=1e-4)
    assert figures["information"] == pytest.approx(0.0, abs=1e-4)
    assert figures["bnm"] == pytest.approx(np.linalg.norm(p) / math.sqrt(NUM_CLASSES), rel=1e-4)
    assert figures["snd"] == pytest.approx(1.0, abs=1e-6)  # every sampled pixel as close as every other


@pytest.mark.ray
def test_figures_do_not_depend_on_batching_actors_or_the_pass(ray_session, small_benchmark, tmp_path):
    """A validation pass of its own (1 actor, batches of 1) and an evaluation's pass that validates
    among its target-val images (2 actors, batches of 3) give the same figures."""
    _checkpoint(tmp_path / "varied.pt", constant=False)
    share, classes = np.full(NUM_CLASSES, 1 / NUM_CLASSES), tuple(range(NUM_CLASSES))
    one = validate_model(_config(small_benchmark, "resources.num_actors=1", "resources.actor_batch_size=1"),
                         tmp_path / "varied.pt", share, classes)
    two = evaluate(_config(small_benchmark, "resources.num_actors=2", "resources.actor_batch_size=3"),
                   tmp_path / "varied.pt", prior=(share, classes))["validators"]
    assert one == pytest.approx(two, rel=1e-9)
    assert 0 < one["flip_agreement"] < 1 and 0 < one["scale_agreement"] < 1 and 0 < one["mix_accuracy"] <= 1
