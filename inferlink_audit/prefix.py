"""Prefix reuse for local sweeps (README, "How the engine
computes it"): nothing before the filtered tensors changes.

The network is traced once with ``torch.fx`` and cut just before the first node that may read
a tensor of the scope. The *prefix* maps the input to every value still live at the cut (the
layer's input and, in a residual network, the skip tensors that bypass it); the *suffix*
maps those values to the logits. Both share the original modules, so weights edited in place
are seen, and they run the same operations in the same order as the full network, so the
logits are bit-identical. A model that does not trace simply runs whole.

Two things decide where the cut may go:

* *Which nodes read the scope.* Tensors are compared by identity, never by name: a weight
  tied into another module, a layer called before its registration order says, or a weight
  read functionally (``F.linear(x, self.fc.weight)``) all make the first reader the cut.
  A node whose reads cannot be established (a module with hooks of unknown kind, a function
  from outside torch, an argument of unknown type) counts as a reader, so the cut goes
  before it: the prefix only ever holds nodes proven not to read the scope.
* *In-place writes in the suffix.* The prefix's outputs are computed once and fed to the
  suffix at every threshold, so a suffix that writes into one of them (``h.mul_(0.5)``,
  ``F.relu(h, inplace=True)``, ``nn.ReLU(inplace=True)``, ``operator.iadd``, ``setitem``, or
  a view of them) would feed the next threshold a different value. The cut then moves back
  before the node that produced the written value, so the suffix recomputes it on every
  pass exactly as the whole network does. Cloning the live values instead would cost a
  copy per pass and would break aliasing between them (a view and its base written through
  one of them), so results would no longer be guaranteed bit-identical.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import logging
import operator
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules import module as module_hooks
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitNetwork:
    inner_prefix: fx.GraphModule  # network input -> tuple of live values at the cut
    suffix: fx.GraphModule  # *live values -> logits
    live: tuple[str, ...]  # names of the cached values, for messages
    preprocess: Callable[[torch.Tensor], torch.Tensor]

    def prefix(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.inner_prefix(self.preprocess(x))


# Hooks that only rebuild a module's own weight from its own tensors before each forward.
_KNOWN_HOOKS: tuple[type, ...] = (
    WeightNorm,
    SpectralNorm,
)
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)
# Where a called function is known to read only its arguments (and write at most those).
_TORCH_NAMESPACES = ("torch", "_operator", "operator", "builtins", "math")
# Types of constant arguments that cannot hold a tensor.
_CONSTANTS = (
    int,
    float,
    bool,
    complex,
    str,
    bytes,
    type(None),
    slice,
    type(Ellipsis),
    torch.dtype,
    torch.device,
    torch.memory_format,
    torch.layout,
)
_INPLACE_OPERATORS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.imatmul,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
    operator.setitem,
    operator.delitem,
}
_INPLACE_DUNDERS = {f"__{op.__name__}__" for op in _INPLACE_OPERATORS}
# Operations whose result is a new tensor, never a view of an argument (when not in place).
_FRESH_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.floordiv,
    operator.mod,
    operator.pow,
    operator.matmul,
    operator.neg,
}
_FRESH_NAMES = {
    "abs", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "add",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "batch_norm", "bmm", "cat", "clamp", "clone",
    "concat", "concatenate", "conv1d", "conv2d", "conv3d", "div", "einsum", "elu", "exp",
    "gelu", "group_norm", "hardtanh", "hstack", "layer_norm", "leaky_relu", "linear", "log",
    "log_softmax", "matmul", "max_pool1d", "max_pool2d", "max_pool3d", "mean", "mm", "mul",
    "neg", "pow", "relu", "relu6", "sigmoid", "silu", "softmax", "sqrt", "stack", "sub",
    "sum", "tanh", "true_divide", "vstack", "where",
}  # fmt: skip
_FRESH_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.Bilinear,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Embedding,
)


def _input_nodes(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def _nodes_in(arg: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arg, found.append)
    return found


def _leaves(arg: Any) -> list[Any]:
    """Every leaf of a (nested) argument: nodes, tensors and constants."""
    leaves: list[Any] = []

    def keep(leaf: Any) -> Any:
        leaves.append(leaf)
        return leaf

    fx.node.map_aggregate(arg, keep)
    return leaves


def _tensors_held(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor a module can reach: parameters and buffers under every name they have
    (tied ones included), and plain tensor attributes (a weight rebuilt by a hook)."""
    for _, p in module.named_parameters(remove_duplicate=False):
        yield p
    for _, b in module.named_buffers(remove_duplicate=False):
        yield b
    for sub in module.modules():
        yield from (v for v in vars(sub).values() if isinstance(v, torch.Tensor))


def _hooks(module: nn.Module) -> list[Any]:
    return [h for name in _HOOK_DICTS for h in getattr(module, name, {}).values()]


def _name_of(target: Any) -> str:
    return str(getattr(target, "__name__", ""))


def _is_torch_function(target: Any) -> bool:
    where = str(getattr(target, "__module__", None) or "")
    return where.split(".")[0] in _TORCH_NAMESPACES


