from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from layouts import write_pickle_with_code
from lineage import LineageDeepLab, trained_looking

import sisray.models as models
from sisray.errors import ModelError
from sisray.models import build_model, load_checkpoint
from sisray.models.common import caffe_input, fold_torchvision_normalisation
from sisray.models.deeplabv2 import DeepLabV2
from sisray.models.fcn8s import FCN8s


@pytest.mark.parametrize("name", ["fcn8s_vgg16", "deeplabv2_r101"])
@pytest.mark.parametrize("size", [(37, 53), (64, 97), (128, 256)])
def test_logits_have_the_input_size_for_odd_sizes(name, size):
    model = build_model(name, num_classes=19, width=0.0625).eval()
    images = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
    assert out.shape == (2, 19, *size)
    assert torch.isfinite(out).all()


def test_fcn8s_state_dict_names_and_shapes_at_full_width():
    with torch.device("meta"):
        state = FCN8s(num_classes=19, width=1.0).state_dict()
    convs = [f"conv{s}_{i}" for s, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1)]
    expected = {f"{m}.{k}" for m in convs + ["fc6", "fc7", "score_fr", "score_pool3", "score_pool4"] for k in ("weight", "bias")}
    expected |= {"upscore2.weight", "upscore8.weight", "upscore_pool4.weight", "skip_scales", "label_space.allowed"}
    assert set(state) == expected
    shapes = {"conv1_1.weight": (64, 3, 3, 3), "conv5_3.weight": (512, 512, 3, 3), "fc6.weight": (4096, 512, 7, 7),
              "fc7.weight": (4096, 4096, 1, 1), "score_fr.weight": (19, 4096, 1, 1),
              "score_pool3.weight": (19, 256, 1, 1), "score_pool4.weight": (19, 512, 1, 1),
              "upscore2.weight": (19, 19, 4, 4), "upscore_pool4.weight": (19, 19, 4, 4), "upscore8.weight": (19, 19, 16, 16)}
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key


def test_fcn8s_conv1_pads_100_and_upsamplers_are_fixed_bilinear():
    model = FCN8s(width=0.0625)
    assert model.conv1_1.padding == (100, 100)
    for layer in (model.upscore2, model.upscore_pool4, model.upscore8):
        assert not layer.weight.requires_grad
    flat = torch.ones(1, 19, 6, 6)
    up = model.upscore2(flat)
    assert torch.allclose(up[:, :, 2:-2, 2:-2], torch.ones_like(up[:, :, 2:-2, 2:-2]))  # bilinear: constant stays constant


def test_fcn8s_skips_carry_signal_unless_the_checkpoint_is_caffe_converted(tmp_path):
    torch.manual_seed(0)
    model = FCN8s(width=0.0625).eval()
    for layer in (model.score_fr, model.score_pool3, model.score_pool4):
        torch.nn.init.normal_(layer.weight)
    images = torch.randint(0, 256, (1, 3, 64, 64)).float()
    with torch.no_grad():
        full = model(images)
        model.score_pool3.weight.zero_()  # the pool3 skip's share of the logits
        share = (full - model(images)).abs().mean() / full.abs().mean()
    assert share > 0.05  # at scale 1e-4 (the Caffe value) it would be ~1e-4
    reference = {k: v for k, v in model.state_dict().items() if k != "skip_scales"}  # as published checkpoints are
    torch.save(reference, tmp_path / "caffe.pt")
    caffe = FCN8s(width=0.0625)
    load_checkpoint(caffe, tmp_path / "caffe.pt")
    assert caffe.skip_scales.tolist() == pytest.approx([0.01, 1e-4])
    torch.save(FCN8s(width=0.0625).state_dict(), tmp_path / "ours.pt")  # trained here: the scaling is saved with it
    load_checkpoint(caffe, tmp_path / "ours.pt")
    assert caffe.skip_scales.tolist() == [1.0, 1.0]


