"""Lipschitz bounds (DESIGN §1.6) against exact values computed from dense matrices."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

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
    assert "operation mul (node 'mul' at test_spectral.py:" in result.note
    assert "no Lipschitz bound is known for it" in result.reason
    assert len(result.layers) == 1


# ------------------------------------------------------------------------------------------
# The network bound is never below the truth (issue 9): each model below got a smaller
# number (or a crash) before. The independent reference is a lower bound on the true
# Lipschitz constant: the largest spectral norm of the network's Jacobian over inputs.


def _jacobian_lower_bound(net: nn.Module, shape: tuple[int, ...], *, inputs: int = 6) -> float:
    """max over random inputs of ‖J(x)‖₂, in float64: the Lipschitz constant is at least this."""
    net = copy.deepcopy(net).double().eval()
    generator = torch.Generator().manual_seed(123)
    best = 0.0
    for _ in range(inputs):
        x = torch.randn((1, *shape), generator=generator, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(net, x)
        matrix = jac.reshape(-1, x.numel())
        best = max(best, float(torch.linalg.matrix_norm(matrix, ord=2)))
    return best


def _network_bound(net: nn.Module, shape: tuple[int, ...]) -> float:
    result = lipschitz_bounds(net.eval(), torch.rand((2, *shape)), layers=[])
    assert result.network_upper_bound is not None, result.note
    return result.network_upper_bound


class _Branches(nn.Module):
    """Two linear branches joined by ``join``; g's weights are large so its share matters."""

    def __init__(self, join) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.f, self.g = nn.Linear(4, 3), nn.Linear(4, 3)
        with torch.no_grad():
            self.g.weight.mul_(10.0)
        self.join = join

    def forward(self, x):
        return self.join(self.f(x), self.g(x))


JOINS = {
    "stack": lambda a, b: torch.stack([a, b]),
    "stack_dim1": lambda a, b: torch.stack((a, b), dim=1),
    "concat": lambda a, b: torch.concat([a, b], 1),
    "hstack": lambda a, b: torch.hstack([a, b]),
    "cat_keyword": lambda a, b: torch.cat(tensors=[a, b], dim=1),
    "cat_same_branch_twice": lambda a, b: torch.cat([b, b], 1),
}


@pytest.mark.parametrize("join", sorted(JOINS))
def test_concatenated_and_stacked_branches_count_every_part(join):
    net = _Branches(JOINS[join])
    exact = _jacobian_lower_bound(net, (4,))  # the network is linear: its Jacobian norm
    sf, sg = (
        float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2)) for m in (net.f, net.g)
    )
    bound = _network_bound(net, (4,))
    assert bound >= exact
    expected = math.sqrt(2) * sg if join == "cat_same_branch_twice" else math.hypot(sf, sg)
    assert bound == pytest.approx(expected, rel=1e-6)  # √(Lf² + Lg²)


@pytest.mark.parametrize(
    "combine",
    [
        lambda a, b: torch.add(a, b, alpha=3.0),
        lambda a, b: torch.sub(a, b, alpha=-2.5),
        lambda a, b: a.add(b, alpha=4.0),
        lambda a, b: torch.rsub(b, a, alpha=3.0),
    ],
    ids=["add", "sub", "method_add", "rsub"],
)
def test_add_and_sub_scale_the_second_branch_by_alpha(combine):
    net = _Branches(combine)
    with torch.no_grad():
        net.g.weight.div_(10.0)
        net.f.weight.mul_(0.1)  # f small, alpha·g large: ignoring alpha undercounts
    exact = _jacobian_lower_bound(net, (4,))
    bound = _network_bound(net, (4,))
    assert bound >= exact
    sf, sg = (
        float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2)) for m in (net.f, net.g)
    )
    alpha = abs(float(combine(torch.zeros(1), torch.ones(1))))  # |alpha| of this combination
    assert bound == pytest.approx(sf + alpha * sg, rel=1e-6)


