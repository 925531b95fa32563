"""Lipschitz bounds (DESIGN §1.6) against exact values computed from dense matrices."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from inferlink_audit.spectral import batchnorm_bound, lipschitz_bounds, operator_norm

CPU = torch.device("cpu")


def _dense(fn, shape) -> torch.Tensor:
    n = math.prod(shape)
    eye = torch.eye(n, dtype=torch.float64)
    with torch.no_grad():
        return torch.stack([fn(eye[i].view(1, *shape)).flatten() for i in range(n)], 1)


@pytest.mark.parametrize(
    "stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 1, 1, 1), (1, 0, 2, 1), (2, 2, 1, 2)]
)
def test_conv_operator_norm_as_applied_matches_dense_svd(stride, padding, dilation, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(
        4, 6, 3, stride=stride, padding=padding, dilation=dilation, groups=groups
    ).double()
    shape = (4, 7, 7)

    def apply(x):
        return nn.functional.conv2d(x, conv.weight, None, stride, padding, dilation, groups)

    exact = float(torch.linalg.matrix_norm(_dense(apply, shape), ord=2))
    estimate, products = operator_norm(apply, (1, *shape), device=CPU)
    assert estimate == pytest.approx(exact, rel=1e-7)
    assert products < 2 * math.prod(shape)  # cheaper than building the matrix


def test_chain_is_the_product_and_residual_add_the_sum():
    torch.manual_seed(1)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(5, 5)
            self.b = nn.Linear(5, 5)
            self.c = nn.Linear(5, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.c(self.b(h) + h)

    net = Net()
    result = lipschitz_bounds(net, torch.rand(1, 5), layers=["a", "b", "c"], input_scale=2.0)
    sv = {
        name: float(torch.linalg.matrix_norm(getattr(net, name).weight.detach().double(), ord=2))
        for name in "abc"
    }
    assert [layer.layer for layer in result.layers] == ["a", "b", "c"]
    assert result.layers[0].upper_bound == pytest.approx(sv["a"])
    expected = 2.0 * sv["c"] * (sv["b"] + 1.0) * sv["a"]
    assert result.network_upper_bound == pytest.approx(expected)
    assert "input normalisation" in result.note


def test_batchnorm_bound_is_max_scale():
    bn = nn.BatchNorm2d(3).eval()
    bn.running_var = torch.tensor([0.25, 1.0, 4.0])
    bn.weight.data = torch.tensor([1.0, -3.0, 2.0])
    assert batchnorm_bound(bn) == pytest.approx(3.0 / math.sqrt(1.0 + bn.eps))


def test_overlapping_max_pool_is_not_assumed_one():
    net = nn.Sequential(nn.MaxPool2d(3, stride=2), nn.Flatten())
    result = lipschitz_bounds(net, torch.rand(1, 1, 9, 9), layers=[])
    assert result.network_upper_bound == pytest.approx(2.0)  # √(2 × 2 windows per element)
    flat = lipschitz_bounds(
        nn.Sequential(nn.MaxPool2d(2), nn.Flatten()), torch.rand(1, 1, 8, 8), layers=[]
    )
    assert flat.network_upper_bound == pytest.approx(1.0)


def test_unknown_operation_makes_the_network_bound_unavailable():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x * x)  # not Lipschitz

    result = lipschitz_bounds(Odd(), torch.rand(1, 4), layers=["fc"])
    assert result.network_upper_bound is None
    assert "no Lipschitz bound for operation" in result.note
    assert len(result.layers) == 1