def test_deeplab_state_dict_names_and_shapes_at_full_width():
    with torch.device("meta"):
        model = DeepLabV2(num_classes=19, width=1.0)
    state = model.state_dict()
    for key in ("conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var", "layer3.22.conv3.weight",
                "layer4.2.bn3.weight"):
        assert key in state, key
    assert "layer3.23.conv1.weight" not in state  # ResNet-101: 23 blocks in layer3
    for k in range(4):
        assert tuple(state[f"layer5.conv2d_list.{k}.weight"].shape) == (19, 2048, 3, 3)
    assert [c.dilation for c in model.layer5.conv2d_list] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert model.layer3[5].conv2.dilation == (2, 2) and model.layer4[1].conv2.dilation == (4, 4)
    assert model.layer2[0].conv1.stride == (2, 2)  # caffe-style: the stride is in the first 1x1


def test_deeplab_output_stride_8_and_aspp_sums_all_four_branches():
    model = DeepLabV2(num_classes=3, width=0.0625).eval()
    seen = {}
    model.layer5.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    for k, conv in enumerate(model.layer5.conv2d_list):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.constant_(conv.bias, 2.0 ** k)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 96))
    assert seen["shape"][-2:] == (9, 13)  # stride 8; the Caffe model's ceil-mode pooling adds one
    assert torch.allclose(out, torch.full_like(out, 15.0))  # 1 + 2 + 4 + 8


def test_deeplab_batchnorm_trains_as_the_lineage_does(tmp_path):
    """Affine parameters fixed; in training mode the batch's statistics normalise and the running ones
    move (momentum 0.1), as in the lineage's model.train(); eval mode uses the running ones."""
    lineage = trained_looking(LineageDeepLab(base=4))
    torch.save(lineage.state_dict(), tmp_path / "lineage.pth")
    ours = build_model("deeplabv2_r101", width=0.0625, init=str(tmp_path / "lineage.pth"))
    assert not any("bn" in name for name, p in ours.named_parameters() if p.requires_grad)
    images = torch.randint(0, 256, (2, 3, 40, 48)).float()
    lineage.train(), ours.train()
    assert torch.allclose(ours(images), lineage(images), atol=1e-4)
    assert torch.allclose(ours.layer3[7].bn2.running_mean, lineage.layer3[7].bn2.running_mean, atol=1e-6)
    assert not torch.equal(ours.layer3[7].bn2.running_mean, trained_looking(LineageDeepLab(base=4)).layer3[7].bn2.running_mean)
    lineage.eval(), ours.eval()
    assert torch.allclose(ours(images), lineage(images), atol=1e-4)


def test_caffe_input_is_bgr_minus_mean():
    images = torch.zeros(1, 3, 1, 1)
    images[0, :, 0, 0] = torch.tensor([10.0, 20.0, 30.0])  # R, G, B
    out = caffe_input(images)[0, :, 0, 0]
    assert torch.allclose(out, torch.tensor([30 - 104.00699, 20 - 116.66877, 10 - 122.67892]))


# ------------------------------------------------------------------ checkpoints

def test_checkpoint_round_trip_from_directory_and_file(tmp_path):
    model = build_model("fcn8s_vgg16", width=0.0625)
    (tmp_path / "ckpt").mkdir()
    torch.save(model.state_dict(), tmp_path / "ckpt" / "model.pt")
    for source in (tmp_path / "ckpt", tmp_path / "ckpt" / "model.pt"):
        again = build_model("fcn8s_vgg16", width=0.0625, init=str(source))
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_checkpoint_with_another_class_count_is_refused_naming_keys(tmp_path):
    torch.save(build_model("fcn8s_vgg16", num_classes=16, width=0.0625).state_dict(), tmp_path / "m.pt")
    with pytest.raises(ModelError) as err:
        build_model("fcn8s_vgg16", num_classes=19, width=0.0625, init=str(tmp_path / "m.pt"))
    message = str(err.value)
    assert str(tmp_path / "m.pt") in message and "19 classes" in message
    assert "score_fr.weight (16, 256, 1, 1) vs (19, 256, 1, 1)" in message


