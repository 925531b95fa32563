"""Spectral analysis (docs/method.md §6): upper Lipschitz bounds per layer and for the network (L2).

As in Szegedy et al., *Intriguing properties of neural networks* (ICLR 2014, Table 5): a
linear layer's bound is its largest singular value; a convolution's is the operator norm of
the convolution *as applied* (its stride, padding, dilation and groups on each input shape it
actually sees), found by Lanczos iteration (ARPACK) on the convolution and its adjoint (a
vector-Jacobian product, which is exactly the transposed convolution) to relative tolerance
``tolerance``, which is then added so that the value stays an upper bound. ReLU is 1;
max-pooling is 1 for non-overlapping windows and √(windows covering an element) otherwise;
BatchNorm (eval) is max |γ/√(var + eps)|; a sum ``a + α·b`` is La + |α|·Lb; a concatenation
or stack of branches is √(ΣLᵢ²); an operation that only moves elements (indexing, reshaping,
repeating) is √(the largest number of copies of one element).

The network bound composes these over the torch.fx graph, run once on an example so that
every operation's shapes, constants and indices are known. Every tensor argument of every
node counts, inside lists, tuples and keywords too. An operation with an input that depends
on the network input and no known bound makes the network bound unavailable, and the result
names the node, rather than reporting a number that is not a bound.
"""

from __future__ import annotations

import builtins
import inspect
import math
import operator
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, svds
from torch import fx, nn

from .progress import Progress, tracked
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
DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
# Element-wise or reshaping modules and their Lipschitz constants (the largest |derivative|).
ELEMENTWISE: dict[type[nn.Module], float] = {
    nn.ReLU: 1.0,
    nn.ReLU6: 1.0,
    nn.Tanh: 1.0,
    nn.Sigmoid: 0.25,
    nn.Identity: 1.0,
    nn.Flatten: 1.0,
    nn.Unflatten: 1.0,
    nn.Softplus: 1.0,
    nn.Hardtanh: 1.0,
    nn.GELU: 1.13,
    nn.SiLU: 1.1,
    nn.Mish: 1.09,
    nn.Softmax: 1.0,  # its Jacobian diag(p) − ppᵀ has norm ≤ max p ≤ 1
}
# Element-wise functions of their first argument, by the largest |derivative|.
UNARY_FUNCTIONS: dict[object, float] = {
    torch.relu: 1.0,
    F.relu: 1.0,
    torch.relu_: 1.0,
    F.relu6: 1.0,
    F.hardtanh: 1.0,
    torch.tanh: 1.0,
    F.tanh: 1.0,
    torch.sigmoid: 0.25,
    F.sigmoid: 0.25,
    F.gelu: 1.13,
    F.silu: 1.1,
    F.mish: 1.09,
    F.softplus: 1.0,
    torch.abs: 1.0,
    operator.abs: 1.0,
    torch.neg: 1.0,
    operator.neg: 1.0,
    operator.pos: 1.0,
    torch.clamp: 1.0,
    torch.clip: 1.0,
    torch.softmax: 1.0,
    F.softmax: 1.0,
}
UNARY_METHODS: dict[str, float] = {
    "relu": 1.0,
    "relu_": 1.0,
    "tanh": 1.0,
    "tanh_": 1.0,
    "sigmoid": 0.25,
    "sigmoid_": 0.25,
    "abs": 1.0,
    "abs_": 1.0,
    "neg": 1.0,
    "neg_": 1.0,
    "clamp": 1.0,
    "clamp_": 1.0,
    "clip": 1.0,
    "clip_": 1.0,
    "softmax": 1.0,
    "float": 1.0,
    "double": 1.0,
    "to": 1.0,
    "type_as": 1.0,
}
# Operations that only move or copy elements of their first argument: the bound is
# √(largest number of copies of one element), found by running them on an index tensor.
SELECTION_FUNCTIONS: set[object] = {
    operator.getitem,
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.t,
    torch.movedim,
    torch.swapaxes,
    torch.clone,
    torch.ravel,
    torch.narrow,
    torch.select,
    torch.flip,
    torch.roll,
    torch.tile,
    torch.repeat_interleave,
    torch.broadcast_to,
    torch.split,
    torch.chunk,
    torch.unbind,
    torch.tensor_split,
    torch.index_select,
    torch.gather,
    torch.take,
}
SELECTION_METHODS = {
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "flatten",
    "permute",
    "transpose",
    "t",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "clone",
    "detach",
    "movedim",
    "swapaxes",
    "ravel",
    "narrow",
    "select",
    "flip",
    "roll",
    "expand",
    "expand_as",
    "repeat",
    "repeat_interleave",
    "tile",
    "split",
    "chunk",
    "unbind",
    "tensor_split",
    "index_select",
    "gather",
    "take",
}
# Arguments that only give a shape, so they may depend on the input without counting.
SHAPE_ONLY_METHODS = {"view_as", "reshape_as", "expand_as", "type_as"}
SHAPE_QUERIES = {"size", "dim", "ndimension", "numel", "is_floating_point", "get_device"}
SHAPE_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}
# Sums and differences: ``a ± alpha·b`` (``rsub`` is ``b − alpha·a``).
ADDITIONS: set[object] = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__"}
SUBTRACTIONS: set[object] = {operator.sub, operator.isub, torch.sub, "sub", "sub_", "__sub__"}
REVERSED_SUBTRACTIONS: set[object] = {torch.rsub, "__rsub__"}
PRODUCTS: set[object] = {operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__"}
QUOTIENTS: set[object] = {
    operator.truediv,
    operator.itruediv,
    torch.div,
    torch.true_divide,
    "div",
    "div_",
    "true_divide",
    "__truediv__",
}
CONCATENATIONS: set[object] = {
    torch.cat,
    torch.concat,
    torch.concatenate,
    torch.hstack,
    torch.vstack,
    torch.dstack,
    torch.row_stack,
    torch.column_stack,
    torch.stack,
}
REDUCTIONS: dict[object, bool] = {torch.sum: True, "sum": True, torch.mean: False, "mean": False}
MATMULS: set[object] = {operator.matmul, torch.matmul, torch.mm, "matmul", "mm", "__matmul__"}
CONVOLUTIONS: set[object] = {F.conv1d, F.conv2d, F.conv3d}
LINEAR_FUNCTIONS: set[object] = {
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
}
MAXPOOL_FUNCTIONS: dict[object, int] = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}


