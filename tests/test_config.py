from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sisray.config import Config, config_from_dict, config_to_dict, load_config, save_config
from sisray.errors import ConfigError
from sisray.registry import MODELS, implementation

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_paper_reference():
    cfg = Config()
    assert (cfg.lse.p0, cfg.lse.p_step, cfg.lse.p_max) == (0.10, 0.05, 0.40)
    assert (cfg.lse.scale, cfg.lse.patches_per_image, cfg.lse.gamma, cfg.lse.beta) == (2.0, 4, 3.0, 0.1)
    assert cfg.data.source.size == (1280, 720) and cfg.data.target.size == (1024, 512)
    assert cfg.lse.threshold.estimator == "cutoff_image" and cfg.lse.selection == "classwise"


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(REPO / "configs" / "synthetic.yaml", ["lse.scale=1.5", "data.target.val_size=[128, 64]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert again.data.target.val_size == (128, 64)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_fixed_interface_keys_load():
    cfg = load_config(REPO / "configs" / "synthetic.yaml")
    assert cfg.data.source.name == "synthetic" and cfg.data.target.name == "synthetic"
    assert cfg.data.source.size == (256, 144)
    assert (cfg.model.name, cfg.model.init) == ("lraspp_lite0", "imagenet")  # the ImageNet-initialised CPU model
    assert cfg.lse.target_bn and cfg.lse.min_per_class > 0 and cfg.train.round_bn == "frozen"
    assert isinstance(cfg.seed, int) and cfg.run_dir


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["lse.scale=2.5", "seed=7", "tracking.enabled=false", "lse.threshold.estimator=window",
                             "model.init=/ckpt/source.pt", "train.lr=1e-6", "data.source.size=[64, 32]"])
    assert cfg.lse.scale == 2.5 and cfg.seed == 7 and cfg.tracking.enabled is False
    assert cfg.lse.threshold.estimator == "window" and cfg.model.init == "/ckpt/source.pt"
    assert cfg.train.lr == 1e-6  # YAML 1.1 reads 1e-6 as a string; a number field accepts it
    assert cfg.data.source.size == (64, 32)


def test_integer_accepted_for_float():
    assert load_config(None, ["lse.scale=3"]).lse.scale == 3.0


@pytest.mark.parametrize("override, message", [
    ("lse.scael=2", r"unknown key 'lse.scael'; lse allows: p0, p_step"),
    ("colour=red", r"unknown key 'colour'; the configuration allows: seed, run_dir"),
    ("lse.threshold.bogus=1", r"unknown key 'lse.threshold.bogus'"),
    ("lse.p0=0", r"lse.p0 = 0.0 is out of range: expected 0.0 < value <= 1.0"),
    ("lse.p0=1.5", r"lse.p0 = 1.5 is out of range: expected 0.0 < value <= 1.0"),
    ("lse.scale=0.5", r"lse.scale = 0.5 is out of range: expected 1.0 <= value"),
    ("lse.gamma=-1", r"lse.gamma = -1.0 is out of range: expected 0.0 <= value"),
    ("lse.patches_per_image=0", r"lse.patches_per_image = 0 is out of range: expected 1 <= value"),
    ("lse.patches_per_image=2.5", r"lse.patches_per_image = 2.5: expected an integer"),
    ("lse.threshold.quantile=1", r"lse.threshold.quantile = 1.0 is out of range: expected 0.0 < value < 1.0"),
    ("seed=abc", r"seed = 'abc': expected an integer"),
    ("seed=true", r"seed = True: expected an integer"),
    ("tracking.enabled=yes please", r"tracking.enabled = 'yes please': expected true or false"),
    ("lse.scale=nan", r"lse.scale = 'nan': expected a number"),
    ("lse.selection=best", r"lse.selection = 'best': expected one of 'classwise', 'global'"),
    ("model.name=unet", r"model.name = 'unet': expected one of 'fcn8s_vgg16', 'deeplabv2_r101'"),
    ("data.source.size=[256]", r"data.source.size = \[256\]: expected a list of 2 positive integers"),
    ("data.source.size=[256, -1]", r"data.source.size = \[256, -1\]: expected a list of 2 positive integers"),
    ("data.source.name=cityscapes", r"data.source.name = 'cityscapes': expected one of gta5, synthia, synthetic"),
    ("data.target.name=gta5", r"data.target.name = 'gta5': expected one of cityscapes, synthetic"),
    ("lse=3", r"lse: expected a mapping, got 3"),
    ("model.width=0", r"model.width = 0.0 is out of range: expected 0.0 < value <= 1.0"),
    ("train.lr=0", r"train.lr = 0.0 is out of range"),
    ("run_dir=''", r"run_dir is empty"),
    ("model.width=0.5", r"model.init = imagenet needs model.width = 1 \(got 0.5\)"),
])
def test_bad_values_name_the_key_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_batch_must_split_evenly_over_workers():
    with pytest.raises(ConfigError, match=r"train.batch_size = 6 does not split evenly over train.num_workers = 4"):
        load_config(None, ["train.batch_size=6", "train.num_workers=4"])
    assert load_config(None, ["train.batch_size=8", "train.num_workers=4"]).train.num_workers == 4


def test_schedule_must_not_be_empty():
    with pytest.raises(ConfigError, match=r"lse.p0 = 0.5 is above lse.p_max = 0.4"):
        load_config(None, ["lse.p0=0.5"])


@pytest.mark.parametrize("assignment, message", [
    ("lse.scale", r"expected key=value"),
    ("=3", r"expected key=value"),
    ("lse.scale.x=3", r"lse.scale is a value, not a section"),
    ("lse.scale=[1, 2", r"the value is not valid YAML"),
])
def test_malformed_overrides(assignment, message, tmp_path):
    raw = tmp_path / "c.yaml"
    raw.write_text("lse:\n  scale: 2.0\n")
    with pytest.raises(ConfigError, match=message):
        load_config(raw, [assignment])


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=rf"cannot read config file {tmp_path / 'missing.yaml'}"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lse: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"config file {bad} is not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(listed)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("lse:\n  p0: 2\n")
    with pytest.raises(ConfigError, match=rf"{wrong}: lse.p0 = 2.0 is out of range"):
        load_config(wrong)


def test_yaml_is_safe_loaded(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_every_preset_in_configs_loads():
    presets = sorted((REPO / "configs").glob("*.yaml"))
    assert presets
    for path in presets:
        load_config(path)
        assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_paper_presets_use_the_reference_values():
    sizes = {"gta5": (1280, 720), "synthia": (1280, 760)}
    for source in ("gta5", "synthia"):
        for model in ("vgg16", "deeplabv2"):
            cfg = load_config(REPO / "configs" / f"{source}_{model}.yaml")
            assert cfg.data.source.name == source and cfg.data.source.size == sizes[source]
            assert cfg.data.target.name == "cityscapes" and cfg.data.target.size == (1024, 512)
            assert cfg.model.name == {"vgg16": "fcn8s_vgg16", "deeplabv2": "deeplabv2_r101"}[model]
            assert cfg.model.source_checkpoint  # only the roots and this checkpoint need setting
            if model == "vgg16":  # the reference's released source model, by its file name
                assert Path(cfg.model.source_checkpoint).name == f"{source}_vggfcn_init.pth"
            assert cfg.model.precision == "fp32"  # the reference's numerics, on GPU too
            lse = cfg.lse
            assert (lse.p0, lse.p_step, lse.p_max, lse.scale, lse.patches_per_image) == (0.1, 0.05, 0.4, 2.0, 4)
            assert (lse.beta, lse.gamma, lse.selection, lse.threshold.estimator) == (0.1, 3.0, "classwise", "cutoff_image")
            assert (cfg.train.epochs_per_round, cfg.train.batch_size) == (2.0, 1)
            assert (lse.min_per_class, lse.target_bn, cfg.train.round_bn) == (0, False, "train")  # nothing beyond the paper
            recipe = implementation(MODELS, cfg.model.name).RECIPE
            assert (cfg.train.round_lr or cfg.train.lr or recipe.lr) == 1e-6  # the rounds' rate of LSE.py


def test_paths_are_made_absolute_for_ray_workers(tmp_path, monkeypatch):
    from sisray.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(load_config(None, ["data.source.root=data/gta", "model.init=ckpt/model.pt", "run_dir=runs/a"]))
    assert cfg.data.source.root == str(tmp_path / "data" / "gta")
    assert cfg.data.target.root == str(tmp_path / "data" / "cityscapes")
    assert cfg.model.init == str(tmp_path / "ckpt" / "model.pt") and cfg.run_dir == str(tmp_path / "runs" / "a")
    assert with_absolute_paths(load_config(None, ["model.init=random"])).model.init == "random"


@pytest.mark.parametrize("source, images", [("gta5", 24966), ("synthia", 9400)])
def test_deeplab_source_presets_train_as_the_lineage(source, images):
    """150000 steps of batch 1 on a 250000-step poly schedule at 2.5e-4 (SGD, the classifier 10x),
    from the lineage's initial weights; the adaptation preset reads the checkpoint it writes."""
    from sisray.models.deeplabv2 import DeepLabV2
    from sisray.optim import make_optimizer
    from sisray.stages.train import source_steps

    cfg = load_config(REPO / "configs" / f"{source}_deeplabv2_source.yaml")
    adapt = load_config(REPO / "configs" / f"{source}_deeplabv2.yaml")
    assert cfg.data == adapt.data and cfg.model.name == adapt.model.name
    assert cfg.model.init.endswith("DeepLab_resnet_pretrained_init-f81d91e8.pth")
    assert adapt.model.source_checkpoint == f"{cfg.run_dir}/source/checkpoint"
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.photometric, cfg.train.holdout) == (1, None, False, 0.0)
    steps, schedule = source_steps(cfg, images)
    assert (steps, schedule) == (150000, 250000)
    optimizer, scheduler = make_optimizer(DeepLabV2(width=0.0625), cfg.train.lr, schedule)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2.5e-4, 2.5e-3])
    assert scheduler.lr_lambdas[0](steps - 1) == pytest.approx((1 - (steps - 1) / 250000) ** 0.9)  # the last step's
