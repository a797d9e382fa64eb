"""The loaders work inside Ray Data actors: paths on the driver, pixels only in the actors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from ray import cloudpickle

from sisray.datasets.synthetic import SyntheticTarget

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules


class ClassCounter:
    """Opens the dataset once per actor, as the scoring stage will."""

    def __init__(self, root: str, size: tuple[int, int]):
        self.dataset = SyntheticTarget(root, "train", size)

    def __call__(self, batch: dict) -> dict:
        counts = [np.bincount(self.dataset.load_label(int(i)).numpy().ravel(), minlength=256) for i in batch["index"]]
        return {"index": batch["index"], "counts": np.stack(counts)}


def test_dataset_loads_in_ray_data_actors(ray_session, small_benchmark):
    ray = ray_session
    size = (96, 48)
    local = SyntheticTarget(small_benchmark, "train", size)
    ds = ray.data.from_items([{"index": i} for i in range(len(local))])
    out = ds.map_batches(ClassCounter, fn_constructor_kwargs={"root": str(small_benchmark), "size": size},
                         compute=ray.data.ActorPoolStrategy(size=2), batch_size=1, num_cpus=0.5)
    rows = sorted(out.take_all(), key=lambda r: r["index"])
    assert [r["index"] for r in rows] == list(range(len(local)))
    for r in rows:
        expected = np.bincount(local.load_label(int(r["index"])).numpy().ravel(), minlength=256)
        assert np.array_equal(r["counts"], expected)