def operator_norm(
    apply: Callable[[torch.Tensor], torch.Tensor],
    input_shape: Sequence[int],
    *,
    device: torch.device,
    tolerance: float = 1e-8,
    seed: int = 0,
) -> tuple[float, int]:
    """An upper bound on the largest singular value of the linear map ``apply`` on inputs of
    ``input_shape``, within relative ``tolerance`` of it.

    Implicitly restarted Lanczos (ARPACK, through ``scipy.sparse.linalg.svds``) on the map and
    its adjoint, which is the vector-Jacobian product of the map (for a convolution, the
    transposed convolution with the same stride, padding and dilation). Unlike plain power
    iteration it does not stall when the top singular values are close. Returns the bound and
    the number of products with the map or its adjoint. Raises ``ArpackNoConvergence`` when
    the iteration does not reach ``tolerance``.
    """
    shape = tuple(int(d) for d in input_shape)
    # The adjoint is the vector-Jacobian product of the (linear) map, taken from one recorded
    # graph. Plain autograd rather than torch.func.vjp, which imports TorchDynamo (~1.5 s); and
    # as the gradient of <out, y> rather than with ``grad_outputs=y``, whose shape check imports
    # torch.fx.experimental.symbolic_shapes and SymPy (~1 s). The two are bit-identical: the
    # gradient reaching ``out`` is 1·y.
    zero = torch.zeros(shape, dtype=torch.float64, device=device, requires_grad=True)
    with torch.enable_grad():
        out = apply(zero)

    def adjoint(y: torch.Tensor) -> tuple[torch.Tensor]:
        if not out.requires_grad:  # a map that ignores its input: its adjoint is zero
            return (torch.zeros_like(zero),)
        with torch.enable_grad():  # callers may run under no_grad
            inner = (out * y).sum()
        (x,) = torch.autograd.grad(inner, zero, retain_graph=True, allow_unused=True)
        return (torch.zeros_like(zero) if x is None else x,)

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

    if n_in == 0 or n_out == 0:
        return 0.0, calls
    if min(n_in, n_out) < 3:  # ARPACK needs k < min(shape); such a map is tiny: go dense
        dense = np.stack([matvec(column) for column in np.eye(n_in)], axis=1)
        return float(np.linalg.norm(dense, 2)) * (1.0 + tolerance), calls
    linear_map = LinearOperator((n_out, n_in), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(min(n_in, n_out))
    sigma = float(svds(linear_map, k=1, tol=tolerance, v0=v0, return_singular_vectors=False)[0])
    # svds runs Lanczos on the Gram matrix M = AᵀA with tolerance tol²; the value it returns
    # is ‖Av‖ for a unit vector v, so it never exceeds σ_max: it converges from below. ARPACK
    # stops when the Ritz pair (θ, v) of the largest eigenvalue has ‖Mv − θv‖ ≤ tol²·θ, and a
    # symmetric matrix has an eigenvalue within the residual of θ, so λ_max ≤ θ·(1 + tol²)
    # and σ_max ≤ σ·√(1 + tol²) ≤ σ·(1 + tol): that is the value reported. (The converged
    # Ritz value is the largest one because the start vector is random, so it has a
    # component along the top singular vector with probability one.)
    return sigma * (1.0 + tolerance), calls


def _without_bias(module: nn.Module) -> Callable[[Any], Any]:
    """The linear part of an affine layer, in float64 so the iteration is precise."""
    layer: Any = module
    weight = layer.weight.detach().double()
    if isinstance(module, nn.Linear):
        return lambda x: F.linear(x, weight)
    # _conv_forward applies the module's own padding mode (zeros, reflect, circular, ...).
    conv: Any = module
    return lambda x: conv._conv_forward(x, weight, None)


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


class _ModuleBounds:
    """Bounds of leaf modules, keyed by the input shape they are applied to: a convolution's
    or pooling's operator norm depends on the size of its input."""

    def __init__(self, model: nn.Module, device: torch.device, tolerance: float) -> None:
        self.modules = dict(model.named_modules())
        self.device, self.tolerance = device, tolerance
        self.cache: dict[tuple[str, tuple[int, ...] | None], float | None] = {}
        self.reasons: dict[str, str] = {}

    def __call__(self, name: str, shape: tuple[int, ...] | None) -> float | None:
        """The bound of module ``name`` on one example of ``shape`` (without the batch)."""
        key = (name, shape)
        if key not in self.cache:
            self.cache[key] = self._compute(name, self.modules[name], shape)
        return self.cache[key]

    def _norm(self, name: str, apply: Callable[[Any], Any], shape: tuple[int, ...]) -> float | None:
        try:
            bound, _ = operator_norm(
                apply, (1, *shape), device=self.device, tolerance=self.tolerance
            )
        except ArpackNoConvergence:
            self.reasons[name] = f"the Lanczos iteration for {name} did not converge"
            return None
        return bound

    def _compute(self, name: str, module: nn.Module, shape: tuple[int, ...] | None) -> float | None:
        kind = type(module).__name__
        if isinstance(module, nn.Linear):
            weight = module.weight.detach().double()
            return float(torch.linalg.matrix_norm(weight, ord=2)) * (1.0 + self.tolerance)
        if isinstance(module, LINEAR_TYPES + AVGPOOL_TYPES):
            if shape is None:
                self.reasons[name] = f"module {name} ({kind}) was never called on a tensor"
                return None
            apply = _without_bias(module) if isinstance(module, LINEAR_TYPES) else module
            return self._norm(name, apply, shape)
        if isinstance(module, BATCHNORM_TYPES):
            if module.running_var is None or module.training:
                self.reasons[name] = (
                    f"module {name} ({kind}) normalises by batch statistics; "
                    "put the model in eval mode with running statistics"
                )
                return None
            return batchnorm_bound(module)
        if isinstance(module, MAXPOOL_TYPES):
            return _maxpool_bound(module, int(kind[-2]))
        if isinstance(module, DROPOUT_TYPES):
            # In training mode dropout scales the kept elements by 1 / (1 − p).
            p = float(module.p)
            return 1.0 / (1.0 - p) if module.training and p < 1.0 else 1.0
        if type(module) in ELEMENTWISE:
            return ELEMENTWISE[type(module)]
        if isinstance(module, nn.LeakyReLU):
            return max(1.0, abs(module.negative_slope))
        self.reasons[name] = f"no Lipschitz bound is known for module {name} ({kind})"
        return None


def lipschitz_bounds(
    model: nn.Module,
    example: torch.Tensor,
    *,
    layers: Sequence[str],
    input_scale: float = 1.0,
    tolerance: float = 1e-8,
    progress: Progress | None = None,
) -> LipschitzResult:
    """Per-layer bounds for ``layers`` and the network bound (None, with the reason naming
    the node, when some operation has no known bound).

    A layer called on inputs of several sizes is bounded at each and reported at the
    largest. ``input_scale`` is the Lipschitz constant of what runs before ``model`` (the
    input normalisation: 1 / min std), folded into the network bound.
    """
    shapes: dict[str, list[tuple[int, ...]]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
        ) -> None:
            first = next(
                (a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None
            )
            if first is not None and tuple(first.shape[1:]) not in shapes.setdefault(name, []):
                shapes[name].append(tuple(first.shape[1:]))

        return hook

    hooks = [
        module.register_forward_hook(record(name), with_kwargs=True)
        for name, module in model.named_modules()
    ]
    try:
        with torch.no_grad():
            output = model(example[:1].clone())
    finally:
        for hook in hooks:
            hook.remove()

    module_bound = _ModuleBounds(model, example.device, tolerance)
    per_layer, missing = [], []
    for name in tracked(progress, layers, "Lipschitz bounds", len(layers), "layer"):
        bounds = [module_bound(name, shape) for shape in shapes.get(name, [None])]
        known = [b for b in bounds if b is not None]
        if known and len(known) == len(bounds):
            per_layer.append(LipschitzLayer(layer=name, upper_bound=max(known)))
        else:
            missing.append(name)

    network, reason = _compose(model, example[:1].clone(), output, module_bound)
    if network is None:
        note = f"network bound unavailable: {reason}"
    else:
        note = (
            "composed over the torch.fx graph: product along chains, sum at additions, "
            "root of the sum of squares at concatenations"
        )
        if input_scale != 1.0:
            note += f", times {input_scale:.4g} for the input normalisation"
    if missing:
        note += "; no per-layer bound: " + "; ".join(
            module_bound.reasons.get(name, name) for name in missing
        )
    return LipschitzResult(
        layers=per_layer,
        network_upper_bound=None if network is None else network * input_scale,
        note=note,
        tolerance=tolerance,
        reason=reason or "",
    )


class _Unbounded(Exception):
    """No bound is known for a node whose value depends on the input."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _source(node: fx.Node) -> tuple[str, str, str] | None:
    """(file, line, code) of the node in the model's source, when the trace recorded it."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in [^\n]+\n\s*(.*)', node.stack_trace or "")
    torch_dir = os.path.dirname(torch.__file__)
    user = [frame for frame in frames if not frame[0].startswith(torch_dir)]
    return user[-1] if user else None


class _SourceTracer(fx.Tracer):
    """An fx tracer that records on each node the model's source frames that created it.

    fx's own ``record_stack_traces`` filters the frames through
    ``torch.fx.experimental.symbolic_shapes``, whose import loads TorchDynamo and TorchInductor
    (seconds of an audit that never compiles); ``_source`` needs only the frames from the
    first ``forward`` inwards outside torch, which a walk of the Python stack gives.
    """

    def create_node(
        self,
        kind: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None = None,
        type_expr: Any | None = None,
    ) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if not node.stack_trace:
            node.stack_trace = _model_frames(sys._getframe(1))
        return node


def _model_frames(frame: Any) -> str | None:
    """``frame`` and its callers from the outermost ``forward`` inwards, less torch's own
    frames, formatted as a traceback (fx's ``stack_trace`` format); None outside a forward."""
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()  # outermost first
    first = next((i for i, f in enumerate(frames) if f.f_code.co_name == "forward"), None)
    if first is None:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    summary = traceback.StackSummary.extract(
        (f, f.f_lineno) for f in frames[first:] if not f.f_code.co_filename.startswith(torch_dir)
    )
    return "".join(summary.format()).strip() or None


def _where(node: fx.Node) -> str:
    """`` at file:line: `code` `` of the node in the model's source, when the trace has it."""
    source = _source(node)
    if source is None:
        return ""
    path, line, code = source
    return f" at {os.path.basename(path)}:{line}: `{code.strip()}`"


# ``a += b`` on a tensor updates ``a`` in place, but fx records it as ``a + b``.
AUGMENTED_ASSIGNMENT = re.compile(r"(?<![=!<>+\-*/@%&|^])(\+|-|\*|/|@)=(?!=)")
AUGMENTABLE: set[object] = {operator.add, operator.sub, operator.mul, operator.truediv}


def _op_name(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return f"method .{target}()"
    if node.op == "call_module":
        return f"module {target}"
    name = getattr(target, "__name__", str(target))
    return f"operation {name}"


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors inside a value (a tensor, or nested lists, tuples and dicts of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _largest_abs(value: Any) -> float | None:
    """max |value| of a number or a constant tensor; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return abs(float(value))
    if isinstance(value, torch.Tensor) and not value.dtype.is_complex:
        return float(value.detach().abs().max()) if value.numel() else 0.0
    return None


def _smallest_abs(value: Any) -> float | None:
    """min |value| of a number or a constant tensor (a divisor); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return abs(float(value))
    if isinstance(value, torch.Tensor) and not value.dtype.is_complex and value.numel():
        return float(value.detach().abs().min())
    return None


IN_PLACE_OPERATORS: set[object] = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.imatmul,
}
# Positional parameter names of functionals that have no Python signature.
PARAMETERS: dict[object, tuple[str, ...]] = {
    F.linear: ("input", "weight", "bias"),
    F.conv1d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    F.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    F.conv3d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    F.max_pool1d: ("input", "kernel_size", "stride", "padding", "dilation"),
    F.max_pool2d: ("input", "kernel_size", "stride", "padding", "dilation"),
    F.max_pool3d: ("input", "kernel_size", "stride", "padding", "dilation"),
}


def _named(key: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a call by parameter name (only those given)."""
    if key in PARAMETERS:
        return {**dict(zip(PARAMETERS[key], args, strict=False)), **kwargs}
    bound = inspect.signature(key).bind(*args, **kwargs)  # type: ignore[arg-type]
    bound.apply_defaults()
    return dict(bound.arguments)


class _Bounder(fx.Interpreter):
    """Runs the traced graph on one example and bounds every node's value as a function of
    the input: 0 for constants, 1 for the input, and each operation's rule otherwise."""

    def __init__(self, module: fx.GraphModule, module_bound: _ModuleBounds) -> None:
        super().__init__(module, garbage_collect_values=True)
        self.extra_traceback = False
        self.module_bound = module_bound
        self.tolerance = module_bound.tolerance
        self.bound: dict[fx.Node, float] = {}
        self.seen_input = False

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        result = super().run_node(n)
        try:
            self.bound[n] = self._bound(n, args, kwargs, result)
        except _Unbounded:
            raise
        except Exception as exc:  # a rule that does not fit this call: no number, the node named
            raise self._fail(
                n, f"its bound could not be computed ({type(exc).__name__}: {exc})"
            ) from exc
        return result

    def _fail(self, n: fx.Node, why: str, *, named: bool = False) -> _Unbounded:
        """The reason the network bound is unavailable, naming node ``n`` and what to do;
        ``named`` when ``why`` already names the module."""
        at = f"node '{n.name}'{_where(n)}"
        if named:
            text = f"{why} ({at})"
        elif n.op == "call_module":
            kind = type(self.module.get_submodule(str(n.target))).__name__
            text = f"module {n.target} ({kind}, {at}): {why}"
        else:
            text = f"{_op_name(n)} ({at}): {why}"
        return _Unbounded(
            f"{text}; replace it with an operation that has a known bound, or leave "
            "max_lipschitz_upper_bound out of the spec"
        )

    def _bound(
        self, n: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> float:
        if n.op == "placeholder":
            # The first input is the one perturbed; later ones keep their default values.
            first, self.seen_input = not self.seen_input, True
            return 1.0 if first else 0.0
        if n.op == "get_attr":
            return 0.0
        inputs: list[fx.Node] = []
        fx.node.map_arg((n.args, n.kwargs), inputs.append)
        live = [m for m in inputs if self.bound[m] > 0.0]
        if not live:
            return 0.0  # every input is a constant, so the value is too
        if n.op == "output":
            # Several outputs: the bound of their concatenation.
            return math.sqrt(sum(self.bound[m] ** 2 for m in inputs))
        key: object = n.target if n.op != "call_module" else None
        bound = self._rule(n, key, args, kwargs, result, live)
        if bound is None:
            raise self._fail(n, "no Lipschitz bound is known for it")
        if self._mutates(n, key):
            self._check_unaliased(n, args, bound, live)
        return bound

    def _only_first(self, n: fx.Node, live: list[fx.Node], *, shape_args: bool = False) -> float:
        """The bound of the first argument, when no other argument depends on the input."""
        first = n.args[0] if n.args else next(iter(n.kwargs.values()), None)
        if not isinstance(first, fx.Node) or (not shape_args and any(m is not first for m in live)):
            raise self._fail(n, "an argument other than the first depends on the input")
        return self.bound[first]

    def _rule(
        self,
        n: fx.Node,
        key: object,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        result: Any,
        live: list[fx.Node],
    ) -> float | None:
        if n.op == "call_module":
            return self._module(n, args, kwargs, live)
        if key in SHAPE_QUERIES or (
            key is builtins.getattr and len(args) > 1 and args[1] in SHAPE_ATTRIBUTES
        ):
            return 0.0  # a shape does not change when the values do
        if key is builtins.getattr and len(args) > 1 and args[1] in ("T", "mT"):
            return self._only_first(n, live)
        if key in UNARY_FUNCTIONS or (isinstance(key, str) and key in UNARY_METHODS):
            if key in ("to", "float", "double", "type_as") and not (
                isinstance(result, torch.Tensor) and result.is_floating_point()
            ):
                return None  # rounding to integers is a step function
            factor = UNARY_METHODS[key] if isinstance(key, str) else UNARY_FUNCTIONS[key]
            return factor * self._only_first(n, live, shape_args=key in SHAPE_ONLY_METHODS)
        if key is F.leaky_relu:
            slope = float(_named(key, args, kwargs)["negative_slope"])
            return max(1.0, abs(slope)) * self._only_first(n, live)
        if key in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d):
            named = _named(key, args, kwargs)
            p, training = float(named["p"]), bool(named["training"])
            # In training mode dropout scales the kept elements by 1 / (1 − p).
            factor = 1.0 / (1.0 - p) if training and p < 1.0 else 1.0
            return factor * self._only_first(n, live)
        if key in SELECTION_FUNCTIONS or (isinstance(key, str) and key in SELECTION_METHODS):
            return self._selection(n, key, args, kwargs, live)
        if key is F.pad:
            # Padding adds constants and, in the reflect, replicate and circular modes, copies.
            named = _named(key, args, kwargs)
            if named.get("mode", "constant") == "constant":
                named["value"] = -1.0
            return self._selection(n, F.pad, (), named, live)
        if key in ADDITIONS or key in SUBTRACTIONS or key in REVERSED_SUBTRACTIONS:
            return self._sum(n, key, args, kwargs, result)
        if key in PRODUCTS or key in QUOTIENTS:
            return self._scaling(n, key, args, kwargs, result)
        if key in CONCATENATIONS:
            # Each element of each part appears once in the result: ‖Δ‖² = Σ ‖Δpartᵢ‖².
            return math.sqrt(sum(self.bound[m] ** 2 for m in live))
        if key in REDUCTIONS:
            # Each input element falls in one group of m = |in| / |out| elements: a sum of m
            # is √m-Lipschitz in L2, a mean 1/√m.
            first = self._only_first(n, live)
            out = _tensors(result)
            if not isinstance(args[0], torch.Tensor) or len(out) != 1:
                return None
            m = args[0].numel() / max(1, out[0].numel())
            return first * (math.sqrt(m) if REDUCTIONS[key] else 1.0 / math.sqrt(max(m, 1.0)))
        if key in MATMULS:
            return self._matmul(n, args, live)
        if key in CONVOLUTIONS or key is F.linear:
            return self._functional_linear(n, key, args, kwargs, live)
        if key in LINEAR_FUNCTIONS:
            first = self._only_first(n, live)
            fn: Any = key
            rest, kw = args[1:], kwargs
            return self._norm(n, lambda z: fn(z, *rest, **kw), args[0]) * first
        if key in MAXPOOL_FUNCTIONS:
            named = _named(key, args, kwargs)
            if named.get("return_indices"):
                return None
            pool = type("Pool", (), {"stride": None, "dilation": 1, **named})()
            return _maxpool_bound(pool, MAXPOOL_FUNCTIONS[key]) * self._only_first(n, live)
        return None

    def _module(
        self, n: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], live: list[fx.Node]
    ) -> float:
        first = self._only_first(n, live)
        x = next(iter(_tensors((args, kwargs))), None)
        shape = tuple(x.shape[1:]) if x is not None else None
        bound = self.module_bound(str(n.target), shape)
        if bound is None:
            why = self.module_bound.reasons.get(str(n.target))
            if why is None:
                raise self._fail(n, "no Lipschitz bound is known for it")
            raise self._fail(n, why, named=True)
        return bound * first

    def _norm(self, n: fx.Node, apply: Callable[[Any], Any], x: torch.Tensor) -> float:
        """Operator norm of the linear map ``apply`` at the shape of ``x`` (one example)."""
        shape = (1, *x.shape[1:])
        try:
            bound, _ = operator_norm(apply, shape, device=x.device, tolerance=self.tolerance)
        except ArpackNoConvergence as exc:
            raise self._fail(n, "the Lanczos iteration did not converge") from exc
        return bound

    def _selection(
        self,
        n: fx.Node,
        key: object,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        live: list[fx.Node],
    ) -> float:
        first = self._only_first(n, live, shape_args=key in SHAPE_ONLY_METHODS)
        x = args[0] if args else kwargs.pop("input")
        if not isinstance(x, torch.Tensor):
            # An element of a tuple of tensors (the parts of a split, a module's outputs):
            # the whole tuple's bound covers each part.
            return first
        # Run the same operation on a tensor holding each element's index: the result says
        # which element each output element copies, hence the largest number of copies.
        index = torch.arange(x.numel(), dtype=torch.float64, device=x.device).view(x.shape)
        if isinstance(key, str):
            copied = getattr(index, key)(*args[1:], **kwargs)
        else:
            assert callable(key)
            copied = key(index, *args[1:], **kwargs)
        picks = [t.reshape(-1).long() for t in _tensors(copied)]
        picks = [p[p >= 0] for p in picks]  # -1: a constant that padding added
        if sum(p.numel() for p in picks) == 0:
            return 0.0
        counts = torch.bincount(torch.cat(picks), minlength=x.numel())
        return math.sqrt(float(counts.max())) * first

    def _sum(
        self, n: fx.Node, key: object, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> float | None:
        """``a ± alpha·b``: La + |alpha|·Lb, each times √(copies) where broadcasting repeats it."""
        alpha = _largest_abs(kwargs.get("alpha", 1.0))
        if alpha is None or isinstance(n.kwargs.get("alpha"), fx.Node):
            return None
        if len(n.args) != 2 or set(kwargs) - {"alpha"}:
            return None
        scale_a, scale_b = (alpha, 1.0) if key in REVERSED_SUBTRACTIONS else (1.0, alpha)
        out = _tensors(result)
        total = 0.0
        for node, value, scale in ((n.args[0], args[0], scale_a), (n.args[1], args[1], scale_b)):
            if isinstance(node, fx.Node) and self.bound[node] > 0:
                total += scale * self.bound[node] * _broadcast(value, out)
        return total

    def _scaling(
        self, n: fx.Node, key: object, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> float | None:
        """``x · c`` or ``x / c`` with a constant ``c``: max |c| (or 1 / min |c|) times Lx."""
        if len(n.args) != 2 or kwargs:
            return None  # a rounding_mode makes division a step function
        a, b = n.args
        a_live = isinstance(a, fx.Node) and self.bound[a] > 0
        b_live = isinstance(b, fx.Node) and self.bound[b] > 0
        if a_live and b_live:
            return None  # a product of two input-dependent values is not Lipschitz
        if b_live and key in QUOTIENTS:
            return None  # nor is the input in a denominator
        x_node, x_value, constant = (a, args[0], args[1]) if a_live else (b, args[1], args[0])
        assert isinstance(x_node, fx.Node)
        if key in QUOTIENTS:
            smallest = _smallest_abs(constant)
            if not smallest:
                return None
            size: float | None = 1.0 / smallest
        else:
            size = _largest_abs(constant)
        if size is None:
            return None
        return size * self.bound[x_node] * _broadcast(x_value, _tensors(result))

    def _matmul(self, n: fx.Node, args: tuple[Any, ...], live: list[fx.Node]) -> float | None:
        """``x @ W`` or ``W @ x`` with a constant matrix W: σ_max(W) times Lx."""
        if len(n.args) != 2 or len(live) != 1:
            return None
        constant = args[1] if live[0] is n.args[0] else args[0]
        if not isinstance(constant, torch.Tensor) or constant.dim() != 2:
            return None
        sigma = float(torch.linalg.matrix_norm(constant.detach().double(), ord=2))
        return sigma * (1.0 + self.tolerance) * self.bound[live[0]]

    def _functional_linear(
        self,
        n: fx.Node,
        key: object,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        live: list[fx.Node],
    ) -> float | None:
        """``F.linear`` / ``F.convNd`` with constant weights: the operator norm as applied."""
        first = self._only_first(n, live)
        named = _named(key, args, kwargs)
        x, weight = named.pop("input"), named.pop("weight")
        named.pop("bias", None)
        if not isinstance(weight, torch.Tensor):
            return None
        w = weight.detach().double()
        if key is F.linear:
            return float(torch.linalg.matrix_norm(w, ord=2)) * (1.0 + self.tolerance) * first
        fn: Any = key
        return self._norm(n, lambda z: fn(z, w, None, **named), x) * first

    @staticmethod
    def _mutates(n: fx.Node, key: object) -> bool:
        if isinstance(key, str):
            return key.endswith("_") and not key.endswith("__")
        if n.op == "call_module":
            return False  # an in-place module is element-wise: checked by its factor
        if key in AUGMENTABLE:
            source = _source(n)
            return source is not None and bool(AUGMENTED_ASSIGNMENT.search(source[2]))
        return key in IN_PLACE_OPERATORS or key is torch.relu_ or bool(n.kwargs.get("inplace"))

    def _check_unaliased(
        self, n: fx.Node, args: tuple[Any, ...], bound: float, live: list[fx.Node]
    ) -> None:
        """An in-place operation is bounded like its out-of-place form only if no value used
        later shares the storage it overwrote, or if it is element-wise with slope ≤ 1 (then
        every alias of the overwritten elements keeps its bound)."""
        elementwise = (
            n.target in UNARY_METHODS
            or n.target in UNARY_FUNCTIONS
            or n.target
            in (
                F.leaky_relu,
                F.dropout,
            )
        )
        if elementwise and bound <= self.bound[live[0]]:
            return
        if not args or not isinstance(args[0], torch.Tensor):
            return
        storage = args[0].untyped_storage().data_ptr()
        dying = set(self.user_to_last_uses.get(n, []))
        for node, value in self.env.items():
            if node in dying:
                continue
            if any(t.untyped_storage().data_ptr() == storage for t in _tensors(value)):
                raise self._fail(
                    n, f"it overwrites a tensor that is used later (node '{node.name}')"
                )


def _broadcast(value: Any, out: list[torch.Tensor]) -> float:
    """√(copies of each element) when broadcasting repeats ``value`` to the result's size."""
    if not isinstance(value, torch.Tensor) or len(out) != 1 or value.numel() == 0:
        return 1.0
    return math.sqrt(max(1.0, out[0].numel() / value.numel()))


def _compose(
    model: nn.Module,
    example: torch.Tensor,
    output: Any,
    module_bound: _ModuleBounds,
) -> tuple[float | None, str | None]:
    """Bound the network by running its fx graph on ``example`` with a bound per node;
    ``output`` is the model's own output on it, which the graph must reproduce."""
    tracer = _SourceTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        return None, (
            f"the model does not trace with torch.fx ({type(exc).__name__}: {exc}); "
            "leave max_lipschitz_upper_bound out of the spec"
        )
    bounder = _Bounder(fx.GraphModule(tracer.root, graph), module_bound)
    try:
        with torch.no_grad():
            traced = bounder.run(example)
    except _Unbounded as exc:
        return None, exc.reason
    ours, theirs = _tensors(traced), _tensors(output)
    if len(ours) != len(theirs) or not all(
        a.shape == b.shape
        and torch.allclose(a, b, rtol=1e-4, atol=1e-6 * (1 + float(b.abs().max())))
        for a, b in zip(ours, theirs, strict=False)
    ):
        # fx records some in-place updates (``h += g`` where ``h`` is used again) as copies,
        # and drops dropout's randomness: then the graph is not the network it bounds.
        return None, (
            "the torch.fx graph of the model computes a different output than the model "
            "(an in-place update of a tensor used again, or a random layer in training "
            "mode); put the model in eval mode and write such updates out of place, or "
            "leave max_lipschitz_upper_bound out of the spec"
        )
    last = next(node for node in graph.nodes if node.op == "output")
    return bounder.bound[last], None
