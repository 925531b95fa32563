"""Prefix reuse for local sweeps (DESIGN §4): nothing before the filtered layer changes.

The network is traced once with ``torch.fx`` and cut just before the first node that uses the
filtered layer. The *prefix* maps the input to every value still live at the cut (the
layer's input and, in a residual network, the skip tensors that bypass it); the *suffix*
maps those values to the logits. Both share the original modules, so weights edited in place
are seen, and they run the same operations in the same order as the full network, so the
logits are bit-identical. A model that does not trace simply runs whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitNetwork:
    inner_prefix: fx.GraphModule  # network input -> tuple of live values at the cut
    suffix: fx.GraphModule  # *live values -> logits
    live: tuple[str, ...]  # names of the cached values, for messages
    preprocess: Callable[[torch.Tensor], torch.Tensor]

    def prefix(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.inner_prefix(self.preprocess(x))


def _uses_layer(node: fx.Node, layer: str) -> bool:
    target = str(node.target)
    if node.op == "call_module":
        return target == layer or target.startswith(layer + ".")
    if node.op == "get_attr":
        return target.startswith(layer + ".")
    return False


class NetworkSplitter:
    """Traces a network once and cuts it before any layer on request.

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

    def split(self, layer: str) -> SplitNetwork | None:
        """Prefix and suffix around ``layer`` (a qualified module name in ``model``)."""
        gm = self.graph_module
        if gm is None:
            return None
        nodes = list(gm.graph.nodes)
        cut = next((i for i, n in enumerate(nodes) if _uses_layer(n, layer)), None)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if cut is None or len(placeholders) != 1 or cut <= nodes.index(placeholders[0]):
            return None
        head, tail = nodes[:cut], nodes[cut:]
        tail_set = set(tail)
        # Parameters and buffers are re-read in the suffix rather than cached.
        live = [n for n in head if n.op != "get_attr" and any(user in tail_set for user in n.users)]
        if not live:
            return None

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


def live_bytes(values: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
