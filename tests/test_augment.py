from __future__ import annotations

import torch

import pytest

from sisray.augment import class_colours, class_mix, fourier_style, photometric
from sisray.labels import IGNORE


def _images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, 3, 24, 32), dtype=torch.uint8, generator=g)


def test_photometric_draws_are_seeded_per_image_and_stay_in_range():
    images = _images()
    first = photometric(images, torch.Generator().manual_seed(5))
    assert first.dtype == torch.float32 and first.shape == images.shape
    assert 0 <= first.min() and first.max() <= 255
    assert torch.equal(first, photometric(images, torch.Generator().manual_seed(5)))  # the same seed, the same batch
    assert not torch.equal(first, photometric(images, torch.Generator().manual_seed(6)))
    change = (first - images.float()).abs().mean(dim=(1, 2, 3))
    assert bool((change > 1).all())  # every image changed
    # each image has its own draws: the same image twice in a batch comes out differently
    twice = photometric(torch.stack([images[0], images[0]]), torch.Generator().manual_seed(5))
    assert not torch.allclose(twice[0], twice[1])


def test_photometric_keeps_the_layout_of_the_scene():
    """Colour changes and a blur of at most ~1 pixel: a vertical edge stays where it is."""
    image = torch.zeros(1, 3, 16, 32, dtype=torch.uint8)
    image[..., 16:] = 200
    out = photometric(image, torch.Generator().manual_seed(1))[0].mean(0)
    assert bool((out[:, :14] < out[:, 18:].min()).all())


def _mix_batches(source_height: int = 24):
    """A source batch whose labels hold classes 0-4 in vertical bands (and an ignored band), a
    pseudo-labelled target batch of label 9 (ignored on its right half) with its confidences."""
    g = torch.Generator().manual_seed(3)
    source = torch.randint(0, 256, (2, 3, source_height, 32), dtype=torch.uint8, generator=g)
    bands = torch.tensor([0, 1, 2, 3, 4, IGNORE]).repeat_interleave(6)[:32]
    source_labels = bands.expand(2, source_height, 32).clone()
    target = torch.full((2, 3, 16, 32), 77.0)
    target_labels = torch.full((2, 16, 32), 9)
    target_labels[..., 16:] = IGNORE
    return (source, source_labels), (target, target_labels, torch.full((2, 16, 32), 0.25))


def test_class_mix_pastes_half_of_the_source_classes_with_their_labels():
    (source, source_labels), target = _mix_batches(source_height=16)  # same size: no crop
    images, labels, weights = class_mix((source, source_labels), target, torch.Generator().manual_seed(0))
    assert images.shape == target[0].shape and labels.shape == target[1].shape
    for i in range(2):
        pasted = labels[i] != target[1][i]  # the source's classes (0-4) are none of the target's labels (9, ignored)
        classes = set(source_labels[i][pasted].tolist())
        assert len(classes) == 3 and IGNORE not in classes  # ceil(5 / 2) of the five labelled classes
        assert torch.equal(images[i][:, pasted], source[i][:, pasted].float())  # the source's pixels, its labels
        assert torch.equal(labels[i][pasted], source_labels[i][pasted])
        assert bool((weights[i][pasted] == 1).all()) and bool((weights[i][~pasted] == 0.25).all())
        assert bool((images[i][:, ~pasted] == 77).all())  # the rest is the target patch, its pseudo-label
        assert torch.equal(labels[i][~pasted], target[1][i][~pasted])
    again = class_mix((source, source_labels), target, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip((images, labels, weights), again))  # seeded


