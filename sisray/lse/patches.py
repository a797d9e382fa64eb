"""Scale-invariant examples (docs/METHOD.md step 4): pseudo-labels transferred to scaled-up patches.

For a selected image: draw n boxes of (H/s, W/s) at uniformly random pixel positions; the patch
label is the argmax of the crop of the *soft* prediction upsampled by s (bilinear,
align_corners=True), and IGNORE where the equally upsampled keep-mask is exactly 0; the patch image
is the same crop upsampled the same way. Labels come from the prediction at the original scale,
never from a prediction on the patch.

A box is stored in fractions of the image, so the training example can be rebuilt later from the
full-resolution image (`crop_and_scale`) with the same label.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sisray.labels import IGNORE
from sisray.lse.entropy import normalise_per_class, pixel_entropy


@dataclass(frozen=True)
class Box:
    """Where a patch comes from, in fractions of the image height and width. `scale` > 1 zooms in
    (the box is cut out and enlarged to the output size); `zoom_out` shrinks the whole image into
    the box of an otherwise ignored output."""
    top: float
    left: float
    height: float
    width: float
    scale: float
    zoom_out: bool = False

    def pixels(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) in pixels of an image of the given size."""
        return (round(self.top * height), round(self.left * width),
                max(1, round(self.height * height)), max(1, round(self.width * width)))


@dataclass
class Example:
    box: Box
    label: torch.Tensor  # (H, W) int64 at the output size, IGNORE where no pseudo-label
    image: torch.Tensor  # (3, H, W) float, the patch image at the output size