class _Gather(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.register_buffer("index", torch.tensor([0, 0, 0, 0, 1]))

    def forward(self, x):
        if self.mode == "buffer":
            return x[:, self.index]
        if self.mode == "list":
            return x[:, [2, 2, 2, 2, 3]]
        if self.mode == "index_select":
            return torch.index_select(x, 1, self.index)
        return x.expand(3, 4)  # a batch of one repeated three times


@pytest.mark.parametrize("mode", ["buffer", "list", "index_select", "expand"])
def test_indexing_with_repeated_indices_counts_the_copies(mode):
    net = _Gather(mode)
    exact = _jacobian_lower_bound(net, (4,))
    assert exact == pytest.approx(2.0 if mode != "expand" else math.sqrt(3))
    assert _network_bound(net, (4,)) == pytest.approx(exact, rel=1e-9)


class _TwoSizes(nn.Module):
    """One convolution applied to a 1×1 crop first, then to the whole 8×8 image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)  # norm 1 on a 1×1 input, close to 9 on 8×8

    def forward(self, x):
        small = self.conv(x[:, :, :1, :1])
        return torch.cat([small.flatten(1), self.conv(x).flatten(1)], 1)


def test_module_called_at_several_sizes_is_bounded_at_each():
    net = _TwoSizes()
    lower = _jacobian_lower_bound(net, (1, 8, 8))
    assert lower > 8.0
    result = lipschitz_bounds(net, torch.rand(1, 1, 8, 8), layers=["conv"])
    assert result.network_upper_bound is not None
    assert result.network_upper_bound >= lower
    full = float(
        torch.linalg.matrix_norm(
            _dense(
                lambda z: nn.functional.conv2d(z, net.conv.weight.double(), padding=1), (1, 8, 8)
            ),
            ord=2,
        )
    )
    assert result.layers[0].upper_bound == pytest.approx(full, rel=1e-6)  # the larger size
    assert result.layers[0].upper_bound >= full


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("tolerance", [1e-2, 1e-4, 1e-8])
def test_operator_norm_is_never_below_the_dense_value(seed, tolerance):
    """ARPACK's value is ‖Av‖ for a unit v, so it approaches σ_max from below; the tolerance
    added on top keeps it an upper bound, no more than the tolerance above."""
    torch.manual_seed(seed)
    weight = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    shape = (4, 6, 6)

    def apply(x):
        return nn.functional.conv2d(x, weight, None, 1, 1)

    exact = float(torch.linalg.matrix_norm(_dense(apply, shape), ord=2))
    estimate, _ = operator_norm(apply, (1, *shape), device=CPU, tolerance=tolerance)
    assert exact <= estimate <= exact * (1 + tolerance) * (1 + 1e-12)


def test_inplace_addition_to_a_tensor_used_later_makes_the_bound_unavailable():
    class Doubling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            h = self.fc(x)
            g = h
            g += h  # h itself becomes 2h: the sum below is 4h, not 3h
            return h + g

    net = Doubling()
    result = lipschitz_bounds(net, torch.rand(1, 3), layers=[])
    lower = _jacobian_lower_bound(net, (3,))
    assert result.network_upper_bound is None or result.network_upper_bound >= lower
    assert result.network_upper_bound is None
    assert "operation add (node 'add' at test_spectral.py:" in result.reason
    assert "`g += h" in result.reason
    assert "overwrites a tensor that is used later (node 'fc')" in result.reason


def test_inplace_addition_to_a_tensor_not_used_again_is_a_sum():
    class Block(nn.Module):  # torchvision's BasicBlock: out += identity
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(5)
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            identity = self.a(x)
            out = self.b(identity)
            out += identity
            return torch.relu(out)

    net = Block()
    sa, sb = (
        float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2)) for m in (net.a, net.b)
    )
    bound = _network_bound(net, (3,))
    assert bound >= _jacobian_lower_bound(net, (3,))
    assert bound == pytest.approx((sb + 1.0) * sa, rel=1e-6)


def test_a_module_without_a_known_bound_is_named_in_the_reason():
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    result = lipschitz_bounds(net, torch.rand(1, 4), layers=["0", "1", "2"])
    assert result.network_upper_bound is None
    assert result.reason.startswith("no Lipschitz bound is known for module 1 (LayerNorm)")
    assert "leave max_lipschitz_upper_bound out of the spec" in result.reason
    assert [layer.layer for layer in result.layers] == ["0", "2"]
    assert "no per-layer bound: no Lipschitz bound is known for module 1 (LayerNorm)" in result.note


class _RandomNet(nn.Module):
    """conv → relu → pool → two branches (a residual block and a strided one) joined by
    concatenation, global pooling, linear: the kinds of graphs audited models have."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        c = 2 + seed % 3
        self.conv = nn.Conv2d(2, c, 3, padding=1, stride=1 + seed % 2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1) if seed % 2 else nn.AvgPool2d(2)
        self.block = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c).eval()
        self.bn.running_var.uniform_(0.2, 2.0)
        self.side = nn.Conv2d(c, 3, 1)
        self.fc = nn.Linear(c + 3, 4)

    def forward(self, x):
        h = self.pool(torch.relu(self.conv(x)))
        r = nn.functional.relu(self.bn(self.block(h)) + h)
        both = torch.cat([r, torch.tanh(self.side(h))], dim=1)
        return self.fc(both.mean(dim=(2, 3)))


