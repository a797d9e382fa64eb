"""The method core on hand-built examples and as properties."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scenes import agreement, class_coded_scene
from sisray.lse.entropy import normalise_per_class, pixel_entropy
from sisray.lse.losses import cross_entropy, focal_loss, lse_target_loss
from sisray.lse.patches import (Box, crop_and_scale, draw_boxes, keep_mask,
                                scale_invariant_examples, transfer_ground_truth, transfer_label)
from sisray.lse.records import image_records
from sisray.lse.selection import classwise, global_, select
from sisray.lse.thresholds import class_thresholds, histogram_quantile

FAST = settings(max_examples=40, deadline=None)


def softmax_maps(seed: int, n=2, c=3, h=4, w=5) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed)).mul(3).softmax(1)


# ------------------------------------------------------------------ entropy

def test_entropy_of_uniform_and_one_hot():
    uniform = torch.full((1, 4, 2, 2), 0.25)
    assert torch.allclose(pixel_entropy(uniform), torch.full((1, 2, 2), math.log(4)))
    one_hot = torch.zeros(1, 4, 2, 2)
    one_hot[:, 2] = 1
    assert torch.allclose(pixel_entropy(one_hot), torch.zeros(1, 2, 2), atol=1e-9)


def test_normalisation_per_image_and_class_by_hand():
    entropy = torch.tensor([[[0.1, 0.3, 0.2, 0.2]]])
    prediction = torch.tensor([[[0, 0, 1, 1]]])
    out = normalise_per_class(entropy, prediction, num_classes=2)
    assert torch.allclose(out, torch.tensor([[[0.0, 1.0, 0.0, 0.0]]]))  # class 1's group is constant -> 0
    two_images = normalise_per_class(torch.tensor([[[1.0, 2.0]], [[5.0, 9.0]]]), torch.zeros(2, 1, 2, dtype=torch.long), 2)
    assert torch.allclose(two_images, torch.tensor([[[0.0, 1.0]], [[0.0, 1.0]]]))  # per image, not across


@FAST
@given(st.integers(0, 10_000), st.integers(2, 6))
def test_entropy_bounds_and_normalisation_has_no_nan(seed, c):
    probs = softmax_maps(seed, c=c)
    entropy = pixel_entropy(probs)
    assert (entropy >= -1e-6).all() and (entropy <= math.log(c) + 1e-5).all()
    normalised = normalise_per_class(entropy, probs.argmax(1), c)
    assert not torch.isnan(normalised).any()
    assert (normalised >= 0).all() and (normalised <= 1).all()


# ------------------------------------------------------------------ records

def test_records_by_hand():
    probs = torch.tensor([[[[0.9, 0.6], [0.2, 0.5]],
                           [[0.1, 0.4], [0.8, 0.5]]]])  # (1, 2, 2, 2); pixel (1,1) ties -> class 0
    records = image_records(probs, bins=4)
    assert records.counts.tolist() == [[3, 1]]
    assert records.scores[0, 0].item() == pytest.approx((0.9 + 0.6 + 0.5) / 3)
    assert records.scores[0, 1].item() == pytest.approx(0.8)
    entropy = pixel_entropy(probs)[0]
    class0 = torch.tensor([entropy[0, 0], entropy[0, 1], entropy[1, 1]])
    normalised0 = (class0 - class0.min()) / (class0.max() - class0.min())
    assert records.mean_entropy[0, 0].item() == pytest.approx(normalised0.mean().item(), abs=1e-6)
    assert records.mean_entropy[0, 1].item() == 0.0  # one pixel: a constant group
    # normalised class-0 entropies: 0 (0.9/0.1), 0.946 (0.6/0.4), 1 (0.5/0.5) -> bins 0, 3, 3
    assert records.histograms[0, 0].tolist() == [1, 0, 0, 2]
    assert records.histograms[0, 1].tolist() == [1, 0, 0, 0]


@FAST
@given(st.integers(0, 10_000))
def test_records_are_consistent(seed):
    probs = softmax_maps(seed, n=3, c=4, h=6, w=7)
    records = image_records(probs, bins=8)
    assert (records.counts.sum(1) == 42).all()
    assert torch.equal(records.histograms.sum(2), records.counts)
    present = records.counts > 0
    assert ((records.scores[present] > 0) & (records.scores[present] <= 1 + 1e-6)).all()
    assert (records.scores[~present] == 0).all()
    single = image_records(probs[1:2], bins=8)  # per image: batching does not change a record
    assert torch.equal(single.counts[0], records.counts[1]) and torch.allclose(single.scores[0], records.scores[1])


# ------------------------------------------------------------------ selection

COUNTS = np.array([[5, 0], [3, 2], [4, 0], [0, 6]])
SCORES = np.array([[0.9, 0.0], [0.7, 0.6], [0.8, 0.0], [0.0, 0.95]])


def test_classwise_selection_by_hand():
    sel = classwise(COUNTS, SCORES, p=0.5, divisor=1)
    assert sel.rankings == {0: [0, 2, 1], 1: [3, 1]}
    assert sel.cutoffs == {0: 1, 1: 1}  # floor(3 * 0.5) and floor(2 * 0.5)
    assert sel.selected == [0, 3]
    assert classwise(COUNTS, SCORES, p=0.5, divisor=1, skip=(1,)).selected == [0]
    assert 1 not in classwise(COUNTS, SCORES, p=0.5, divisor=1, skip=(1,)).rankings


def test_min_per_class_gives_a_small_target_set_a_selection():
    """62 images: the reference quota floor(N_c * 0.2 / 19) is 0 for every class; the minimum is not."""
    rng = np.random.default_rng(0)
    counts = (rng.random((62, 19)) < 0.5).astype(np.int64) * 100
    scores = rng.random((62, 19))
    assert classwise(counts, scores, p=0.2).selected == []
    sel = classwise(counts, scores, p=0.2, min_per_class=2)
    for c in range(19):
        assert sel.cutoffs[c] == 2 and set(sel.rankings[c][:2]) <= set(sel.selected)
    assert len(sel.selected) <= 2 * 19
    few = classwise(COUNTS, SCORES, p=0.5, divisor=1, min_per_class=5)
    assert few.cutoffs == {0: 3, 1: 2}  # never more than a class's candidates
    assert few.selected == [0, 1, 2, 3]
    big = classwise(np.ones((190, 19)), np.linspace(0.1, 0.9, 190)[:, None].repeat(19, 1), p=0.3, min_per_class=1)
    assert big.cutoffs[0] == 3  # the quota wins where it is larger
    assert select(counts, scores, 0.2, "classwise", min_per_class=2).selected == sel.selected


def test_reference_divisor_is_19_and_floor_is_exact():
    counts = np.ones((190, 19), np.int64)
    scores = np.linspace(0.1, 0.9, 190)[:, None].repeat(19, 1)
    sel = classwise(counts, scores, p=0.3)
    assert sel.cutoffs[0] == 3  # floor(190 * 0.3 / 19) = 3 despite 0.3's binary representation
    assert sel.selected == [187, 188, 189]


def test_global_selection_by_hand():
    sel = global_(COUNTS, SCORES, p=0.5)
    # image scores: 0.9, (3*0.7 + 2*0.6)/5 = 0.66, 0.8, 0.95 -> top 2: images 3 and 0
    assert sel.selected == [0, 3]
    assert sel.cutoffs == {0: 1, 1: 1}  # class 0: [0, 2, 1] -> image 2 is first unselected
    assert select(COUNTS, SCORES, 0.5, "global").selected == sel.selected


def test_global_selection_leaves_out_unscored_images():
    counts = np.vstack([COUNTS, np.zeros((2, COUNTS.shape[1]), COUNTS.dtype)])  # two skipped images
    scores = np.vstack([SCORES, np.zeros((2, SCORES.shape[1]), SCORES.dtype)])
    assert global_(counts, scores, p=0.5).selected == [0, 3]  # floor(4 scored * 0.5), as without them
    assert global_(counts, scores, p=1.0).selected == [0, 1, 2, 3]


@FAST
@given(st.integers(0, 10_000), st.floats(0.01, 1.0), st.floats(0.01, 1.0))
def test_selection_size_bounds_and_monotone_in_p(seed, p1, p2):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 3, (60, 19)) * rng.integers(0, 100, (60, 19))
    scores = np.where(counts > 0, rng.random((60, 19)), 0.0)
    low, high = sorted((p1, p2))
    a, b = classwise(counts, scores, low), classwise(counts, scores, high)
    assert len(a.selected) <= sum(a.cutoffs.values())
    assert set(a.selected) <= set(b.selected)
    assert a.selected == classwise(counts, scores, low).selected


# ------------------------------------------------------------------ thresholds

def test_threshold_estimators_by_hand():
    sel = classwise(COUNTS, SCORES, p=0.5, divisor=1)
    mean_entropy = np.array([[0.1, 0.0], [0.5, 0.3], [0.4, 0.0], [0.0, 0.2]])
    hist = np.zeros((4, 2, 4), np.int64)
    hist[0, 0] = [2, 2, 1, 0]  # image 0 class 0
    hist[3, 1] = [0, 0, 3, 3]  # image 3 class 1
    tau = class_thresholds(sel, mean_entropy, hist, "cutoff_image")
    assert tau.tolist() == [0.4, 0.3]  # the first non-selected images: 2 for class 0, 1 for class 1
    tau = class_thresholds(sel, mean_entropy, hist, "window", window=2)
    assert tau[0] == pytest.approx((0.4 + 0.5) / 2) and tau[1] == pytest.approx(0.3)
    tau = class_thresholds(sel, mean_entropy, hist, "quantile", quantile=0.5)
    assert tau[0] == pytest.approx((1 + 0.25) / 4)  # value 2.5 of 5: 0.5 of the 2 in bin 1
    assert tau[1] == pytest.approx((2 + 1.0) / 4)  # 3 of 6 values: the end of bin 2


def test_fallback_for_classes_without_candidates():
    counts = np.array([[3, 0, 0]])
    sel = classwise(counts, np.array([[0.9, 0, 0]]), p=1.0, divisor=1, skip=(2,))
    tau = class_thresholds(sel, np.zeros((1, 3)), np.zeros((1, 3, 4), np.int64), "cutoff_image", fallback=0.7)
    assert tau[1] == 0.7 and tau[2] == 0.7  # no candidate image; skipped class
    assert tau[0] == 0.7  # everything selected: no first non-selected image


@FAST
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=300), st.floats(0.01, 0.99), st.integers(2, 64))
def test_histogram_quantile_is_within_one_bin(values, q, bins):
    values = np.array(values)
    hist = np.bincount(np.minimum((values * bins).astype(int), bins - 1), minlength=bins)
    exact = np.quantile(values, q, method="inverted_cdf")  # the empirical quantile: a value of the data
    assert abs(histogram_quantile(hist, q) - exact) <= 1 / bins + 1e-9


# ------------------------------------------------------------------ patches

def two_class_map() -> torch.Tensor:
    """(2, 4, 4): class 1 confident in the right half, class 0 elsewhere."""
    probs = torch.zeros(2, 4, 4)
    probs[1, :, 2:] = 0.9
    probs[0] = 1 - probs[1]
    return probs


def test_patch_label_by_hand():
    probs = two_class_map()
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[0, 3] = False  # not confident enough: must become ignore where the mask is exactly 0
    box = Box(top=0.0, left=0.5, height=0.5, width=0.5, scale=2.0)  # the top-right 2x2, upsampled to 4x4
    label = transfer_label(probs, keep, box, (4, 4))
    assert label.shape == (4, 4)
    assert label[0, 3] == 255  # the corner pixel maps exactly onto the dropped pixel
    assert label[0, 2] == 1  # between kept and dropped: the upsampled mask is not exactly 0
    assert (label[1:] == 1).all()


def test_boxes_are_a_function_of_the_seed_and_have_the_scaled_size():
    a = draw_boxes(64, 128, [2.0], 4, torch.Generator().manual_seed(7))
    b = draw_boxes(64, 128, [2.0], 4, torch.Generator().manual_seed(7))
    c = draw_boxes(64, 128, [2.0], 4, torch.Generator().manual_seed(8))
    assert a == b and a != c
    for box in a:
        top, left, h, w = box.pixels(64, 128)
        assert (h, w) == (32, 64) and 0 <= top <= 32 and 0 <= left <= 64
    assert len(draw_boxes(64, 128, [1.5, 2.0], 3, torch.Generator().manual_seed(0))) == 6


def _shifted(box: Box, dy: int, dx: int, height: int, width: int) -> Box:
    """The same box moved by (dy, dx) working pixels, towards the inside of the image."""
    top = box.top + (dy if box.top + box.height + dy / height <= 1 else -dy) / height
    left = box.left + (dx if box.left + box.width + dx / width <= 1 else -dx) / width
    return dataclasses.replace(box, top=top, left=left)


@pytest.mark.parametrize("seed", range(3))
def test_a_rebuilt_training_image_shows_what_its_pseudo_label_says(seed):
    """With an ideal prediction, the example rebuilt from the full-resolution image (as training
    does) shows the pseudo-label's class on >= 97% of its labelled pixels; a box one working pixel
    off does not (content and alignment, not just shapes)."""
    label, full, probs = class_coded_scene(seed)  # working 32 x 64, full resolution 64 x 128
    examples = scale_invariant_examples(torch.zeros(3, 32, 64), probs, torch.ones(32, 64, dtype=torch.bool), [2.0], 4,
                                        torch.Generator().manual_seed(seed))
    for e in examples:
        assert e.box.pixels(64, 128)[2:] == (32, 64)  # the same region at twice the resolution
        assert agreement(crop_and_scale(full, e.box, (32, 64)), e.label) >= 0.97
        for dy, dx in ((1, 0), (0, 1)):
            assert agreement(crop_and_scale(full, _shifted(e.box, dy, dx, 32, 64), (32, 64)), e.label) < 0.97


@FAST
@given(st.integers(0, 10_000), st.sampled_from([1.0, 1.5, 2.0, 3.0]))
def test_patch_labels_only_from_classes_in_the_upsampled_prediction(seed, scale):
    probs = softmax_maps(seed, n=1, c=4, h=12, w=16)[0]
    entropy = pixel_entropy(probs[None])
    normalised = normalise_per_class(entropy, probs[None].argmax(1), 4)[0]
    keep = keep_mask(normalised, probs.argmax(0), torch.full((4,), 0.5))
    for e in scale_invariant_examples(torch.rand(3, 12, 16), probs, keep, [scale], 2, torch.Generator().manual_seed(seed)):
        upsampled = crop_and_scale(probs, e.box, (12, 16)).argmax(0)
        labelled = e.label != 255
        assert torch.equal(e.label[labelled], upsampled[labelled])
        if scale == 1.0:
            assert torch.equal(labelled, keep)  # no resampling: exactly the keep-mask


def test_zoom_out_shrinks_the_whole_image_and_ignores_the_rest():
    probs = two_class_map()
    box = draw_boxes(4, 4, [2.0], 1, torch.Generator().manual_seed(3), zoom_out=True)[0]
    label = transfer_label(probs, torch.ones(4, 4, dtype=torch.bool), box, (4, 4))
    top, left, h, w = box.pixels(4, 4)
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[top:top + h, left:left + w] = True
    assert (label[~inside] == 255).all() and (label[inside] != 255).all()
    assert set(label[inside].tolist()) == {0, 1}


@pytest.mark.parametrize("box", [Box(0.25, 0.125, 0.5, 0.5, 2.0), Box(0.0, 0.5, 0.5, 0.5, 2.0, zoom_out=True),
                                 Box(0.125, 0.25, 0.75, 0.625, 1.5)])
def test_ground_truth_of_a_patch_is_resampled_exactly_as_a_pseudo_label(box):
    g = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 5, (8, 8), generator=g)
    teacher = torch.nn.functional.one_hot(truth, 5).permute(2, 0, 1).float()  # right everywhere
    pseudo = transfer_label(teacher, torch.ones(8, 8, dtype=torch.bool), box, (8, 8))
    assert torch.equal(transfer_ground_truth(truth, box, (8, 8), 5), pseudo)  # a perfect teacher scores 100%
    truth[:4, :4] = 255  # unlabelled pixels give no ground truth
    assert (transfer_ground_truth(truth, Box(0.0, 0.0, 0.25, 0.25, 4.0), (8, 8), 5) == 255).all()


def test_entropy_gap_keeps_only_patches_where_the_model_is_unsure():
    probs = two_class_map()
    keep = torch.ones(4, 4, dtype=torch.bool)
    unsure = lambda images: torch.full((images.shape[0], 2, 4, 4), 0.5)  # noqa: E731
    sure = lambda images: torch.nn.functional.one_hot(torch.zeros(images.shape[0], 4, 4, dtype=torch.long), 2).permute(0, 3, 1, 2).float()  # noqa: E731
    args = (torch.rand(3, 4, 4), probs, keep, [2.0], 3)
    assert len(scale_invariant_examples(*args, torch.Generator().manual_seed(0), predict=unsure, delta=0.1)) == 3
    assert scale_invariant_examples(*args, torch.Generator().manual_seed(0), predict=sure, delta=0.1) == []


# ------------------------------------------------------------------ losses

def test_focal_loss_by_hand():
    logits = torch.zeros(1, 2, 1, 1)  # p_t = 0.5
    labels = torch.zeros(1, 1, 1, dtype=torch.long)
    assert cross_entropy(logits, labels).item() == pytest.approx(math.log(2))
    assert focal_loss(logits, labels, gamma=3).item() == pytest.approx(0.5 ** 3 * math.log(2))
    assert lse_target_loss(logits, labels, beta=0.1, gamma=3).item() == pytest.approx(math.log(2) * (1 + 0.1 * 0.125))


@pytest.mark.parametrize("p_t", [0.05, 0.2, 0.5, 0.8, 0.97])
def test_focal_loss_by_hand_at_several_confidences(p_t):
    """(1 - p_t)^gamma * -log p_t: away from p_t = 0.5 a swapped factor p_t^gamma differs."""
    logits = torch.tensor([math.log(p_t), math.log(1 - p_t)]).reshape(1, 2, 1, 1)  # softmax = (p_t, 1 - p_t)
    labels = torch.zeros(1, 1, 1, dtype=torch.long)
    ce = -math.log(p_t)
    assert focal_loss(logits, labels, gamma=3).item() == pytest.approx((1 - p_t) ** 3 * ce, rel=1e-5)
    assert focal_loss(logits, labels, gamma=1.5).item() == pytest.approx((1 - p_t) ** 1.5 * ce, rel=1e-5)
    assert lse_target_loss(logits, labels, beta=0.1, gamma=3).item() == pytest.approx(ce * (1 + 0.1 * (1 - p_t) ** 3),
                                                                                       rel=1e-5)


def test_confidence_weights_scale_each_pixel_and_keep_the_mean_over_valid_pixels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 4, 2, 2, generator=g)
    labels = torch.tensor([[[0, 1], [2, 255]]])
    per_pixel = [lse_target_loss(logits[..., i:i + 1, j:j + 1], labels[:, i:i + 1, j:j + 1], 0.1, 3).item()
                 for i, j in ((0, 0), (0, 1), (1, 0))]
    weights = torch.tensor([[[1.0, 0.5], [0.0, 0.9]]])
    expected = (per_pixel[0] + 0.5 * per_pixel[1]) / 3  # three valid pixels, the third weighted 0
    assert lse_target_loss(logits, labels, 0.1, 3, weights).item() == pytest.approx(expected, rel=1e-6)
    assert lse_target_loss(logits, labels, 0.1, 3, torch.ones(1, 2, 2)).item() == pytest.approx(
        lse_target_loss(logits, labels, 0.1, 3).item())


@FAST
@given(st.integers(0, 10_000), st.floats(0.0, 5.0))
def test_focal_is_at_most_ce_and_equal_at_gamma_zero(seed, gamma):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 3, 3, generator=g) * 3
    labels = torch.randint(0, 5, (2, 3, 3), generator=g)
    labels[0, 0, 0] = 255
    ce = cross_entropy(logits, labels)
    assert focal_loss(logits, labels, gamma) <= ce + 1e-6
    assert torch.isclose(focal_loss(logits, labels, 0.0), ce)


def test_losses_are_zero_without_valid_pixels_and_have_finite_gradients():
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    labels = torch.full((2, 3, 3), 255)
    loss = lse_target_loss(logits, labels, beta=0.1, gamma=3) + focal_loss(logits, labels, 3)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("coarse", [2, 8])
def test_fast_label_transfer_equals_the_direct_definition(seed, coarse):
    """argmax of F.interpolate(crop, align_corners=True), computed in float64 to leave no rounding ties."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 6, 24 // coarse, 40 // coarse, generator=g, dtype=torch.float64) * 4
    probs = torch.nn.functional.interpolate(logits, size=(24, 40), mode="bilinear")[0].softmax(0)
    keep = torch.rand(24, 40, generator=g) > 0.3
    for box in draw_boxes(24, 40, [1.7, 2.0, 3.0], 2, g):
        direct = crop_and_scale(probs, box, (24, 40)).argmax(0)
        dropped = crop_and_scale(keep[None].double(), box, (24, 40))[0] == 0
        direct[dropped] = 255
        assert torch.equal(transfer_label(probs, keep, box, (24, 40)), direct)
