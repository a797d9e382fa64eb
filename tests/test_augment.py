from __future__ import annotations

import torch

from sisray.augment import photometric


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
