"""Selection and thresholds of a round on the driver (stages/select.py): pure, no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from sisray.config import load_config
from sisray.rundir import RoundDir
from sisray.stages.select import select_and_threshold


def _config(root, *extra):
    return load_config(None, ["data.target.name=synthetic", f"data.target.root={root}", "tracking.enabled=false",
                              *extra])


@pytest.mark.parametrize("method, images, why", [
    ("classwise", 75, "class-wise selection takes floor(N_c x 0.2 / 19) images per class and the most frequent "
                      "class is predicted in 75 image(s) (needs 95)"),
    ("global", 4, "global selection takes 0.2 of 4 scored image(s)")])
def test_a_round_that_selects_nothing_says_why(tmp_path, capsys, method, images, why):
    rng = np.random.default_rng(0)
    counts = np.zeros((images, 19), np.int64)
    counts[:, :3] = rng.integers(1, 50, (images, 3))
    tables = {"counts": counts, "scores": rng.random((images, 19)), "sample_id": np.arange(images).astype(str),
              "mean_entropy": rng.random((images, 19))}
    cfg = _config(tmp_path, f"lse.selection={method}")
    selected, _ = select_and_threshold(cfg, tables, 0.2, RoundDir(tmp_path))
    assert selected == []
    assert f"warning: the round with p = 0.2 selected no image, so it has no pseudo-labels to train on: {why}" \
        in capsys.readouterr().out