def keep_mask(normalised_entropy: torch.Tensor, prediction: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """True where a pixel's normalised entropy is below the threshold of its predicted class."""
    return normalised_entropy < tau.to(normalised_entropy.device)[prediction]


def pseudo_label_mask(probs: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """(C, H, W) softmax -> (H, W) bool: the pixels whose entropy, normalised within their image and
    predicted class, is below tau of that class (step 3); the others get no pseudo-label."""
    prediction = probs.max(0).indices
    normalised = normalise_per_class(pixel_entropy(probs[None]), prediction[None], probs.shape[0])[0]
    return keep_mask(normalised, prediction, tau)


def draw_boxes(height: int, width: int, scales: Sequence[float], n: int, generator: torch.Generator,
               zoom_out: bool = False) -> list[Box]:
    """n boxes per scale at uniformly random integer positions (a pure function of the generator)."""
    boxes = []
    for scale in scales:
        h, w = max(1, round(height / scale)), max(1, round(width / scale))
        for _ in range(n):
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            boxes.append(Box(top / height, left / width, h / height, w / width, float(scale), zoom_out))
    return boxes


def _resample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=True (the label transfer's geometry); antialiased where it shrinks, so
    that a crop larger than the output (scale < the full/working ratio, or zoom-out) is not aliased."""
    shrinks = size[0] < maps.shape[-2] or size[1] < maps.shape[-1]
    return F.interpolate(maps[None].float(), size=size, mode="bilinear", align_corners=True, antialias=shrinks)[0]


def crop_and_scale(maps: torch.Tensor, box: Box, size: tuple[int, int], fill: float = 0.0) -> torch.Tensor:
    """(K, H, W) maps of any resolution -> (K, *size): the box's crop enlarged to `size`, or with
    `zoom_out` the whole map shrunk into the box and `fill` around it."""
    if not box.zoom_out:
        top, left, h, w = box.pixels(*maps.shape[-2:])
        return _resample(maps[:, top:top + h, left:left + w], size)
    top, left, h, w = box.pixels(*size)
    out = torch.full((maps.shape[0], *size), fill, dtype=torch.float32, device=maps.device)
    out[:, top:top + h, left:left + w] = _resample(maps, (h, w))
    return out


def _source_grid(box: Box, shape: tuple[int, int], size: tuple[int, int]):
    """For each output row / column: the two source indices and the weight of the second
    (bilinear, align_corners=True), inside the box's crop of a map of `shape`."""
    top, left, h, w = box.pixels(*shape)
    axes = []
    for start, n_in, n_out in ((top, h, size[0]), (left, w, size[1])):
        position = torch.arange(n_out, dtype=torch.float64) * ((n_in - 1) / max(n_out - 1, 1))
        low = position.floor().long().clamp(max=n_in - 1)
        high = (low + 1).clamp(max=n_in - 1)
        axes.append((start + low, start + high, (position - low).float()))
    return axes


def transfer_label(probs: torch.Tensor, keep: torch.Tensor, box: Box, size: tuple[int, int],
                   prediction: torch.Tensor | None = None, channels_last: torch.Tensor | None = None) -> torch.Tensor:
    """Argmax of the resampled soft prediction; IGNORE where the resampled keep-mask is exactly 0.

    Zoom-in boxes take a fast exact path: where the four source pixels of an output pixel share one
    argmax k, the bilinear mix of their probabilities has its maximum at k too (each term favours k),
    so only pixels on class boundaries need the 19-channel interpolation. A caller drawing several
    patches passes probs' argmax (`prediction`) and an (H, W, C) contiguous copy (`channels_last`)
    once, instead of each call computing them.
    """
    mask = crop_and_scale(keep[None].float(), box, size)[0]  # one channel: cheap, and the definition
    if box.zoom_out:
        label = crop_and_scale(probs, box, size).argmax(0)
        return torch.where(mask == 0, torch.full_like(label, IGNORE), label)
    (y0, y1, fy), (x0, x1, fx) = (tuple(t.to(probs.device) for t in axis)
                                  for axis in _source_grid(box, tuple(probs.shape[-2:]), size))
    fy, fx = fy[:, None], fx[None, :]
    corners = [(y0[:, None], x0[None, :], (1 - fy) * (1 - fx)), (y0[:, None], x1[None, :], (1 - fy) * fx),
               (y1[:, None], x0[None, :], fy * (1 - fx)), (y1[:, None], x1[None, :], fy * fx)]
    argmax = probs.max(0).indices if prediction is None else prediction
    labels = [argmax[y, x] for y, x, _ in corners]
    label = labels[0].clone()
    boundary = (labels[0] != labels[1]) | (labels[0] != labels[2]) | (labels[0] != labels[3])
    if boundary.any():
        rows, cols = boundary.nonzero(as_tuple=True)
        table = probs.permute(1, 2, 0).contiguous() if channels_last is None else channels_last
        mixed = sum(table[y.expand_as(boundary)[rows, cols], x.expand_as(boundary)[rows, cols]]
                    * weight.expand_as(boundary)[rows, cols, None] for y, x, weight in corners)
        label[rows, cols] = mixed.max(1).indices
    return torch.where(mask == 0, torch.full_like(label, IGNORE), label)


def transfer_ground_truth(truth: torch.Tensor, box: Box, size: tuple[int, int], num_classes: int) -> torch.Tensor:
    """(H, W) ground-truth class ids at the working size (IGNORE where unlabelled) -> (*size), resampled
    exactly as a pseudo-label is (`transfer_label` of its one-hot map): a teacher that predicts the
    ground truth agrees with it on every pixel. For the pseudo-label accuracy diagnostic."""
    labelled = truth != IGNORE
    one_hot = F.one_hot(torch.where(labelled, truth, 0), num_classes).permute(2, 0, 1).float() * labelled
    return transfer_label(one_hot, labelled, box, size)


def scale_invariant_examples(image: torch.Tensor, probs: torch.Tensor, keep: torch.Tensor,
                             scales: Sequence[float], n: int, generator: torch.Generator,
                             zoom_out: bool = False,
                             predict: Callable[[torch.Tensor], torch.Tensor] | None = None,
                             delta: float = 0.0, full: torch.Tensor | None = None) -> list[Example]:
    """The scale-invariant examples of one image.

    image (3, H, W), probs (C, H, W) and keep (H, W) are at the working size; the examples are too.
    An example's image is cut from `full` (the full-resolution image, as training rebuilds it;
    default: `image`), so what `predict` sees here is what training sees.
    With `predict` (images (N, 3, H, W) -> softmax (N, C, H, W)), a candidate is kept only if the
    model's own prediction on the patch image has a mean entropy at least `delta` above that of the
    transferred soft label: the model is unsure at that scale, where the example teaches most.
    """
    size = tuple(probs.shape[-2:])
    boxes = draw_boxes(*size, scales, n, generator, zoom_out)
    prediction, channels_last = probs.max(0).indices, probs.permute(1, 2, 0).contiguous()
    examples = [Example(box, transfer_label(probs, keep, box, size, prediction, channels_last),
                        crop_and_scale(image if full is None else full, box, size)) for box in boxes]
    if predict is None or not examples:
        return examples
    own = pixel_entropy(predict(torch.stack([e.image for e in examples]))).mean(dim=(1, 2))
    transferred = torch.stack([pixel_entropy(crop_and_scale(probs, e.box, size)[None])[0].mean() for e in examples])
    return [e for e, gap in zip(examples, (own - transferred).tolist()) if gap >= delta]
