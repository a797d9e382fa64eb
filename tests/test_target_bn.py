"""Target BatchNorm statistics (lse.target_bn): re-estimated from target images, nothing else changed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sisray.errors import ModelError
from sisray.target_statistics import reestimate


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 2, 1))


def test_running_statistics_become_the_average_of_the_target_batches():
    net = _net()
    with torch.no_grad():
        net[1].running_mean.fill_(7.0)  # source statistics: to be replaced, not blended
        net[1].running_var.fill_(9.0)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = [torch.rand(3, 3, 8, 8) * 255, torch.rand(2, 3, 8, 8) * 255 + 40]
    assert reestimate(net, iter(batches)) == 5
    features = [net[0](b) for b in batches]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in features]).mean(0)
    var = torch.stack([f.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for f in features]).mean(0)
    assert torch.allclose(net[1].running_mean, mean, rtol=1e-4)
    assert torch.allclose(net[1].running_var, var, rtol=1e-4)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())  # weights untouched
    assert not net.training and not net[1].training and net[1].momentum == 0.1


def test_dropout_stays_off_while_estimating():
    """Only BatchNorm layers run in training mode: dropout would change the statistics downstream."""
    net = nn.Sequential(nn.Dropout(0.9), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    batch = torch.ones(2, 3, 4, 4)
    reestimate(net, iter([batch]))
    assert torch.allclose(net[2].running_mean, net[1](batch).mean(dim=(0, 2, 3)))


def test_a_model_without_batchnorm_is_refused():
    with pytest.raises(ModelError, match="lse.target_bn: Sequential has no BatchNorm layer"):
        reestimate(nn.Sequential(nn.Conv2d(3, 2, 1)), iter([]))
