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


def test_classes_the_source_never_labels_are_skipped_and_never_kept(tmp_path):
    """SYNTHIA labels neither terrain, truck nor train: they select no image, get no ranking, and a
    threshold of 0 (normalised entropy is never below it), whatever their scores."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from sisray.labels import CLASS_NAMES, EVAL_SETS
    from sisray.stages.label_space import unlabelled

    cfg = _config(tmp_path, "data.source.name=synthia", "lse.min_per_class=1")
    skip = unlabelled(EVAL_SETS[16])
    assert [CLASS_NAMES[c] for c in skip] == ["terrain", "truck", "train"]
    rng = np.random.default_rng(1)
    images = 8
    counts = rng.integers(1, 50, (images, 19))
    scores = rng.random((images, 19))
    scores[:, list(skip)] = 2.0  # the most confident classes of all: still skipped
    tables = {"counts": counts, "scores": scores, "sample_id": np.arange(images).astype(str),
              "mean_entropy": rng.random((images, 19))}
    bins = cfg.lse.threshold.bins
    histograms = rng.integers(0, 9, (images, 19, bins)).tolist()
    folder = RoundDir(tmp_path / "round_01")
    folder.path.mkdir()
    pq.write_table(pa.table({"index": np.arange(images), "histograms": histograms}), folder.scores)

    selected, tau = select_and_threshold(cfg, tables, 0.2, folder, skip)
    assert selected  # the other classes select images (one each at least)
    cutoffs = json.loads(folder.selection.read_text())["cutoffs"]
    assert not {"terrain", "truck", "train"} & set(cutoffs) and len(cutoffs) == 16
    assert all(tau[c] == 0.0 for c in skip) and all(0 < tau[c] < 1 for c in range(19) if c not in skip)
    assert json.loads(folder.thresholds.read_text())["tau"]["truck"] == 0.0