@pytest.mark.parametrize("seed", range(5))
def test_network_bound_is_at_least_the_jacobian_norm_on_random_networks(seed):
    net = _RandomNet(seed).eval()
    lower = _jacobian_lower_bound(net, (2, 8, 8), inputs=8)
    bound = _network_bound(net, (2, 8, 8))
    assert bound >= lower


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_padding_modes_are_bounded_as_applied(mode):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode), nn.ReLU(), nn.Flatten())
    conv = net[0]

    def apply(x):
        return conv._conv_forward(x, conv.weight.detach().double(), None)

    exact = float(torch.linalg.matrix_norm(_dense(apply, (2, 5, 5)), ord=2))
    result = lipschitz_bounds(net, torch.rand(1, 2, 5, 5), layers=["0"])
    assert result.layers[0].upper_bound == pytest.approx(exact, rel=1e-7)
    assert result.layers[0].upper_bound >= exact
    assert result.network_upper_bound is not None
    assert result.network_upper_bound >= _jacobian_lower_bound(net, (2, 5, 5))


class _Shapes(nn.Module):
    """A one-unit linear layer whose output is broadcast, or returned next to another."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.mode = mode
        self.fc = nn.Linear(4, 1)
        self.register_buffer("offsets", torch.arange(9.0).view(1, 9))

    def forward(self, x):
        h = self.fc(x)
        if self.mode == "broadcast_add":
            return h + self.offsets  # h is copied into nine outputs
        if self.mode == "broadcast_mul":
            return h * torch.ones(1, 9)
        return h, h  # a tuple of outputs


@pytest.mark.parametrize("mode", ["broadcast_add", "broadcast_mul", "tuple_output"])
def test_broadcast_copies_and_every_output_count(mode):
    net = _Shapes(mode)
    sigma = float(torch.linalg.matrix_norm(net.fc.weight.detach().double(), ord=2))

    def flat(x):
        out = net.double()(x)
        return torch.cat([o.flatten() for o in out]) if isinstance(out, tuple) else out

    x = torch.rand(1, 4, dtype=torch.float64)
    exact = float(
        torch.linalg.matrix_norm(torch.autograd.functional.jacobian(flat, x).reshape(-1, 4), ord=2)
    )
    assert exact == pytest.approx(3 * sigma if mode != "tuple_output" else math.sqrt(2) * sigma)
    bound = _network_bound(net.float(), (4,))
    assert bound >= exact
    assert bound == pytest.approx(exact, rel=1e-6)


def test_dropout_in_training_mode_makes_the_bound_unavailable():
    """Dropout scales what it keeps by 1 / (1 − p) and is random: the graph run once is not
    the network, so no number is given."""
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(6, 64), nn.Dropout(0.5)).train()  # masks differ
    result = lipschitz_bounds(net, torch.rand(1, 6), layers=["0"])
    assert result.network_upper_bound is None
    assert "computes a different output than the model" in result.reason


def test_network_bound_loads_neither_the_compiler_nor_sympy():
    # fx's record_stack_traces and autograd's grad_outputs shape check import TorchDynamo,
    # TorchInductor and SymPy (seconds of an audit's start); the bound gets its source lines and
    # adjoints without them. A fresh process, since another test may have loaded them here.
    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from inferlink_audit.spectral import lipschitz_bounds\n"
        "net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))\n"
        "result = lipschitz_bounds(net, torch.rand(1, 1, 4, 4), layers=['0', '3'])\n"
        "assert result.network_upper_bound is not None, result.reason\n"
        "heavy = ('torch._dynamo', 'torch._inductor', 'sympy')\n"
        "print(sorted(name for name in heavy if name in sys.modules))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