@functools.cache
def _signature(target: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None  # a builtin without one: it takes no ``inplace`` argument


def _binds_inplace(target: Any, node: fx.Node) -> bool:
    """Whether ``target(*args, **kwargs)`` is called with ``inplace`` true (keyword or by
    position, as in ``F.relu(x, True)``)."""
    if node.kwargs.get("inplace") is True:
        return True
    try:
        signature = _signature(target)
    except TypeError:  # unhashable target
        signature = None
    if signature is None or "inplace" not in signature.parameters:
        return False
    try:
        bound = signature.bind(*node.args, **node.kwargs)
    except TypeError:
        return True  # cannot tell: assume it writes
    return bool(bound.arguments.get("inplace", False))


class _Graph:
    """What each node of a traced network reads and writes, as far as can be established."""

    def __init__(self, gm: fx.GraphModule, scope: Iterable[torch.Tensor]) -> None:
        self.gm = gm
        self.scope = {id(t) for t in scope}
        self._held: dict[str, bool] = {}

    def _module(self, target: str) -> nn.Module:
        return self.gm.get_submodule(target)

    def _holds_scope(self, module: nn.Module) -> bool:
        return any(id(t) in self.scope for t in _tensors_held(module))

    def _unknown_hooks(self, module: nn.Module) -> bool:
        hooks = (h for m in module.modules() for h in _hooks(m))
        return any(not isinstance(h, _KNOWN_HOOKS) for h in hooks)

    def _leaf_may_read(self, value: Any) -> bool:
        if isinstance(value, (fx.Node, *_CONSTANTS)):
            return False
        if isinstance(value, torch.Tensor):
            return id(value) in self.scope
        if isinstance(value, nn.Module):
            return self._holds_scope(value)
        return True  # an object of unknown kind might reach the scope

    def may_read_scope(self, node: fx.Node) -> bool:
        """Whether ``node`` may read a scope tensor (True when that cannot be ruled out)."""
        if node.op in ("placeholder", "output"):
            return False
        if node.op == "get_attr":
            try:
                value = self.gm
                for part in str(node.target).split("."):
                    value = getattr(value, part)
            except AttributeError:
                return True
            return self._leaf_may_read(value)
        args = any(self._leaf_may_read(a) for a in _leaves((node.args, node.kwargs)))
        if node.op == "call_module":
            target = str(node.target)
            if target not in self._held:
                module = self._module(target)
                self._held[target] = self._holds_scope(module) or self._unknown_hooks(module)
            return self._held[target] or args
        if node.op == "call_function":
            owner = getattr(node.target, "__self__", None)
            if isinstance(owner, (torch.Tensor, nn.Module)) and self._leaf_may_read(owner):
                return True
            return args or not _is_torch_function(node.target)
        return args  # call_method: a tensor method reads only its arguments

    def writes(self, node: fx.Node) -> list[fx.Node] | None:
        """The input nodes ``node`` may write in place; None when any of them might be."""
        if node.op == "call_method":
            name = str(node.target)
            written = _nodes_in(node.kwargs.get("out"))
            if (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS:
                written += _nodes_in(node.args[:1])
            return written
        if node.op == "call_function":
            target = node.target
            if not _is_torch_function(target):
                return None
            written = _nodes_in(node.kwargs.get("out"))
            name = _name_of(target)
            if (
                target in _INPLACE_OPERATORS
                or (name.endswith("_") and not name.endswith("__"))
                or _binds_inplace(target, node)
            ):
                written += _nodes_in(node.args[:1]) + _nodes_in(node.kwargs.get("input"))
            return written
        if node.op == "call_module":
            module = self._module(str(node.target))
            if self._unknown_hooks(module):
                return None
            return _nodes_in(node.args[:1]) if getattr(module, "inplace", False) else []
        return []

    def fresh(self, node: fx.Node) -> bool:
        """Whether ``node`` returns a new tensor, never its argument or a view of one."""
        if node.op == "call_module":
            module = self._module(str(node.target))
            if _hooks(module) or getattr(module, "inplace", False):
                return False
            activation = type(module).__module__ == "torch.nn.modules.activation"
            return activation or isinstance(module, _FRESH_MODULES)
        if node.op == "call_function":
            target = node.target
            if target in _FRESH_FUNCTIONS:
                return True
            return (
                _is_torch_function(target)
                and _name_of(target) in _FRESH_NAMES
                and not _binds_inplace(target, node)
                and "out" not in node.kwargs
            )
        if node.op == "call_method":
            return str(node.target) in _FRESH_NAMES and "out" not in node.kwargs
        return False

    def written_live(self, tail: Sequence[fx.Node], live: Sequence[fx.Node]) -> set[fx.Node]:
        """The live values (or values they share memory with) that the suffix may write."""
        aliases: dict[fx.Node, set[fx.Node]] = {n: {n} for n in live}
        written: set[fx.Node] = set()
        for node in tail:
            inputs = _input_nodes(node)
            targets = self.writes(node)
            for target in inputs if targets is None else targets:
                written |= aliases.get(target, set())
            if not self.fresh(node):
                aliases[node] = set().union(*(aliases.get(n, set()) for n in inputs))
        return written


def _global_hooks() -> bool:
    return any(getattr(module_hooks, name, None) for name in _GLOBAL_HOOKS)


class NetworkSplitter:
    """Traces a network once and cuts it before any scope on request.

    ``preprocess`` is what runs before the network (the input normalisation of the model
    wrapper); it stays outside the trace and is part of every prefix.
    """

    def __init__(
        self, model: nn.Module, preprocess: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    ) -> None:
        self.model = model
        self.preprocess = preprocess
        self.graph_module: fx.GraphModule | None
        try:
            self.graph_module = fx.symbolic_trace(model)
        except Exception as exc:  # any tracing failure only costs speed, never correctness
            log.info(
                "torch.fx cannot trace %s (%s): local sweeps run the whole network",
                type(model).__name__,
                exc,
            )
            self.graph_module = None

    @property
    def traceable(self) -> bool:
        return self.graph_module is not None

    def _faithful(self, gm: fx.GraphModule) -> bool:
        """Whether running the graph is running the model: hooks on a module the trace went
        through (the root included) are not in the graph, and global hooks may read anything."""
        leaves = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        traced_through = (
            m
            for name, m in self.model.named_modules()
            if not any(name == leaf or name.startswith(leaf + ".") for leaf in leaves)
        )
        return not _global_hooks() and not any(_hooks(m) for m in traced_through)

    def split(
        self, layer: str, tensors: Sequence[torch.Tensor] | None = None
    ) -> SplitNetwork | None:
        """Prefix and suffix around the scope ``tensors`` (by default every tensor the module
        ``layer`` holds); ``layer`` names the scope in messages. None when no safe cut exists."""
        gm = self.graph_module
        if gm is None or not self._faithful(gm):
            return None
        if tensors is None:
            try:
                tensors = list(_tensors_held(self.model.get_submodule(layer)))
            except AttributeError:
                return None
        graph = _Graph(gm, tensors)
        nodes = list(gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        cut = next((i for i, n in enumerate(nodes) if graph.may_read_scope(n)), None)
        if cut is None or len(placeholders) != 1:
            return None
        first = nodes.index(placeholders[0])
        while True:
            if cut <= first:
                return None
            head, tail = nodes[:cut], nodes[cut:]
            tail_set = set(tail)
            # Parameters and buffers are re-read in the suffix rather than cached.
            live = [
                n for n in head if n.op != "get_attr" and any(user in tail_set for user in n.users)
            ]
            if not live:
                return None
            written = graph.written_live(tail, live)
            if not written:
                break
            cut = min(nodes.index(n) for n in written)  # recompute those values every pass
        return self._build(gm, layer, head, tail, live)

    def _build(
        self,
        gm: fx.GraphModule,
        layer: str,
        head: list[fx.Node],
        tail: list[fx.Node],
        live: list[fx.Node],
    ) -> SplitNetwork | None:
        tail_set = set(tail)
        prefix_graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in head:
            env[node] = prefix_graph.node_copy(node, lambda n: env[n])
        prefix_graph.output(tuple(env[n] for n in live))

        suffix_graph = fx.Graph()
        env = {}
        for node in live:
            env[node] = suffix_graph.placeholder(node.name)
        for node in head:
            if node.op == "get_attr" and any(user in tail_set for user in node.users):
                env[node] = suffix_graph.node_copy(node, lambda n: env[n])
        for node in tail:
            env[node] = suffix_graph.node_copy(node, lambda n: env[n])
        try:
            prefix = fx.GraphModule(gm, prefix_graph)
            suffix = fx.GraphModule(gm, suffix_graph)
        except Exception as exc:
            log.info(
                "cannot cut %s before %s (%s): running it whole",
                type(self.model).__name__,
                layer,
                exc,
            )
            return None
        return SplitNetwork(prefix, suffix, tuple(n.name for n in live), self.preprocess)


def release_freed_memory() -> None:
    """Give the pages of freed memory back to the operating system where the C library keeps
    them (glibc's ``malloc_trim``; elsewhere nothing happens).

    A prefix cache is freed when its scope ends, but glibc serves tensors below its mmap
    threshold (which rises to 32 MiB as large tensors are freed) from its heap and keeps those
    pages resident after ``free``: without this, the process stays at the size of its largest
    cache for the rest of the audit. Under bf16 nearly every activation is below it (a
    ResNet-18's first stage at 128 images is 16 MiB in bf16 and 32 MiB, mmapped, in fp32).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # a C library without it (musl)
        return None


def live_bytes(values: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> int:
    """Bytes the tensors among ``values`` keep alive: a storage that several of them share (a
    skip tensor that is also the layer's input, views) counts once, and whole."""
    storages = {
        v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
        for v in values
        if isinstance(v, torch.Tensor)
    }
    return sum(storages.values())