def test_checkpoint_of_another_model_is_refused(tmp_path):
    torch.save(build_model("deeplabv2_r101", width=0.0625).state_dict(), tmp_path / "m.pt")
    with pytest.raises(ModelError, match=r"missing keys: conv1_1.bias, conv1_1.weight.*unexpected keys: bn1.bias"):
        load_checkpoint(build_model("fcn8s_vgg16", width=0.0625), tmp_path / "m.pt")


def test_a_file_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    write_pickle_with_code(path, marker)
    with pytest.raises(ModelError, match=rf"{path}: not a loadable PyTorch state dict"):
        build_model("fcn8s_vgg16", width=0.0625, init=str(path))
    assert not marker.exists()
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ModelError, match="not a loadable PyTorch state dict"):
        build_model("fcn8s_vgg16", width=0.0625, init=str(text))
    with pytest.raises(ModelError, match=r"checkpoint not found: .*missing.pt.*under `ray job submit` a relative path"):
        build_model("fcn8s_vgg16", width=0.0625, init=str(tmp_path / "missing.pt"))


def test_ddp_prefix_and_batchnorm_counters_are_accepted(tmp_path):
    model = build_model("deeplabv2_r101", width=0.0625)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.bn1.num_batches_tracked"] = torch.tensor(7)  # saved from nn.BatchNorm2d
    torch.save(state, tmp_path / "m.pt")
    load_checkpoint(build_model("deeplabv2_r101", width=0.0625), tmp_path / "m.pt")


# ------------------------------------------------------------------ ImageNet

class _FakeWeights:
    url = "https://example.invalid/vgg16.pth"

    def __init__(self, state=None, error=None):
        self.state, self.error = state, error

    def get_state_dict(self, progress=False):
        if self.error:
            raise self.error
        return self.state


def test_imagenet_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(models, "_imagenet_weights", lambda name: _FakeWeights(error=urllib.error.URLError("offline")))
    with pytest.raises(ModelError, match=r"cannot download the ImageNet weights of fcn8s_vgg16 from https://example.invalid"):
        build_model("fcn8s_vgg16", width=1.0, init="imagenet")
    with pytest.raises(ModelError, match="needs model.width = 1"):
        build_model("fcn8s_vgg16", width=0.5, init="imagenet")


