"""How many Ray Train workers and Ray Data actors a stage asks for, and with what, on a cluster of
a given size (its resources stand in for `ray.cluster_resources()`: no Ray started)."""

from __future__ import annotations

import pytest

from sisray import cluster
from sisray.cluster import Actors, Workers, inference_actors, train_workers
from sisray.config import load_config
from sisray.errors import ConfigError


def _on(monkeypatch, cpus: float, gpus: float, *overrides: str):
    monkeypatch.setattr(cluster, "_cluster", lambda: (cpus, gpus))
    return load_config(None, list(overrides))


@pytest.mark.parametrize("cpus, gpus, overrides, expected", [
    (2, 0, ["train.batch_size=8"], Workers(2, False, 0.5, 1)),  # this machine: a worker per core, 1 thread each
    (16, 4, ["train.batch_size=8"], Workers(4, True, 0.5, 4)),  # a worker per GPU
    (16, 3, ["train.batch_size=8"], Workers(2, True, 0.5, 8)),  # 8 does not split over 3: 2 workers of 4 images
    (16, 4, ["train.batch_size=2"], Workers(2, True, 0.5, 8)),  # never more workers than images in a batch
    (16, 4, ["train.batch_size=8", "resources.device=cpu"], Workers(8, False, 0.5, 2)),  # GPUs left alone
    (16, 4, ["train.batch_size=8", "train.num_workers=2", "resources.cpus_per_worker=4"], Workers(2, True, 4.0, 8)),
])
def test_train_workers_take_a_gpu_each_or_share_the_cores(monkeypatch, cpus, gpus, overrides, expected):
    assert train_workers(_on(monkeypatch, cpus, gpus, *overrides)) == expected


@pytest.mark.parametrize("cpus, gpus, items, work_each, overrides, expected", [
    (2, 0, 100, 1, [], Actors(2, False, 1, 4, {"num_cpus": 0.5})),  # fractional CPUs leave room for read tasks
    (8, 4, 1000, 1, [], Actors(4, True, 2, 4, {"num_gpus": 1})),  # an actor per GPU
    (8, 4, 100, 1, [], Actors(2, True, 4, 4, {"num_gpus": 1})),  # at most one per 64 images of work
    (2, 0, 64, 1, [], Actors(1, False, 2, 4, {"num_cpus": 0.5})),  # a small pass: one actor, every thread
    (2, 0, 22, 3, [], Actors(2, False, 1, 4, {"num_cpus": 0.5})),  # 66 images of work
    (8, 4, 100, 1, ["resources.device=cpu", "resources.num_actors=3", "resources.actor_batch_size=2"],
     Actors(3, False, 2, 2, {"num_cpus": 0.5})),  # the count given
    (8, 0, 2, 1, ["resources.num_actors=3"], Actors(2, False, 4, 4, {"num_cpus": 0.5})),  # never more than images
])
def test_inference_actors_take_a_gpu_each_or_share_the_cores(monkeypatch, cpus, gpus, items, work_each, overrides,
                                                             expected):
    assert inference_actors(_on(monkeypatch, cpus, gpus, *overrides), items, work_each) == expected


def test_cuda_asked_of_a_cluster_without_gpus_is_a_clear_error(monkeypatch):
    cfg = _on(monkeypatch, 8, 0, "resources.device=cuda")
    with pytest.raises(ConfigError, match="resources.device = cuda, but the Ray cluster has no GPU"):
        train_workers(cfg)
    with pytest.raises(ConfigError, match="no GPU"):
        inference_actors(cfg, 10)


def test_a_cluster_is_measured_once_so_a_node_lost_mid_run_changes_no_later_stage(monkeypatch):
    """Stages are sized from the cluster as the job first saw it: after a node is lost, the next
    stage still splits its work as an uninterrupted run's would (tests/test_cluster.py loses nodes)."""
    import types

    import ray

    seen = {"CPU": 4.0}
    address = types.SimpleNamespace(gcs_address="10.0.0.1:6379")
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(seen))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: address)
    monkeypatch.setattr(cluster, "_SIZE", {})
    monkeypatch.setattr(cluster, "start_ray", lambda: None)  # the cluster stood in for: none started
    cfg = load_config(None, ["train.batch_size=8"])
    before = train_workers(cfg), inference_actors(cfg, 1000)
    seen["CPU"] = 2.0  # a node lost
    assert (train_workers(cfg), inference_actors(cfg, 1000)) == before
    assert before[0].count == 4 and before[1].count == 4
    address.gcs_address = "10.0.0.2:6379"  # another cluster is measured anew
    assert train_workers(cfg).count == 2


def test_fits_on_a_local_instance_leave_out_the_preemption_watcher_and_a_cluster_keeps_it(monkeypatch):
    """A local instance is one node, never drained: its fits run without Ray Train's preemption watcher
    (an actor per fit, ~2 CPU-seconds). On a cluster (RAY_ADDRESS) Ray Train's default stands."""
    import os

    import ray

    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: started.append(kwargs))
    monkeypatch.setenv("RAY_LOGGER_LEVEL", "warning")  # start_ray sets it where unset: kept out of this process
    monkeypatch.delenv(cluster.PREEMPTION_WATCHER_ENV, raising=False)
    monkeypatch.delenv(cluster.API_SERVER_ENV, raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    cluster.start_ray()
    assert started[-1]["address"] == "10.0.0.1:6379" and cluster.PREEMPTION_WATCHER_ENV not in os.environ
    assert cluster.API_SERVER_ENV not in os.environ  # a cluster's own
    monkeypatch.delenv("RAY_ADDRESS")
    cluster.start_ray()
    assert "address" not in started[-1] and os.environ[cluster.PREEMPTION_WATCHER_ENV] == "0"
    assert os.environ[cluster.API_SERVER_ENV] == f"http://127.0.0.1:{started[-1]['dashboard_port']}"
