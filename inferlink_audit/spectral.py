"""Spectral analysis (DESIGN §1.6): upper Lipschitz bounds per layer and for the network (L2).

As in Szegedy et al., *Intriguing properties of neural networks* (ICLR 2014, Table 5): a
linear layer's bound is its largest singular value; a convolution's is the operator norm of
the convolution *as applied* (its stride, padding, dilation and groups on the input shape it
actually sees), found by Lanczos iteration (ARPACK) on the convolution and its adjoint (a
vector-Jacobian product, which is exactly the transposed convolution) to relative tolerance
``tolerance``. ReLU is 1; max-pooling is 1 for non-overlapping windows and √(windows covering
an element) otherwise; BatchNorm (eval) is max |γ/√(var + eps)|; a residual add is the sum of
its branches. The network bound composes these over the torch.fx graph (a product along a
chain). An operation with no known bound makes the network bound unavailable, and the result
names it, rather than reporting a number that is not a bound.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, svds
from torch import fx, nn

from .results import LipschitzLayer, LipschitzResult

LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
AVGPOOL_TYPES = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
MAXPOOL_TYPES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
# Element-wise or reshaping modules and their Lipschitz constants.
ELEMENTWISE: dict[type[nn.Module], float] = {
    nn.ReLU: 1.0,
    nn.ReLU6: 1.0,
    nn.Tanh: 1.0,
    nn.Sigmoid: 0.25,
    nn.Identity: 1.0,
    nn.Flatten: 1.0,
    nn.Unflatten: 1.0,
    nn.Dropout: 1.0,
    nn.Dropout1d: 1.0,
    nn.Dropout2d: 1.0,
    nn.Dropout3d: 1.0,
    nn.Softplus: 1.0,
    nn.Hardtanh: 1.0,
    nn.GELU: 1.13,
    nn.SiLU: 1.1,
    nn.Mish: 1.09,
}
ELEMENTWISE_FUNCTIONS: set[object] = {
    torch.relu,
    torch.nn.functional.relu,
    torch.flatten,
    torch.tanh,
    torch.nn.functional.dropout,
}
RESHAPING_METHODS = {
    "view",
    "reshape",
    "flatten",
    "permute",
    "transpose",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "relu",
    "clone",
}
ADDITIONS: set[object] = {operator.add, torch.add, operator.iadd}


def operator_norm(
    apply: Callable[[torch.Tensor], torch.Tensor],
    input_shape: Sequence[int],
    *,
    device: torch.device,
    tolerance: float = 1e-8,
    seed: int = 0,
) -> tuple[float, int]:
    """Largest singular value of the linear map ``apply`` on inputs of ``input_shape``.

    Implicitly restarted Lanczos (ARPACK, through ``scipy.sparse.linalg.svds``) on the map and
    its adjoint, which is the vector-Jacobian product of the map (for a convolution, the
    transposed convolution with the same stride, padding and dilation). Unlike plain power
    iteration it does not stall when the top singular values are close. Returns the value and
    the number of products with the map or its adjoint.
    """
    shape = tuple(int(d) for d in input_shape)
    zero = torch.zeros(shape, dtype=torch.float64, device=device)
    out, adjoint = torch.func.vjp(apply, zero)[:2]
    out_shape, n_in, n_out = tuple(out.shape), math.prod(shape), out.numel()
    calls = 0

    def matvec(v: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        x = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).view(shape).to(device)
        return apply(x).detach().reshape(-1).cpu().numpy()

    def rmatvec(u: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        y = torch.from_numpy(np.ascontiguousarray(u, dtype=np.float64)).view(out_shape).to(device)
        (x,) = adjoint(y)
        return x.detach().reshape(-1).cpu().numpy()

    if min(n_in, n_out) < 3:  # ARPACK needs k < min(shape); such a map is tiny: go dense
        dense = np.stack([matvec(column) for column in np.eye(n_in)], axis=1)
        return float(np.linalg.norm(dense, 2)), calls
    operator = LinearOperator((n_out, n_in), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(min(n_in, n_out))
    sigma = svds(operator, k=1, tol=tolerance, v0=v0, return_singular_vectors=False)
    return float(sigma[0]), calls


def _without_bias(module: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d) -> Callable[[Any], Any]:
    """The linear part of an affine layer, in float64 so the iteration is precise."""
    weight = module.weight.detach().double()
    if isinstance(module, nn.Linear):
        return lambda x: torch.nn.functional.linear(x, weight)
    conv: Any = {
        1: torch.nn.functional.conv1d,
        2: torch.nn.functional.conv2d,
        3: torch.nn.functional.conv3d,
    }[weight.dim() - 2]
    stride, padding, dilation, groups = (
        module.stride,
        module.padding,
        module.dilation,
        module.groups,
    )
    return lambda x: conv(x, weight, None, stride, padding, dilation, groups)


def batchnorm_bound(module: Any) -> float:
    """max |γ / √(running_var + eps)| of a BatchNorm in eval mode (the bias only shifts)."""
    scale = 1.0 / torch.sqrt(module.running_var.detach().double() + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.detach().double()
    return float(scale.abs().max())


def _maxpool_bound(module: Any, dims: int) -> float:
    def tup(v: Any) -> tuple[int, ...]:
        return tuple(v) if isinstance(v, tuple | list) else (int(v),) * dims

    kernel, stride = tup(module.kernel_size), tup(module.stride or module.kernel_size)
    dilation = tup(getattr(module, "dilation", 1))
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True)]
    overlap = math.prod(math.ceil(s / st) for s, st in zip(span, stride, strict=True))
    return math.sqrt(overlap)


def lipschitz_bounds(
    model: nn.Module,
    example: torch.Tensor,
    *,
    layers: Sequence[str],
    input_scale: float = 1.0,
    tolerance: float = 1e-8,
) -> LipschitzResult:
    """Per-layer bounds for ``layers`` and the network bound (None, with a note, when some
    operation has no known bound).

    ``input_scale`` is the Lipschitz constant of what runs before ``model`` (the input
    normalisation: 1 / min std), folded into the network bound.
    """
    device = example.device
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(name, tuple(args[0].shape[1:]))

        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in model.named_modules()]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for hook in hooks:
            hook.remove()

    modules = dict(model.named_modules())
    cache: dict[str, float] = {}

    def module_bound(name: str) -> float | None:
        if name in cache:
            return cache[name]
        module = modules[name]
        bound: float
        if isinstance(module, nn.Linear):
            bound = float(torch.linalg.matrix_norm(module.weight.detach().double(), ord=2))
        elif isinstance(module, LINEAR_TYPES):
            if name not in shapes or getattr(module, "padding_mode", "zeros") != "zeros":
                return None
            bound, _ = operator_norm(
                _without_bias(module), (1, *shapes[name]), device=device, tolerance=tolerance
            )
        elif isinstance(module, BATCHNORM_TYPES):
            if module.running_var is None:
                return None
            bound = batchnorm_bound(module)
        elif isinstance(module, AVGPOOL_TYPES):
            if name not in shapes:
                return None
            bound, _ = operator_norm(module, (1, *shapes[name]), device=device, tolerance=tolerance)
        elif isinstance(module, MAXPOOL_TYPES):
            bound = _maxpool_bound(module, int(type(module).__name__[-2]))
        elif type(module) in ELEMENTWISE:
            bound = ELEMENTWISE[type(module)]
        elif isinstance(module, nn.LeakyReLU):
            bound = max(1.0, abs(module.negative_slope))
        else:
            return None
        cache[name] = bound
        return bound

    per_layer = []
    for name in layers:
        bound = module_bound(name)
        if bound is not None:
            per_layer.append(LipschitzLayer(layer=name, upper_bound=bound))

    network, reason = _compose(model, module_bound)
    if network is None:
        note = f"network bound unavailable: {reason}"
    else:
        note = "composed over the torch.fx graph: product along chains, sum at additions"
        if input_scale != 1.0:
            note += f", times {input_scale:.4g} for the input normalisation"
    return LipschitzResult(
        layers=per_layer,
        network_upper_bound=None if network is None else network * input_scale,
        note=note,
        tolerance=tolerance,
    )


def _compose(
    model: nn.Module, module_bound: Callable[[str], float | None]
) -> tuple[float | None, str | None]:
    """Propagate bounds through the fx graph: product along chains, sums at additions."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:
        return None, f"the model does not trace with torch.fx ({type(exc).__name__})"
    bound: dict[fx.Node, float] = {}

    def of(arg: object) -> float:
        return bound.get(arg, 0.0) if isinstance(arg, fx.Node) else 0.0

    for node in graph.nodes:
        tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
        if node.op == "placeholder":
            bound[node] = 1.0
        elif node.op == "get_attr":
            bound[node] = 0.0  # a constant does not depend on the input
        elif node.op == "call_module":
            b = module_bound(str(node.target))
            if b is None:
                return (
                    None,
                    f"no Lipschitz bound for module {node.target} ({type(model.get_submodule(str(node.target))).__name__})",
                )
            bound[node] = b * of(node.args[0])
        elif node.op == "call_function" and node.target in ADDITIONS:
            bound[node] = sum(of(a) for a in node.args)
        elif node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS:
            bound[node] = of(node.args[0])
        elif node.op == "call_function" and node.target is torch.cat:
            parts = node.args[0] if isinstance(node.args[0], list | tuple) else []
            bound[node] = math.sqrt(sum(of(a) ** 2 for a in parts))
        elif node.op == "call_function" and node.target is operator.getitem:
            bound[node] = of(node.args[0])  # a slice or an element: a projection, norm ≤ 1
        elif node.op == "call_method" and node.target in RESHAPING_METHODS:
            bound[node] = of(node.args[0])
        elif node.op == "call_method" and node.target == "size":
            bound[node] = 0.0
        elif node.op == "output":
            return of(node.args[0]), None
        elif not tensor_args or all(of(a) == 0.0 for a in tensor_args):
            bound[node] = 0.0
        else:
            return None, f"no Lipschitz bound for operation {node.target}"
    return None, "the traced graph has no output"