def test_class_mix_crops_a_taller_source_image_and_label_alike():
    """The source image's channels hold its row and column: every pasted pixel comes from one crop
    offset, and carries the label of its own source pixel."""
    _, (target, target_labels, _) = _mix_batches()
    rows, columns = torch.meshgrid(torch.arange(24), torch.arange(32), indexing="ij")
    source = torch.stack([rows, columns, rows]).expand(2, 3, 24, 32).to(torch.uint8)
    source_labels = ((rows // 5 + columns // 7) % 5).expand(2, 24, 32)  # classes 0-4 in a checkerboard
    for seed in range(4):
        images, labels = class_mix((source, source_labels), (target, target_labels), torch.Generator().manual_seed(seed))
        for i in range(2):
            pasted = labels[i] != target_labels[i]
            offsets = images[i][0][pasted] - rows[:16][pasted]
            assert len(offsets.unique()) == 1 and 0 <= int(offsets[0]) <= 8  # one crop, inside the source
            from_row, from_column = images[i][0][pasted].long(), images[i][1][pasted].long()
            assert torch.equal(labels[i][pasted], source_labels[i, from_row, from_column])


def test_class_mix_resizes_a_smaller_source():
    source, (target, target_labels, _) = _mix_batches(source_height=8)
    images, labels = class_mix(source, (target, target_labels), torch.Generator().manual_seed(1))
    assert images.shape == target.shape and labels.shape == target_labels.shape
    pasted = labels != target_labels
    assert bool(pasted.any()) and set(labels[pasted].tolist()) <= {0, 1, 2, 3, 4}



def test_fourier_style_swaps_the_amplitudes_of_the_low_band_only():
    """Inside the band (|f| < b = floor(beta * min(H, W)) cycles per image on both axes) the spectrum
    takes the style's amplitude with the image's phase; outside it stays the image's."""
    g = torch.Generator().manual_seed(2)
    images, style = torch.rand(2, 3, 32, 48, generator=g) * 60 + 100, torch.rand(2, 3, 32, 48, generator=g) * 60 + 100
    styled = fourier_style(images, style, beta=0.15)  # b = 4
    spectrum, source, target = torch.fft.fft2(styled), torch.fft.fft2(images), torch.fft.fft2(style)
    low = (torch.fft.fftfreq(32, 1 / 32).abs() < 4)[:, None] & (torch.fft.fftfreq(48, 1 / 48).abs() < 4)[None, :]
    assert int(low.sum()) == 49
    assert torch.allclose(spectrum.abs()[..., low], target.abs()[..., low], rtol=1e-3, atol=1e-1)
    assert torch.allclose(torch.cos(spectrum.angle() - source.angle())[..., low], torch.ones(2, 3, 49), atol=1e-3)
    assert torch.allclose(spectrum[..., ~low], source[..., ~low], atol=1e-1)


def test_fourier_style_narrowest_band_swaps_the_mean_colour_of_style_i_mod_m():
    columns = torch.arange(48) // 2 % 2 * 40.0
    images = torch.stack([(level + columns).expand(3, 32, 48) for level in (60, 100, 20)])
    styles = torch.full((2, 3, 16, 24), 150.0)  # another size: resized; two styles for three images
    styles[0, 0], styles[1, 2] = 90.0, 30.0
    styled = fourier_style(images, styles, beta=0.01)  # b = 1: the mean only
    assert styled.shape == images.shape and styled.dtype == torch.float32
    expected = torch.tensor([[90.0, 150, 150], [150, 150, 30], [90, 150, 150]])
    assert torch.allclose(styled.mean(dim=(2, 3)), expected, atol=1e-3)
    detail = images - images.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(styled - styled.mean(dim=(2, 3), keepdim=True), detail, atol=1e-3)


def test_class_colours_recolours_each_class_on_its_own_and_leaves_ignored_pixels():
    """Flat grey bands of 8 classes and an ignored band: a recoloured band stays one colour (the
    class's own draw), about half of the bands change, ignored pixels never, and the draws are seeded."""
    labels = torch.arange(9).repeat_interleave(4)[None, None].expand(6, 8, 36).clone()
    labels[labels == 8] = IGNORE
    images = torch.full((6, 3, 8, 36), 120, dtype=torch.uint8)
    images[:, 0] = 160  # a colour, so that saturation and hue act
    out = class_colours(images, labels, torch.Generator().manual_seed(4))
    assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 255
    assert torch.equal(out, class_colours(images, labels, torch.Generator().manual_seed(4)))
    assert torch.equal(out[..., 32:], images[..., 32:].float())  # the ignored band
    changed = []
    for band in range(8):
        pixels = out[..., band * 4:(band + 1) * 4].flatten(2)  # (6, 3, 32)
        assert torch.allclose(pixels, pixels[..., :1].expand_as(pixels), atol=1e-4)  # one colour per band
        changed += ((pixels[..., 0] - images[:, :, 0, 0].float()).abs().amax(1) > 0.5).tolist()
    assert 0.3 < sum(changed) / len(changed) < 0.7  # CLASS_CHANCE of the 48 (image, class) pairs
    colours = {tuple(out[i, :, 0, band * 4].round().tolist()) for i in range(6) for band in range(8)}
    assert len(colours) > 15  # each pair its own draw