def test_imagenet_vgg16_weights_load_with_normalisation_folded(monkeypatch):
    import torchvision

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    monkeypatch.setattr(models, "_imagenet_weights", lambda name: _FakeWeights(state=vgg.state_dict()))
    model = build_model("fcn8s_vgg16", width=1.0, init="imagenet")
    assert torch.equal(model.conv3_1.weight, vgg.features[10].weight)
    assert torch.equal(model.fc6.weight.flatten(1), vgg.classifier[0].weight)
    images = torch.randint(0, 256, (1, 3, 9, 9)).float()
    tv_input = (images / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    expected = F.conv2d(tv_input, vgg.features[0].weight, vgg.features[0].bias)
    ours = F.conv2d(caffe_input(images), model.conv1_1.weight, model.conv1_1.bias)
    assert torch.allclose(ours, expected, atol=1e-4)


def test_fold_for_bias_free_first_layer():
    weight = torch.randn(4, 3, 3, 3)
    new, offset = fold_torchvision_normalisation(weight)
    images = torch.randint(0, 256, (1, 3, 5, 5)).float()
    tv_input = (images / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert torch.allclose(F.conv2d(caffe_input(images), new) + offset[None, :, None, None], F.conv2d(tv_input, weight), atol=1e-4)


@pytest.mark.parametrize("name", ["fcn8s_vgg16", "deeplabv2_r101"])
def test_a_model_predicts_only_its_label_space_and_checkpoints_keep_it(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, width=0.0625).eval()
    model.label_space.restrict((2, 7))
    images = torch.rand(2, 3, 40, 48) * 255
    with torch.no_grad():
        probs = model(images).softmax(1)
    assert set(probs.argmax(1).unique().tolist()) <= {2, 7}
    assert probs[:, [c for c in range(19) if c not in (2, 7)]].max() == 0  # softmax: exactly 0 outside
    assert torch.isfinite(-(probs * torch.log(probs + 1e-12)).sum(1)).all()  # entropy stays finite
    torch.save(model.state_dict(), tmp_path / "model.pt")
    reloaded = build_model(name, width=0.0625, init=str(tmp_path / "model.pt"))
    assert reloaded.label_space.allowed.nonzero().flatten().tolist() == [2, 7]


def test_a_checkpoint_made_before_label_spaces_predicts_every_class(tmp_path):
    state = build_model("fcn8s_vgg16", width=0.0625).state_dict()
    del state["label_space.allowed"]
    torch.save(state, tmp_path / "old.pt")
    assert bool(build_model("fcn8s_vgg16", width=0.0625, init=str(tmp_path / "old.pt")).label_space.allowed.all())


def test_precision_auto_is_bf16_under_cuda_only():
    from sisray.models.common import uses_bf16

    assert [uses_bf16(p, d) for p in ("auto", "fp32", "bf16") for d in ("cpu", "cuda")] == [
        False, True, False, False, True, True]


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_bf16_logits_give_a_softmax_computed_and_resampled_in_fp32(scale):
    """Entropies and thresholds read this softmax: under bf16 autocast only the network runs in bf16."""
    from sisray.models.common import autocast
    from sisray.models.inference import predict_probs

    torch.manual_seed(0)
    model = build_model("lraspp_lite0", init="random").eval()
    images = torch.rand(1, 3, 32, 64) * 255
    with torch.no_grad(), autocast("bf16", torch.device("cpu")):
        probs = predict_probs(model, images, (scale,))
        logits = model(images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="bilinear"))
    assert logits.dtype == torch.bfloat16 and probs.dtype == torch.float32
    expected = logits.float().softmax(1)
    if scale != 1:
        expected = F.interpolate(expected, size=(32, 64), mode="bilinear", align_corners=False)
    assert torch.equal(probs, expected)


def test_model_precision_reaches_the_training_step_and_the_model_actors(small_benchmark, fcn_checkpoint):
    """`model.precision: bf16` moves a training step's loss and an actor's softmax by bf16 rounding;
    `auto` on CPU is fp32 exactly (the paper presets' numerics)."""
    import copy

    from sisray.config import load_config
    from sisray.stages.actors import ActorSpec, ModelActor
    from sisray.stages.train_loop import training_step

    torch.manual_seed(0)
    net = build_model("fcn8s_vgg16", 19, 0.0625, str(fcn_checkpoint))  # its prediction is not uniform
    batch = (torch.rand(2, 3, 32, 64) * 255, torch.randint(0, 19, (2, 32, 64)))
    losses, probs = {}, {}
    for precision in ("fp32", "auto", "bf16"):
        step_net = copy.deepcopy(net)
        torch.manual_seed(1)  # the same dropout masks
        losses[precision] = training_step(step_net, torch.optim.SGD(step_net.parameters(), lr=0.1), batch, None,
                                          0.1, 3.0, precision)["loss"]
        cfg = load_config(None, ["data.target.name=synthetic", f"data.target.root={small_benchmark}",
                                 "data.target.size=[64, 32]", "model.init=random", "model.width=0.0625",
                                 f"model.precision={precision}"])
        threads = torch.get_num_threads()  # an actor sets its own: given back to this process
        probs[precision] = ModelActor(ActorSpec(cfg, str(fcn_checkpoint), 1, False)).teacher_probabilities([0, 1])[1]
        torch.set_num_threads(threads)
    assert losses["auto"] == losses["fp32"] and torch.equal(probs["auto"], probs["fp32"])
    assert losses["bf16"] != losses["fp32"] and losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
    assert probs["bf16"].dtype == torch.float32 and not torch.equal(probs["bf16"], probs["fp32"])
    assert (probs["bf16"] - probs["fp32"]).abs().max() < 0.1


# ------------------------------------------------------------------ the lineage's DeepLab-v2

def test_a_lineage_checkpoint_predicts_as_the_lineage_under_the_gta5_preset(tmp_path):
    """A checkpoint trained by the lineage's code summed two ASPP branches: loaded with the paper
    preset, sisray gives the lineage's predictions (summing all four agrees on ~90% of pixels here)."""
    from sisray.config import load_config
    from sisray.labels import NUM_CLASSES

    lineage = trained_looking(LineageDeepLab(base=4), seed=1)
    torch.save(lineage.state_dict(), tmp_path / "gta5_deeplab_resnet101_init.pth")
    cfg = load_config(Path(__file__).parents[1] / "configs" / "gta5_deeplabv2.yaml",
                      ["model.width=0.0625", f"model.source_checkpoint={tmp_path / 'gta5_deeplab_resnet101_init.pth'}"])
    ours = build_model(cfg.model.name, NUM_CLASSES, cfg.model.width, cfg.model.source_checkpoint).eval()
    images = torch.randint(0, 256, (2, 3, 64, 128)).float()
    with torch.no_grad():
        expected, got = lineage(images).argmax(1), ours(images).argmax(1)
    assert expected.unique().numel() >= 5  # a varied prediction
    assert (got == expected).float().mean() >= 0.99
    assert int(ours.layer5.branches) == 2 and not ours.layer5.conv2d_list[3].weight.requires_grad
    torch.save(ours.state_dict(), tmp_path / "saved_here.pt")  # carried on: the count is part of the state
    assert int(build_model(cfg.model.name, NUM_CLASSES, 0.0625, str(tmp_path / "saved_here.pt")).layer5.branches) == 2


def test_a_checkpoint_saved_here_before_the_branch_count_sums_four(tmp_path):
    state = build_model("deeplabv2_r101", width=0.0625).state_dict()
    for key in [k for k in state if k.endswith("num_batches_tracked")] + ["layer5.branches", "strides_in_3x3"]:
        del state[key]  # as saved with the former frozen BatchNorm
    torch.save(state, tmp_path / "old.pt")
    model = build_model("deeplabv2_r101", width=0.0625, init=str(tmp_path / "old.pt"))
    assert int(model.layer5.branches) == 4 and model.layer5.conv2d_list[3].weight.requires_grad


def test_the_lineage_initial_weights_load_without_their_classifier(tmp_path, caplog):
    """DeepLab_resnet_pretrained_init-f81d91e8.pth: keys prefixed `Scale.`, a 21-class classifier."""
    donor = trained_looking(LineageDeepLab(classes=21, base=4))
    torch.save({f"Scale.{k}": v for k, v in donor.state_dict().items()}, tmp_path / "init.pth")
    model = build_model("deeplabv2_r101", width=0.0625, init=str(tmp_path / "init.pth"))
    assert torch.equal(model.layer3[4].conv2.weight, donor.layer3[4].conv2.weight)
    assert torch.equal(model.layer4[2].bn3.running_var, donor.layer4[2].bn3.running_var)
    assert model.layer5.conv2d_list[0].weight.shape[0] == 19 and float(model.layer5.conv2d_list[0].weight.detach().std()) < 0.02
    assert "classifier of another task is not loaded" in caplog.text


def test_torchvision_weights_run_with_torchvision_strides(monkeypatch):
    """torchvision's ResNet-101 strides in the 3x3 convolution: layer2 computes what it computes there."""
    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet101(weights=None).eval()
    monkeypatch.setattr(models, "_imagenet_weights", lambda name: _FakeWeights(state=resnet.state_dict()))
    model = build_model("deeplabv2_r101", width=1.0, init="imagenet").eval()
    images = torch.randint(0, 256, (1, 3, 65, 65)).float()  # where ceil- and floor-mode pooling agree
    tv_input = (images / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        expected = resnet.layer2(resnet.layer1(resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(tv_input))))))
        h = model.maxpool(torch.relu(model.bn1(model.conv1(caffe_input(images)))))
        got = model.layer2(model.layer1(h))
    assert got.shape == expected.shape
    # the folded normalisation pads conv1 with the Caffe mean instead of ImageNet's: borders move a little
    assert torch.allclose(got, expected, atol=0.05, rtol=0.02)
    assert model.layer2[0].conv2.stride == (2, 2) and bool(model.strides_in_3x3)
