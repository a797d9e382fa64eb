"""Label-free validators on cases whose answer is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sisray.validators import HIGHER_IS_BETTER, ValidationSums, agreement, bnm, sample_pixels, snd

C = 4


def one_hot(classes: list[int], c: int = C) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(classes), c).double()


def test_bnm_is_one_for_balanced_one_hot_rows_and_lower_for_collapse_or_doubt():
    balanced = one_hot([0, 1, 2, 3] * 5)
    assert bnm(balanced) == pytest.approx(1.0)
    assert bnm(one_hot([2] * 20)) == pytest.approx(1 / math.sqrt(C))  # one class for every pixel
    assert bnm(torch.full((20, C), 1 / C)) == pytest.approx(1 / C)  # uniform doubt: rank 1, and lower still
    assert bnm(0.7 * balanced + 0.3 / C) < 1.0


def test_snd_is_high_for_tight_clusters_and_low_for_scattered_rows():
    tight = one_hot([0, 0, 0, 0, 1, 1, 1, 1])  # each row has 3 identical neighbours among 7
    assert snd(tight) == pytest.approx(math.log(3) / math.log(7), rel=1e-6)
    scattered = torch.eye(8, dtype=torch.double)  # every row orthogonal to every other: no close neighbour
    assert snd(scattered) == pytest.approx(1.0)  # all equally far: the softmax over neighbours is flat
    generator = torch.Generator().manual_seed(0)
    noisy = torch.rand(8, 8, generator=generator, dtype=torch.double).softmax(1)
    assert snd(tight) < snd(noisy)


def test_agreement_counts_only_covered_pixels():
    a = torch.tensor([[0, 1], [2, 3]])
    b = torch.tensor([[0, 1], [0, 0]])
    assert agreement(a, b) == (2, 4)
    assert agreement(a, b, torch.tensor([[True, False], [True, False]])) == (1, 2)


def test_figures_of_a_confident_model_and_of_a_uniform_one():
    share = np.full(C, 1 / C)
    confident, uniform = ValidationSums(C), ValidationSums(C)
    maps = one_hot([0, 1, 2, 3] * 4).T.reshape(1, C, 4, 4).float()  # each class on a quarter of the pixels
    confident.add_probabilities(maps)
    uniform.add_probabilities(torch.full((1, C, 4, 4), 1 / C))
    generator = torch.Generator().manual_seed(0)
    for sums, probs in ((confident, maps), (uniform, torch.full((1, C, 4, 4), 1 / C))):
        sums.samples[0] = sample_pixels(probs[0], 8, generator)
        sums.flip = [16, 16]
    good = confident.figures(share, tuple(range(C)))
    bad = uniform.figures(share, tuple(range(C)))
    assert good["mean_entropy"] == pytest.approx(0.0, abs=1e-6) and bad["mean_entropy"] == pytest.approx(1.0)
    assert good["information"] == pytest.approx(1.0) and bad["information"] == pytest.approx(0.0, abs=1e-6)
    assert good["prior_distance"] == pytest.approx(0.0) and good["flip_agreement"] == 1.0
    assert math.isnan(good["scale_agreement"])  # nothing compared
    for name in HIGHER_IS_BETTER:
        assert name in good


def test_sums_merge_as_one_pass_over_all_images():
    generator = torch.Generator().manual_seed(1)
    probs = torch.rand(4, C, 5, 6, generator=generator).softmax(1)
    whole, first, second = ValidationSums(C), ValidationSums(C), ValidationSums(C)
    whole.add_probabilities(probs)
    first.add_probabilities(probs[:3])
    second.add_probabilities(probs[3:])
    first.merge(second)
    assert first.pixels == whole.pixels and first.entropy == pytest.approx(whole.entropy)
    assert np.allclose(first.probs, whole.probs)


def test_a_prediction_far_from_the_source_shares_is_far():
    sums = ValidationSums(C)
    sums.add_probabilities(one_hot([0] * 15 + [1]).T.reshape(1, C, 4, 4).float())
    figures = sums.figures(np.full(C, 1 / C), tuple(range(C)))
    assert 0.5 < figures["prior_distance"] < 1.0


def test_the_figures_do_not_depend_on_the_order_batches_arrive_in():
    """Ray Data returns an actor pool's batches in any order: BNM and SND stack the sampled pixels
    by image, so that the same run gives the same bits."""
    generator = torch.Generator().manual_seed(2)
    batches = []
    for first in (0, 3, 6):
        sums = ValidationSums(C)
        probs = torch.rand(3, C, 5, 6, generator=generator).softmax(1)
        sums.add_probabilities(probs)
        sums.samples = {first + k: sample_pixels(probs[k], 16, generator) for k in range(3)}
        batches.append(sums)
    figures = []
    for order in ((0, 1, 2), (2, 0, 1), (1, 2, 0)):
        total = ValidationSums(C)
        for k in order:
            total.merge(batches[k])
        figures.append(total.figures(np.full(C, 1 / C), tuple(range(C))))
    assert figures[0]["bnm"] == figures[1]["bnm"] == figures[2]["bnm"]
    assert figures[0]["snd"] == figures[1]["snd"] == figures[2]["snd"]


def test_a_pass_adds_its_batches_up_in_image_order():
    """`merged`: the entropy and probability sums too, not only the sampled pixels."""
    from sisray.labels import NUM_CLASSES
    from sisray.stages.validation import Validator, merged

    generator = np.random.default_rng(3)
    batches = []
    for first in (0, 3, 6):
        batch = Validator.blank(3)
        batch["id"][:] = range(first, first + 3)
        batch["entropy"][:] = generator.random(3) * 1e3
        batch["probs"][:] = generator.random((3, NUM_CLASSES)) * 1e3
        batch["pixels"][:] = 1000
        batch["samples"][:] = generator.random(batch["samples"].shape)
        batches.append(batch)
    share = np.full(NUM_CLASSES, 1 / NUM_CLASSES)
    figures = [merged([batches[k] for k in order]).figures(share, tuple(range(NUM_CLASSES)))
               for order in ((0, 1, 2), (2, 0, 1), (1, 2, 0))]
    texts = [json.dumps(f, sort_keys=True) for f in figures]  # as text: NaN (nothing zoomed) equals itself
    assert texts[0] == texts[1] == texts[2]
