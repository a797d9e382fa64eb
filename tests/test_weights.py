"""The shipped source model (sisray/weights): checked before use, used only on the source images it
was trained on. Its end-to-end use: tests/test_adapt.py (the job without arguments)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sisray import weights
from sisray.config import load_config
from sisray.datasets.synthetic import CLASSES, MANIFEST
from sisray.errors import ConfigError, DatasetError, ModelError

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "configs" / "synthetic.yaml"


def test_the_default_adapts_the_shipped_model_a_checked_file_of_the_benchmarks_13_classes():
    cfg = load_config(DEFAULT)
    assert cfg.model.source_checkpoint == "shipped:synthetic"
    path = weights.checkpoint_location(cfg.model.source_checkpoint)
    assert Path(path).is_relative_to(REPO / "sisray" / "weights")
    state = torch.load(path, weights_only=True)
    assert state["label_space.allowed"].nonzero().flatten().tolist() == list(CLASSES)
    # what workers read: the file, whatever the job's working directory
    from sisray.config import with_absolute_paths
    assert with_absolute_paths(cfg).model.source_checkpoint == path
    assert weights.checkpoint_location("some/model.pt") == str(Path("some/model.pt").resolve())


def test_an_unknown_shipped_name_is_a_config_error():
    with pytest.raises(ConfigError, match="model.source_checkpoint = 'shipped:gta5': no such shipped model; "
                                          "expected one of shipped:synthetic"):
        load_config(DEFAULT, ["model.source_checkpoint=shipped:gta5"])


def test_a_damaged_shipped_file_is_refused_with_its_expected_sha256(tmp_path, monkeypatch):
    damaged = tmp_path / "weights"
    damaged.mkdir()
    original = Path(weights.shipped_path.__wrapped__("shipped:synthetic"))
    data = bytearray(original.read_bytes())
    data[len(data) // 2] ^= 1  # one bit
    (damaged / original.name).write_bytes(bytes(data))
    monkeypatch.setattr(weights.resources, "files", lambda package: damaged)
    with pytest.raises(ModelError, match=f"has sha256 .*, expected {weights.SHIPPED['synthetic'].sha256}"):
        weights.shipped_path.__wrapped__("shipped:synthetic")
    (damaged / original.name).unlink()
    with pytest.raises(ModelError, match="is missing from the installed sisray"):
        weights.shipped_path.__wrapped__("shipped:synthetic")


def test_the_shipped_model_refuses_source_images_it_was_not_trained_on(small_benchmark, tmp_path):
    """The tests' small benchmark (other settings) and a GTA5 source are refused before any work;
    a benchmark written with the default's source settings is accepted, whatever its target."""
    from sisray.inputs import check_inputs

    cfg = load_config(DEFAULT, [f"data.source.root={small_benchmark}", f"data.target.root={small_benchmark}"])
    with pytest.raises(DatasetError, match=f"data.source \\(synthetic at {small_benchmark}\\) holds other images"):
        check_inputs(cfg)
    with pytest.raises(DatasetError, match="data.source \\(gta5 at"):
        weights.check_shipped_source("shipped:synthetic", load_config(DEFAULT, ["data.source.name=gta5"]).data.source)

    alike = tmp_path / "alike"  # the default's source settings in the manifest (the images are not read)
    alike.mkdir()
    manifest = json.loads((small_benchmark / MANIFEST).read_text())
    manifest["spec"].update(weights.SHIPPED["synthetic"].source_spec, look="fog", n_target_train=48)
    (alike / MANIFEST).write_text(json.dumps(manifest))
    weights.check_shipped_source("shipped:synthetic", load_config(DEFAULT, [f"data.source.root={alike}"]).data.source)
    manifest["spec"]["n_source"] = 599
    (alike / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="'n_source': 599"):
        weights.check_shipped_source("shipped:synthetic", load_config(DEFAULT, [f"data.source.root={alike}"]).data.source)
    shutil.rmtree(alike)
